"""The trusted device-state store: streaming writes, checked reads, gc, locking.

Layout of the store directory (0700 root; every file 0600 root, one link)::

    .lock                   flock: writers' commits share it, gc takes it exclusively
    <sha256>.state          device state bytes, named by their SHA-256 (shared by content)
    <manifest id>.json      canonical manifest; id = SHA-256 of these bytes (= token name)
    <manifest id>.spent     marker: the token was used (single use, replay refused)
    .tmp-<random>[.state]   in progress; never read; removed by gc once no writer holds it

Why states are shared but manifests are not: see :mod:`.manifest`.

Crash safety: a writer streams into a temp file it holds an exclusive flock on,
then (under the shared store lock) fsyncs, renames it to ``<sha256>.state``, writes
the manifest the same way, and fsyncs the directory.  A crash at any point leaves at
most a temp file (never accepted; gc removes it) or a state without a manifest (not
reachable by any token; gc removes it).  gc holds the store lock exclusively, so it
never sees a commit half done, and skips temp files whose writer is alive (locked).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Iterator, Optional, Union

from ..errors import StoreError, StoreIntegrityError, UsageError
from .acl import TEMP_PREFIX, SecureDir, lock_fd, write_all
from .manifest import HEX64_RE, Manifest, StateMeta, parse_manifest

if TYPE_CHECKING:
    from .gc import GcReport

LOCK_NAME = ".lock"
STATE_SUFFIX = ".state"
MANIFEST_SUFFIX = ".json"
SPENT_SUFFIX = ".spent"
#: read size for hashing and delivery
CHUNK = 1 << 20
#: how often a writer kicks off writeback of what it wrote (see StateWriter._start_writeback)
WRITEBACK_STEP = 32 << 20

Buffer = Union[bytes, bytearray, memoryview]


def _check_id(value: str, what: str) -> str:
    if not isinstance(value, str) or not HEX64_RE.match(value):
        raise UsageError(f"{what} {value!r} is not 64 lowercase hex digits")
    return value


@dataclass
class Entry:
    """One row of :meth:`Store.list`: a manifest, or why it could not be read."""

    id: str
    manifest: Optional[Manifest]
    spent: bool
    spent_at: Optional[int] = None
    problem: Optional[str] = None

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"id": self.id, "spent": self.spent, "spent_at": self.spent_at}
        if self.manifest is not None:
            out.update(self.manifest.summary())
        if self.problem:
            out["problem"] = self.problem
        return out


class Store:
    """A trusted store opened on its directory.  Open with :meth:`open`."""

    def __init__(self, sdir: SecureDir) -> None:
        self._dir = sdir

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def open(cls, root: Union[str, os.PathLike[str]], *, create: bool = False,
             uid: int = 0) -> "Store":
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
        """The checked directory (for :mod:`.tokens`; not for general use)."""
        return self._dir

    def close(self) -> None:
        self._dir.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------------- writing
    def begin_state(self, meta: StateMeta, *, created: Optional[int] = None) -> "StateWriter":
        """Start storing one device's state.  Feed it with ``write``, then ``commit``.

        Raises:
            UsageError: invalid *meta*.
            StoreError: the temp file cannot be created.
        """
        meta.check()
        return StateWriter(self, meta, created)

    def put_state(self, meta: StateMeta, data: Buffer) -> Manifest:
        """Store *data* in one call (tests, small states)."""
        with self.begin_state(meta) as w:
            w.write(data)
            return w.commit()

    def _commit(self, fd: int, temp: str, digest: str, manifest: Manifest) -> None:
        """Rename the state into place and write its manifest, atomically w.r.t. gc."""
        with self._dir.locked(LOCK_NAME, exclusive=False):
            # Replacing an existing state of the same content is harmless and also
            # repairs one that was damaged.
            self._dir.commit_temp(fd, temp, digest + STATE_SUFFIX, replace=True)
            self._dir.write_atomic(manifest.id + MANIFEST_SUFFIX, manifest.to_json())

    def _new_temp(self) -> tuple[int, str]:
        with self._dir.locked(LOCK_NAME, exclusive=False):
            fd, name = self._dir.create_temp(STATE_SUFFIX)
            lock_fd(fd)  # tells gc a live writer owns it
            return fd, name

    # -------------------------------------------------------------------- reading
    def manifest(self, manifest_id: str) -> Manifest:
        """The manifest *manifest_id*, checked (ACL, name = hash, strict schema).

        Raises:
            UsageError: *manifest_id* is not 64 hex digits.
            StoreAccessError: symlink, owner, mode, links.
            StoreIntegrityError: tampered or malformed manifest.
            StoreError: no such manifest.
        """
        _check_id(manifest_id, "manifest id")
        name = manifest_id + MANIFEST_SUFFIX
        data = self._dir.read_small(name)
        assert data is not None
        return parse_manifest(data, where=f"manifest {self._dir.describe(name)}",
                              expect_id=manifest_id)

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
            h = hashlib.sha256()
            total = 0
            buf = bytearray(CHUNK)
            view = memoryview(buf)
            while True:
                n = os.readv(fd, [buf])
                if n == 0:
                    break
                h.update(view[:n])
                total += n
            got = h.hexdigest()
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

    def is_spent(self, manifest_id: str) -> bool:
        _check_id(manifest_id, "manifest id")
        return self._dir.exists(manifest_id + SPENT_SUFFIX)

    def spent_at(self, manifest_id: str) -> Optional[int]:
        """When the token was spent (None when it was not).  A marker we cannot read
        still counts as spent (fail closed), with time 0."""
        _check_id(manifest_id, "manifest id")
        name = manifest_id + SPENT_SUFFIX
        if not self._dir.exists(name):
            return None
        try:
            data = self._dir.read_small(name, missing_ok=True)
            obj = json.loads(data or b"{}")
            t = obj.get("spent") if isinstance(obj, dict) else None
            return t if isinstance(t, int) and not isinstance(t, bool) else 0
        except (StoreError, ValueError):
            return 0

    def mark_spent(self, manifest_id: str, now: Optional[int] = None) -> None:
        """Record durably that *manifest_id*'s token was used.  Atomic test-and-set.

        Raises:
            StoreError: already spent (``FileExistsError`` from the link), or I/O.
        """
        _check_id(manifest_id, "manifest id")
        stamp = int(time.time() if now is None else now)
        body = json.dumps({"spent": stamp}, separators=(",", ":")).encode()
        with self._dir.locked(LOCK_NAME, exclusive=False):
            self._dir.write_atomic(manifest_id + SPENT_SUFFIX, body, replace=False)

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
                out.append(Entry(mid, self.manifest(mid), spent_at is not None, spent_at))
            except StoreError as exc:
                out.append(Entry(mid, None, spent_at is not None, spent_at, problem=exc.message))
        out.sort(key=lambda e: (e.manifest.created if e.manifest else 0, e.id))
        return out

    # ------------------------------------------------------------------ cleaning
    def gc(self, retention: int, now: Optional[float] = None, *,
           domain_uuid: Optional[str] = None) -> "GcReport":
        """Remove what is no longer needed (see :func:`.gc.collect`)."""
        from .gc import collect  # gc imports this module
        return collect(self, retention, now, domain_uuid=domain_uuid)


class StateWriter:
    """Streams one device state into the store: constant memory, hashed on the fly.

    Use as a context manager: leaving the block by an exception aborts (the temp file
    is removed); leaving it without ``commit`` aborts too.  After ``commit`` or
    ``abort`` the writer is closed.
    """

    def __init__(self, store: Store, meta: StateMeta, created: Optional[int]) -> None:
        self._store = store
        self.meta = meta
        self._created = created
        self._hash = hashlib.sha256()
        self.length = 0
        self._advised = 0
        self._fd: Optional[int]
        self._fd, self._temp = store._new_temp()
        self.manifest: Optional[Manifest] = None
        #: a verified source signature to record in the manifest (set before commit; issue 8)
        self.signature: Optional[str] = None
        self.signer: Optional[str] = None

    @property
    def temp_name(self) -> str:
        """Name of the in-progress file (for tests and diagnostics)."""
        return self._temp

    def write(self, data: Buffer) -> int:
        """Append *data* (bytes or a memoryview span; not copied).

        Raises:
            StoreError: ENOSPC, EFBIG, EIO...; the writer is then aborted.
            UsageError: the writer is already committed or aborted.
        """
        if self._fd is None:
            raise UsageError("write on a state writer that is already closed")
        try:
            n = write_all(self._fd, data, self._store.dir.describe(self._temp))
        except BaseException:
            self.abort()
            raise
        self._hash.update(data)
        self.length += n
        if self.length - self._advised >= WRITEBACK_STEP:
            self._start_writeback()
        return n

    def hexdigest(self) -> str:
        """SHA-256 of what was written so far (signature checks before the commit)."""
        return self._hash.hexdigest()

    def _start_writeback(self) -> None:
        """Start writing dirty pages now and drop the ones already on disk, so the
        fsync in :meth:`commit` has little left to do and a multi-GiB state does not
        evict the page cache.  Best effort: an fadvise failure changes nothing else."""
        assert self._fd is not None
        start = max(0, self._advised - WRITEBACK_STEP)
        try:
            os.posix_fadvise(self._fd, start, self.length - start, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass
        self._advised = self.length

    def commit(self) -> Manifest:
        """fsync, rename into place, write the manifest.  Returns the manifest
        (``manifest.id`` names the token; see :func:`.tokens.issue_token`).

        Raises:
            StoreError: I/O failure; nothing is left that a reader accepts.
        """
        if self._fd is None:
            raise UsageError("commit on a state writer that is already closed")
        digest = self._hash.hexdigest()
        created = int(time.time()) if self._created is None else self._created
        m = Manifest.build(self.meta, length=self.length, sha256=digest, created=created,
                           signature=self.signature, signer=self.signer)
        fd, self._fd = self._fd, None
        try:
            self._store._commit(fd, self._temp, digest, m)
        except BaseException:
            # commit_temp removed the temp; a state renamed without its manifest is
            # unreachable and removed by gc.
            self._store.dir.unlink(self._temp, missing_ok=True)
            raise
        self.manifest = m
        return m

    def abort(self) -> None:
        """Drop the temp file.  Safe to call twice or after commit (then a no-op)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            self._store.dir.discard_temp(fd, self._temp)

    def __enter__(self) -> "StateWriter":
        return self

    def __exit__(self, et: Optional[type[BaseException]], ev: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        self.abort()

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            try:
                self.abort()
            except Exception:  # noqa: BLE001 - interpreter shutdown; gc cleans up
                pass


__all__ = ["Store", "StateWriter", "Entry", "StateMeta", "Manifest"]
