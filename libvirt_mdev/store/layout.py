"""The store directory's file names: one place for every suffix and the id check.

Layout of the store directory (0700 root; every file 0600 root, one link)::

    .lock                   flock: writers' commits share it, gc takes it exclusively
    <sha256>.state          device state bytes, named by their SHA-256 (shared by content)
    <manifest id>.json      canonical manifest; id = SHA-256 of these bytes (= token name)
    <manifest id>.spent     marker: the token was used (single use, replay refused)
    .tmp-<random>[.state]   in progress; never read; removed by gc once no writer holds it
    <stream id>.stream      one stream's decision: open, accepted or refused (+ why, kind, holder)
    <manifest id>.held      the state was stored from stream <stream id>: loadable only once
                            that stream is accepted (:mod:`.streams`)

Why states are shared but manifests are not: see :mod:`.manifest`.
"""
from __future__ import annotations

from ..errors import UsageError
from .manifest import HEX64_RE

LOCK_NAME = ".lock"
STATE_SUFFIX = ".state"
MANIFEST_SUFFIX = ".json"
SPENT_SUFFIX = ".spent"
STREAM_SUFFIX = ".stream"
HOLD_SUFFIX = ".held"


def check_id(value: str, what: str) -> str:
    """*value* if it is a manifest or stream id (64 lowercase hex digits): it becomes a file name.

    Raises:
        UsageError: anything else.
    """
    if not isinstance(value, str) or not HEX64_RE.match(value):
        raise UsageError(f"{what} {value!r} is not 64 lowercase hex digits")
    return value
