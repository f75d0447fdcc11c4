"""The trusted device-state store: checked reads, spending, listing, gc — one object.

Where the rest lives: the file names in :mod:`.layout`, storing a state in
:mod:`.writer`, streams ("refused means gone") in :mod:`.streams`, gc in :mod:`.gc`,
every path and permission check in :mod:`.acl`.  :class:`Store` ties them to one
checked directory; the package's other modules (the filter, the signing layers, the
hook) only ever hold a :class:`Store`.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Self

from ..errors import StoreError, StoreIntegrityError
from ..io.sizes import CHUNK
from .acl import TEMP_PREFIX, SecureDir
from .entry import Entry
from .gc import GcReport, collect
from .layout import HOLD_SUFFIX, LOCK_NAME, MANIFEST_SUFFIX, SPENT_SUFFIX, check_id
from .manifest import HEX64_RE, Manifest, StateMeta, parse_manifest
from .streams import StreamInfo, StreamTxn, check_loadable, read_stream_info, stream_of
from .writer import Buffer, StateWriter


class Store:
    """A trusted store opened on its directory.  Open with :meth:`open`."""

    def __init__(self, sdir: SecureDir) -> None:
        self._dir = sdir

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def open(cls, root: str | os.PathLike[str], *, create: bool = False, uid: int = 0) -> Store:
        """Open (with *create*: create if missing) the store at *root*.

        Raises:
            StoreAccessError: missing, symlink, wrong owner or mode.
        """
        return cls(SecureDir.open(root, create=create, uid=uid, what="store"))

    @property
    def root(self) -> Path:
        return self._dir.path

    @property
    def dir(self) -> SecureDir:
        """The checked directory (for :mod:`.tokens` and :mod:`.gc`; not for general use)."""
        return self._dir

    def close(self) -> None:
        self._dir.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------------- writing
    def begin_state(self, meta: StateMeta, *, created: int | None = None,
                    stream: StreamTxn | None = None) -> StateWriter:
        """Start storing one device's state.  Feed it with ``write``, then ``commit``.

        With *stream*, the committed state is held until that stream is accepted.

        Raises:
            UsageError: invalid *meta*.
            StoreError: the temp file cannot be created.
        """
        meta.check()
        return StateWriter(self._dir, meta, created, stream)

    def open_stream(self, kind: str, holder: str | None = None) -> StreamTxn:
        """Start a stream transaction (:mod:`.streams`).  Nothing is written until its
        first state is committed.

        Raises:
            UsageError: an unknown *kind*.
        """
        return StreamTxn(self._dir, kind, holder)

    def put_state(self, meta: StateMeta, data: Buffer) -> Manifest:
        """Store *data* in one call (tests, small states)."""
        with self.begin_state(meta) as w:
            w.write(data)
            return w.commit()

    # -------------------------------------------------------------------- reading
    def manifest(self, manifest_id: str) -> Manifest:
        """The manifest *manifest_id*, checked (ACL, name = hash, strict schema).

        Raises:
            UsageError: *manifest_id* is not 64 hex digits.
            StoreAccessError: symlink, owner, mode, links.
            StoreIntegrityError: tampered or malformed manifest.
            StoreError: no such manifest.
        """
        check_id(manifest_id, "manifest id")
        name = manifest_id + MANIFEST_SUFFIX
        data = self._dir.read_small(name)
        assert data is not None
        return parse_manifest(data, where=f"manifest {self._dir.describe(name)}", expect_id=manifest_id)

    def has_manifest(self, manifest_id: str) -> bool:
        """Whether a manifest of that id exists (checked when it is read)."""
        return self._dir.exists(check_id(manifest_id, "manifest id") + MANIFEST_SUFFIX)

    def open_state(self, manifest_id: str) -> tuple[Manifest, int]:
        """Open the state of *manifest_id*: a checked read-only fd whose size matches
        the manifest.  The content is *not* re-hashed: use :meth:`open_verified`
        before handing bytes to a device.  Caller closes the fd.
        """
        m = self.manifest(manifest_id)
        name = m.state_name
        fd = self._dir.open_read(name)
        assert fd is not None
        try:
            size = os.fstat(fd).st_size
            if size != m.length:
                raise StoreIntegrityError(
                    f"state {self._dir.describe(name)} has {size} bytes, its manifest says "
                    f"{m.length} (truncated or tampered)")
        except BaseException:
            os.close(fd)
            raise
        return m, fd

    def open_verified(self, manifest_id: str) -> tuple[Manifest, int]:
        """Like :meth:`open_state`, but re-hash the whole file first and return the fd
        positioned at 0: the bytes read from it are the bytes that were verified
        (same open file; only root can write the store).

        Raises:
            StoreIntegrityError: length or SHA-256 differs from the manifest.
        """
        m, fd = self.open_state(manifest_id)
        try:
            total, got = _hash_fd(fd)
            if total != m.length or got != m.sha256:
                raise StoreIntegrityError(
                    f"state {self._dir.describe(m.state_name)} does not match its manifest "
                    f"{manifest_id[:16]}...: {total} bytes with SHA-256 {got[:16]}..., expected "
                    f"{m.length} bytes with {m.sha256[:16]}... (tampered or damaged)")
            os.lseek(fd, 0, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        return m, fd

    def verify(self, manifest_id: str) -> Manifest:
        """Re-hash the state of *manifest_id* (see :meth:`open_verified`)."""
        m, fd = self.open_verified(manifest_id)
        os.close(fd)
        return m

    def iter_verified(self, manifest_id: str, chunk: int = CHUNK) -> Iterator[bytes]:
        """The verified bytes of *manifest_id*, in chunks (hash checked before the
        first chunk is yielded)."""
        _, fd = self.open_verified(manifest_id)
        try:
            while True:
                b = os.read(fd, chunk)
                if not b:
                    return
                yield b
        finally:
            os.close(fd)

    # -------------------------------------------------------------------- streams
    def stream_of(self, manifest_id: str) -> StreamInfo | None:
        """The stream *manifest_id* was stored from (:func:`.streams.stream_of`)."""
        return stream_of(self._dir, manifest_id)

    def stream_info(self, stream_id: str) -> StreamInfo:
        """The record of stream *stream_id* (:func:`.streams.read_stream_info`)."""
        return read_stream_info(self._dir, stream_id)

    def check_loadable(self, manifest_id: str, what: str = "state") -> None:
        """Refuse state of a refused or unaccepted stream (:func:`.streams.check_loadable`)."""
        check_loadable(self._dir, manifest_id, what)

    # ---------------------------------------------------------------- spending
    def is_spent(self, manifest_id: str) -> bool:
        check_id(manifest_id, "manifest id")
        return self._dir.exists(manifest_id + SPENT_SUFFIX)

    def spent_at(self, manifest_id: str) -> int | None:
        """When the token was spent (None when it was not).  A marker we cannot read
        still counts as spent (fail closed), with time 0."""
        check_id(manifest_id, "manifest id")
        name = manifest_id + SPENT_SUFFIX
        if not self._dir.exists(name):
            return None
        try:
            data = self._dir.read_small(name, missing_ok=True)
            obj = json.loads(data or b"{}")
        except (StoreError, ValueError):
            return 0
        t = obj.get("spent") if isinstance(obj, dict) else None
        return t if isinstance(t, int) and not isinstance(t, bool) else 0

    def mark_spent(self, manifest_id: str, now: int | None = None) -> None:
        """Record durably that *manifest_id*'s token was used.  Atomic test-and-set.

        Raises:
            StoreError: already spent (``FileExistsError`` from the link), or I/O.
        """
        check_id(manifest_id, "manifest id")
        stamp = int(time.time() if now is None else now)
        body = json.dumps({"spent": stamp}, separators=(",", ":")).encode()
        with self._dir.locked(LOCK_NAME, exclusive=False):
            self._dir.write_atomic(manifest_id + SPENT_SUFFIX, body, replace=False)

    # ---------------------------------------------------------------- listing
    def list(self) -> list[Entry]:
        """Every manifest in the store, oldest first, with problems reported, not raised."""
        out: list[Entry] = []
        for name in self._dir.listdir():
            if not name.endswith(MANIFEST_SUFFIX) or name.startswith(TEMP_PREFIX):
                continue
            mid = name[: -len(MANIFEST_SUFFIX)]
            if not HEX64_RE.match(mid):
                out.append(Entry(mid, None, False, problem=f"unexpected file {name}"))
                continue
            spent_at = self.spent_at(mid)
            try:
                out.append(Entry(mid, self.manifest(mid), spent_at is not None, spent_at,
                                 stream=self.stream_of(mid)))
            except StoreError as exc:
                out.append(Entry(mid, None, spent_at is not None, spent_at, problem=exc.message))
        out.sort(key=lambda e: (e.manifest.created if e.manifest else 0, e.id))
        return out

    # ------------------------------------------------------------------ cleaning
    def gc(self, retention: int, now: float | None = None, *,
           domain_uuid: str | None = None, dry_run: bool = False) -> GcReport:
        """Remove what is no longer needed (see :func:`.gc.collect`)."""
        return collect(self, retention, now, domain_uuid=domain_uuid, dry_run=dry_run)

    def remove(self, manifest_id: str) -> bool:
        """An admin's explicit removal of one stored state (``store remove``): its
        manifest, spent and hold markers; the state file goes with the next gc once no
        manifest references it.  Returns whether it existed."""
        check_id(manifest_id, "manifest id")
        with self._dir.locked(LOCK_NAME, exclusive=True):
            found = self._dir.unlink(manifest_id + MANIFEST_SUFFIX, missing_ok=True)
            self._dir.unlink(manifest_id + SPENT_SUFFIX, missing_ok=True)
            self._dir.unlink(manifest_id + HOLD_SUFFIX, missing_ok=True)
            self._dir.sync()
        return found


def _hash_fd(fd: int) -> tuple[int, str]:
    """(bytes read, SHA-256) of *fd* from its position to EOF, in :data:`~libvirt_mdev.io.sizes.CHUNK` pieces."""
    h = hashlib.sha256()
    total = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while True:
        n = os.readv(fd, [buf])
        if n == 0:
            return total, h.hexdigest()
        h.update(view[:n])
        total += n


__all__ = ["MANIFEST_SUFFIX", "Entry", "Manifest", "StateMeta", "StateWriter", "Store", "StreamInfo", "StreamTxn"]
