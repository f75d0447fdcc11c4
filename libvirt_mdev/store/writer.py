"""Storing one device state: streamed, hashed on the fly, committed crash-safely.

Crash safety: a writer streams into a temp file it holds an exclusive flock on,
then (under the shared store lock) fsyncs, renames it to ``<sha256>.state``, writes
the manifest the same way, and fsyncs the directory (:func:`commit_state`).  A crash
at any point leaves at most a temp file (never accepted; gc removes it) or a state
without a manifest (not reachable by any token; gc removes it).  gc holds the store
lock exclusively, so it never sees a commit half done, and skips temp files whose
writer is alive (locked).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from types import TracebackType
from typing import Self

from ..errors import UsageError
from .acl import SecureDir, lock_fd, write_all
from .layout import HOLD_SUFFIX, LOCK_NAME, MANIFEST_SUFFIX, STATE_SUFFIX
from .manifest import Manifest, StateMeta
from .streams import StreamTxn

#: how often a writer kicks off writeback of what it wrote (see StateWriter._start_writeback)
WRITEBACK_STEP = 32 << 20

Buffer = bytes | bytearray | memoryview


def new_temp(d: SecureDir) -> tuple[int, str]:
    """A fresh ``.tmp-*.state`` file, flocked so gc knows a live writer owns it."""
    with d.locked(LOCK_NAME, exclusive=False):
        fd, name = d.create_temp(STATE_SUFFIX)
        lock_fd(fd)
        return fd, name


def commit_state(d: SecureDir, fd: int, temp: str, manifest: Manifest, stream: StreamTxn | None = None) -> None:
    """Rename the state into place and write its manifest, atomically w.r.t. gc.

    With *stream*, the hold marker is written first: there is no instant at which
    the manifest exists and the state is loadable before the stream is accepted.
    """
    with d.locked(LOCK_NAME, exclusive=False):
        if stream is not None:
            stream.ensure_record()
            d.write_atomic(manifest.id + HOLD_SUFFIX, json.dumps({"stream": stream.id}).encode())
        # Replacing an existing state of the same content is harmless and also
        # repairs one that was damaged.
        d.commit_temp(fd, temp, manifest.state_name, replace=True)
        d.write_atomic(manifest.id + MANIFEST_SUFFIX, manifest.to_json())


class StateWriter:
    """Streams one device state into the store: constant memory, hashed on the fly.

    Use as a context manager: leaving the block by an exception aborts (the temp file
    is removed); leaving it without ``commit`` aborts too.  After ``commit`` or
    ``abort`` the writer is closed.
    """

    def __init__(self, d: SecureDir, meta: StateMeta, created: int | None,
                 stream: StreamTxn | None = None) -> None:
        self._dir = d
        self._stream = stream
        self.meta = meta
        self._created = created
        self._hash = hashlib.sha256()
        self.length = 0
        self._advised = 0
        self._fd: int | None
        self._fd, self._temp = new_temp(d)
        self.manifest: Manifest | None = None
        #: a verified source signature to record in the manifest (set before commit; issue 8)
        self.signature: str | None = None
        self.signer: str | None = None

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
            n = write_all(self._fd, data, self._dir.describe(self._temp))
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
        with contextlib.suppress(OSError):  # advice only
            os.posix_fadvise(self._fd, start, self.length - start, os.POSIX_FADV_DONTNEED)
        self._advised = self.length

    def commit(self) -> Manifest:
        """fsync, rename into place, write the manifest.  Returns the manifest
        (``manifest.id`` names the token; see :func:`.tokens.issue_token`).

        Raises:
            StoreError: I/O failure; nothing is left that a reader accepts.
        """
        if self._fd is None:
            raise UsageError("commit on a state writer that is already closed")
        created = int(time.time()) if self._created is None else self._created
        m = Manifest.build(self.meta, length=self.length, sha256=self._hash.hexdigest(), created=created,
                           signature=self.signature, signer=self.signer)
        fd, self._fd = self._fd, None
        try:
            commit_state(self._dir, fd, self._temp, m, self._stream)
        except BaseException:
            # commit_temp removed the temp; a state renamed without its manifest is
            # unreachable and removed by gc.
            self._dir.unlink(self._temp, missing_ok=True)
            raise
        self.manifest = m
        return m

    def abort(self) -> None:
        """Drop the temp file.  Safe to call twice or after commit (then a no-op)."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            self._dir.discard_temp(fd, self._temp)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.abort()

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            with contextlib.suppress(Exception):  # interpreter shutdown: gc cleans up
                self.abort()
