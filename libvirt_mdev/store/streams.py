"""Streams (issue 11, "refused means gone"): a stored state is loadable only once the
whole stream it came from was accepted.

State that a filter stores from a stream is committed *held*: the ``<manifest id>.held``
marker is written before the manifest (:func:`.writer.commit_state`), so at every
instant a manifest of that stream exists it is not loadable.  It becomes loadable only
when the whole stream is accepted (:meth:`StreamTxn.accept` rewrites the stream record
atomically: one rename decides every device of the stream at once).  A refused stream
(:meth:`StreamTxn.refuse`) records why; the loader, splice and ``store list`` show it.
A stream whose process died (kill -9) holds no lock any more: gc marks it refused
("unfinished").  So kill -9 at any point never leaves a loadable state of an
unfinished stream.
"""
from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass

from ..errors import MdevError, StoreError, StoreIntegrityError, TokenError, UsageError
from .acl import SecureDir, lock_fd
from .layout import HOLD_SUFFIX, LOCK_NAME, STREAM_SUFFIX, check_id

#: what a stream's states are for; decides how gc treats them (see :mod:`.gc`)
STREAM_KINDS = ("migration", "image", "copy")
#: a stream's decisions
OPEN, ACCEPTED, REFUSED = "open", "accepted", "refused"
#: longest refusal reason a record keeps
MAX_REASON = 500


@dataclass(frozen=True)
class StreamInfo:
    """A stream record: what a stored state came from and whether that stream was accepted."""

    id: str
    state: str                      #: open, accepted or refused
    kind: str                       #: migration, image (strip: a stripped file holds it) or copy
    holder: str | None = None       #: e.g. the stripped save image's path
    created: int = 0
    decided: int | None = None      #: when it was accepted or refused
    reason: str | None = None       #: why it was refused
    lock: str | None = None         #: the live filter's lock file (open streams)

    def to_json(self) -> dict[str, object]:
        return {k: v for k, v in self.__dict__.items() if k != "lock"}


def encode_record(state: str, kind: str, holder: str | None, created: int, *,
                  lock: str | None = None, reason: str | None = None) -> bytes:
    """The bytes of a ``<id>.stream`` record (open: with its lock file; decided: with when, and why)."""
    obj: dict[str, object] = {"state": state, "kind": kind, "holder": holder, "created": created}
    if state == OPEN:
        obj["lock"] = lock
    else:
        obj["decided"] = int(time.time())
    if reason is not None:
        obj["reason"] = " ".join(reason.split())[:MAX_REASON]
    return json.dumps(obj, sort_keys=True).encode()


def read_stream_info(d: SecureDir, stream_id: str) -> StreamInfo:
    """Read the record of stream *stream_id*; a missing record counts as refused.

    Raises:
        UsageError: a malformed id.  StoreIntegrityError: a malformed record.
    """
    check_id(stream_id, "stream id")
    name = stream_id + STREAM_SUFFIX
    data = d.read_small(name, missing_ok=True)
    if data is None:
        return StreamInfo(stream_id, REFUSED, "migration", reason="its stream record is missing")
    try:
        obj = json.loads(data)
        info = StreamInfo(id=stream_id, state=obj["state"], kind=obj["kind"], holder=obj.get("holder"),
                          created=int(obj.get("created", 0)), decided=obj.get("decided"),
                          reason=obj.get("reason"), lock=obj.get("lock"))
    except (ValueError, KeyError, TypeError):
        raise StoreIntegrityError(f"stream record {d.describe(name)} is malformed") from None
    if info.state not in (OPEN, ACCEPTED, REFUSED) or info.kind not in STREAM_KINDS:
        raise StoreIntegrityError(f"stream record {d.describe(name)} is malformed")
    return info


def stream_of(d: SecureDir, manifest_id: str) -> StreamInfo | None:
    """The stream *manifest_id* was stored from (None: not stored from a stream).

    A hold marker or stream record we cannot read counts as a refused stream (fail closed).
    """
    check_id(manifest_id, "manifest id")
    name = manifest_id + HOLD_SUFFIX
    if not d.exists(name):
        return None
    try:
        hold = json.loads(d.read_small(name, missing_ok=True) or b"{}")
        sid = hold.get("stream") if isinstance(hold, dict) else None
        return read_stream_info(d, check_id(sid, "stream id") if isinstance(sid, str) else "")
    except (StoreError, UsageError, ValueError) as exc:
        why = exc.message if isinstance(exc, StoreError) else str(exc)
        return StreamInfo("?", REFUSED, "migration", reason=f"unreadable stream record ({why})")


def check_loadable(d: SecureDir, manifest_id: str, what: str = "state") -> None:
    """Refuse state whose stream was refused or has not been accepted (yet).

    Raises:
        TokenError: with the stream's reason.
    """
    info = stream_of(d, manifest_id)
    if info is None or info.state == ACCEPTED:
        return
    if info.state == OPEN:
        raise TokenError(f"{what} {manifest_id[:16]}... belongs to a stream that has not been "
                         f"accepted (still running, or its process died); refusing it")
    raise TokenError(f"{what} {manifest_id[:16]}... belongs to a refused stream "
                     f"({info.reason or 'no reason recorded'}); refusing it")


class StreamTxn:
    """One stream's transaction: its states are held until :meth:`accept`.

    The record ``<id>.stream`` is written (state ``open``, with the name of a lock file
    this process holds) when the first state is committed.  :meth:`accept` and
    :meth:`refuse` replace it atomically.  gc marks an open stream whose lock file is
    gone (its process died) refused.
    """

    def __init__(self, d: SecureDir, kind: str, holder: str | None) -> None:
        if kind not in STREAM_KINDS:
            raise UsageError(f"unknown stream kind {kind!r}")
        self._dir = d
        self.id = secrets.token_hex(32)
        self.kind = kind
        self.holder = holder
        self.created = int(time.time())
        self.state = OPEN
        self._lock: tuple[int, str] | None = None

    @property
    def written(self) -> bool:
        """Whether any state of this stream was committed (the record exists)."""
        return self._lock is not None or self.state != OPEN

    def ensure_record(self) -> None:
        """Write the open record before this stream's first state (caller holds the shared store lock)."""
        if self._lock is not None or self.state != OPEN:
            return
        fd, name = self._dir.create_temp(".lock")
        lock_fd(fd)
        self._lock = (fd, name)
        self._dir.write_atomic(self.id + STREAM_SUFFIX,
                               encode_record(OPEN, self.kind, self.holder, self.created, lock=name))

    def accept(self) -> None:
        """The whole stream passed: every state it stored becomes loadable at once."""
        self._decide(ACCEPTED, None)

    def refuse(self, reason: str) -> None:
        """The stream was refused: none of its states may ever be loaded.  Also after
        :meth:`accept` (a refusal reported later still wins)."""
        self._decide(REFUSED, reason)

    def refuse_if_possible(self, reason: str) -> None:
        """:meth:`refuse` for an error path: when the refusal cannot be recorded (disk
        full, I/O error) the stream stays "open", which is never loadable either, and gc
        marks it refused once this process is gone."""
        try:
            self.refuse(reason)
        except MdevError:
            pass

    def _decide(self, state: str, reason: str | None) -> None:
        if self.state in (REFUSED, state):
            return
        if self.written:
            with self._dir.locked(LOCK_NAME, exclusive=False):
                self._dir.write_atomic(self.id + STREAM_SUFFIX,
                                       encode_record(state, self.kind, self.holder, self.created, reason=reason))
        self.state = state
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            fd, name = self._lock
            self._lock = None
            self._dir.discard_temp(fd, name)
