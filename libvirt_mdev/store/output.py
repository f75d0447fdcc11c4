"""Where the CLI writes what a user asked for: the loader's sink and stripped/spliced streams.

Split from :mod:`.acl` (which guards the store's own files): these are paths a user
names on the command line.  A regular file is replaced atomically (:class:`AtomicOutput`);
the rules for what a named output may be live here too, so that the one place that
creates user-named files is the one place to audit.  :func:`open_output` picks the kind:

* a new name or a regular file: :class:`AtomicOutput` (temp file, then rename);
* ``-``, a FIFO, a character or block device: :class:`DirectOutput`, written in place.
  Never a rename over them: ``splice IN /dev/null`` as root once turned the host's
  ``/dev/null`` into a regular file;
* a symlink: written through only when its target is such a non-regular file (e.g.
  ``/dev/stdout``); a symlink to a regular file, a missing file or a directory is
  refused — renaming over it would replace the link, writing through it would bypass
  the atomic replacement — so link and target stay what they were;
* a directory or a socket: refused.

A direct output cannot be taken back: bytes already written stay written when the
stream is refused later (a reader of a FIFO or stdout must check the exit status).
"""
from __future__ import annotations

import errno
import fcntl
import io
import os
import stat
import sys
from typing import BinaryIO, Self

from ..errors import StoreAccessError, StoreError, UsageError
from .acl import lock_fd, write_all
from .paths import FILE_MODE, OPEN_BASE


def open_sink(path: str | os.PathLike[str]) -> int:
    """Open the loader's delivery sink (a file or a sysfs attribute named by the
    operator) for writing: never through a symlink as the last component, created
    0600 when missing, truncated.

    Raises:
        StoreError: cannot open it (missing directory, symlink, permissions...).
    """
    p = os.fspath(path)
    try:
        return os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | OPEN_BASE, FILE_MODE)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StoreAccessError(f"sink {p} is a symlink; refusing to follow it") from None
        raise StoreError(f"cannot open sink {p}: {exc.strerror}") from None



def _remove_stale_outputs(directory: str, prefix: str, mine: str) -> None:
    """Unlink ``prefix*`` temp files in *directory* whose writer is gone (no flock held)."""
    try:
        names = [n for n in os.listdir(directory) if n.startswith(prefix) and n != mine]
    except OSError:
        return
    for name in names:
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDONLY | OPEN_BASE)
        except OSError:
            continue  # a symlink or gone: not ours to touch
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                continue  # a live writer holds it
            os.unlink(path)
        finally:
            os.close(fd)


class _CommitOnExit:
    """Both outputs: leaving the ``with`` block normally commits, by an exception aborts."""

    def commit(self) -> None:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, et: object, ev: object, tb: object) -> None:
        if et is not None:
            self.abort()
        else:
            self.commit()


class AtomicOutput(_CommitOnExit):
    """An output file (a stripped or spliced stream) that appears only when complete.

    Written to ``.<name>.tmp-<random>`` beside *path* (0600, O_EXCL, no-follow, held
    under an flock while written), then fsync'd and renamed over *path* by
    :meth:`commit`; :meth:`abort` (or leaving the ``with`` block by an exception)
    removes the temp file.  So a failed or killed run never leaves a half-written stream
    under the requested name, and the temp files of killed runs (unlocked) are removed
    by the next run that writes the same name.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(self.path))
        base = os.path.basename(self.path)
        if not base or base in (".", ".."):
            raise StoreError(f"output {self.path!r} is not a file name")
        prefix = f".{base}.tmp-"
        self._temp = os.path.join(directory, prefix + os.urandom(6).hex())
        try:
            self.fd: int | None = os.open(self._temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | OPEN_BASE,
                                             FILE_MODE)
        except OSError as exc:
            raise StoreError(f"cannot create output in {directory}: {exc.strerror}") from None
        lock_fd(self.fd)
        self.file = os.fdopen(self.fd, "wb", buffering=0, closefd=False)
        _remove_stale_outputs(directory, prefix, os.path.basename(self._temp))

    def write(self, data: bytes | bytearray | memoryview) -> int:
        assert self.fd is not None
        return write_all(self.fd, data, self.path)

    def commit(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(self._temp, self.path)
        dfd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    def abort(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
            try:
                os.unlink(self._temp)
            except FileNotFoundError:
                pass


class DirectOutput(_CommitOnExit):
    """``-`` or a non-regular target (FIFO, character/block device), written in place.

    Same interface as :class:`AtomicOutput`; :meth:`commit` only flushes and closes (a
    device or pipe has nothing to rename), :meth:`abort` only closes.
    """

    def __init__(self, path: str, fd: int | None = None, stream: BinaryIO | None = None) -> None:
        self.path = path
        self._fd, self._stream = fd, stream

    @classmethod
    def stdout(cls) -> DirectOutput:
        """``-``: the process's stdout (its fd when it has one; else the Python stream,
        e.g. under a test runner that captures it)."""
        try:
            sys.stdout.flush()
            return cls("-", fd=sys.stdout.fileno())
        except (AttributeError, ValueError, io.UnsupportedOperation):
            return cls("-", stream=sys.stdout.buffer)

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self._stream is not None:
            self._stream.write(data)
            return len(data)
        assert self._fd is not None
        return write_all(self._fd, data, self.path)

    def commit(self) -> None:
        if self._stream is not None:
            self._stream.flush()
        self._close()

    def abort(self) -> None:
        self._close()

    def _close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None and self.path != "-":
            os.close(fd)


Output = AtomicOutput | DirectOutput
_DIRECT = (stat.S_ISFIFO, stat.S_ISCHR, stat.S_ISBLK)


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISREG(mode):
        return "a regular file"
    return "a special file"


def open_output(path: str | os.PathLike[str]) -> Output:
    """The right kind of output for the user-named *path* (see the module docstring).
    Opens it now, before any work is done, so a bad OUT fails first.

    Raises:
        UsageError: OUT is a directory, a socket, or a symlink that is not to a device or FIFO.
        StoreError: it cannot be opened or created.
    """
    p = os.fspath(path)
    if p == "-":
        return DirectOutput.stdout()
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        return AtomicOutput(p)
    except OSError as exc:
        raise StoreError(f"cannot use output {p}: {exc.strerror}") from None
    follow = stat.S_ISLNK(st.st_mode)
    if follow:
        try:
            target = os.stat(p)
        except OSError:
            raise UsageError(f"output {p} is a symbolic link to a missing file: refusing to replace the link; "
                             f"name the file itself") from None
        if not any(f(target.st_mode) for f in _DIRECT):
            raise UsageError(f"output {p} is a symbolic link to {_kind(target.st_mode)} ({os.path.realpath(p)}): "
                             f"refusing to replace the link or write through it; name the file itself")
    elif stat.S_ISREG(st.st_mode):
        return AtomicOutput(p)
    elif not any(f(st.st_mode) for f in _DIRECT):
        raise UsageError(f"output {p} is {_kind(st.st_mode)}; name a file, a FIFO, a device or '-'")
    flags = os.O_WRONLY | os.O_CLOEXEC | os.O_NOCTTY | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(p, flags)  # a FIFO blocks here until its reader opens it, like any writer's would
    except OSError as exc:
        raise StoreError(f"cannot open output {p}: {exc.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not any(f(mode) for f in _DIRECT):  # replaced between lstat and open: do not write into it
        os.close(fd)
        raise StoreError(f"output {p} changed while it was opened (now {_kind(mode)}); try again")
    return DirectOutput(p, fd=fd)


__all__ = ["AtomicOutput", "DirectOutput", "Output", "open_output", "open_sink"]
