"""Signed device state: host keys and statements (:mod:`.keys`), the in-stream record
(:mod:`.record`), the sign and verify stream layers (:mod:`.layers`), and where a
session finds its key, its trusted keys and its domain (:mod:`.source`)."""
