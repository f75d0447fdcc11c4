"""Signed statements inside the migration stream: the source and destination layers.

Signed-stream format 2 (docs/signing-wire.md; the records are in :mod:`.record`, the
statement kinds in :mod:`.statements` and :mod:`.keys`).  Nothing of a VFIO device's
state or config reaches QEMU before it is verified.

Where the source layer puts statements:

* ``hello`` (format 2) right after the CONFIGURATION (before any section): binds the
  stream to a migration id, a fresh sequence number (ns clock), the domain and the
  source host.
* ``block`` ahead of each VFIO data block, as a data block of its own in the same
  section: the layer holds the block (at most :data:`MAX_SIGNED_BLOCK` bytes, one block
  at a time), signs its length and SHA-256, its place in the device's sequence and the
  previous block statement's hash, then sends statement and block.
* ``config`` ahead of each VFIO device's FULL (config) section: the layer holds the
  section (at most :data:`MAX_SIGNED_CONFIG` bytes of config), signs it, sends both.
* ``device`` right after the footer of each VFIO device's END section: length and
  SHA-256 of the whole state, bound to the mdev (uuid, type); it goes into the manifest.

What the destination layer does (in front of the :class:`~libvirt_mdev.filter.StreamFilter`):

* Strips every statement: QEMU never sees one.
* ``hello``: trusted key, fresh (``max_age``), sequence newer than any earlier
  migration of this domain signed by that key (a replay guard kept in the store),
  domain uuid as expected, format 2 (a format-1 stream is refused with a line saying so).
* Each data block: its statement must verify and be the device's next one in the chain
  (same migration and signer as the hello, this section's idstr and instance, the next
  ``seq``, ``prev`` = hash of the previous statement); the block is then held — not one
  byte goes to the filter — until its length and SHA-256 match; then it is released.
* The config section: held from its header to its footer until it matches the config
  statement that preceded it.
* The END_OF_STATE that ends each device's END section (and the footer) is held until
  the device statement verified against what passed and against the domain's binding
  (idstr, mdev uuid and type); its signature goes into the manifest.
* With ``require_signature``: a stream without hello, a block or config section without
  its statement, a record whose key is unknown or whose signature fails →
  :class:`SignatureError`, the proxy resets both sides and the migration is aborted.
"""
from __future__ import annotations

from .record import MAX_RECORD, SIG_IDSTR, SIG_SECTION_ID, ReplayGuard, decode_record, encode_payload, encode_record
from .signer import SignContext, SignLayer, sign_stream
from .statements import MAX_SIGNED_BLOCK, MAX_SIGNED_CONFIG
from .verifier import DEFAULT_MAX_AGE, VerifyLayer, VerifyPolicy, verify_stream

# one import for the whole feature: the layers (signer.py, verifier.py), what they hold
# (held.py) and the record names
__all__ = ["DEFAULT_MAX_AGE", "MAX_RECORD", "MAX_SIGNED_BLOCK", "MAX_SIGNED_CONFIG", "SIG_IDSTR", "SIG_SECTION_ID",
           "ReplayGuard", "SignContext", "SignLayer", "VerifyLayer", "VerifyPolicy", "decode_record",
           "encode_payload", "encode_record", "sign_stream", "verify_stream"]
