"""Every path- and permission-sensitive file operation of libvirt-mdev, in one place.

Why one place: the trusted store (and the hook's pending records) must be safe
against a local attacker who can plant symlinks, hard links or files with the wrong
owner or mode anywhere they can write.  Auditing that is only feasible if *all* such
code lives here: this module (:class:`SecureDir`, every operation relative to a held
directory fd) and :mod:`.paths` (the rules' constants and the only two opens by
path).  Files a user names for output are :mod:`.output`'s.  The rules, applied
without exception:

* A directory is opened once (``O_DIRECTORY | O_NOFOLLOW``) and held as a file
  descriptor; every file is opened *relative to that fd* (``dir_fd=``), with
  ``O_NOFOLLOW | O_CLOEXEC``.  No path is ever joined and re-resolved.
* Names come from a fixed alphabet (:data:`NAME_RE`): no separators, no ``..``, no
  NUL or newline, nothing absolute.  A bad name is refused before any syscall.
* After every open, ``fstat`` on the fd: regular file, owned by the expected uid,
  mode exactly 0600 (0700 for the directory), exactly one link (a hard link to a
  file elsewhere would otherwise pass every other check).
* New files are written under a unique temp name (``O_CREAT | O_EXCL``, 0600),
  ``fsync``-ed, renamed into place relative to the dir fd, and the directory is
  ``fsync``-ed: a crash leaves either nothing or a temp file, never a half-written
  file under a final name.

Any failure is a :class:`~libvirt_mdev.errors.StoreAccessError` naming the file and
what was wrong.  Any other exception escaping from here is a bug.
"""
from __future__ import annotations

import errno
import fcntl
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from ..errors import InternalError, StoreAccessError, StoreError
from .paths import (
    DIR_MODE,
    FILE_MODE,
    MAX_SMALL_FILE,
    NAME_RE,
    OPEN_BASE,
    TEMP_PREFIX,
    PathArg,
    mode_text,
    open_checked_dir,
    read_protected_file,
    validate_name,
)


@dataclass
class SecureDir:
    """An open, checked directory: the anchor of every file operation.

    Use :meth:`open`; close with :meth:`close` or as a
    context manager.  ``uid`` is the owner every file must have (root in production).
    """

    path: Path
    fd: int
    uid: int = 0
    _closed: bool = field(default=False, repr=False)

    # ----------------------------------------------------------------- open / create
    @classmethod
    def open(cls, path: PathArg, *, create: bool = False, uid: int = 0, what: str = "store") -> SecureDir:
        """Open directory *path* (:func:`.paths.open_checked_dir`: a real directory,
        owner *uid*, mode 0700; with *create*, made so when missing).

        Raises:
            StoreAccessError: missing, symlink, not a directory, wrong owner or mode.
        """
        p, fd = open_checked_dir(path, create=create, uid=uid, what=what)
        return cls(path=p, fd=fd, uid=uid)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ checking
    def describe(self, name: str) -> str:
        """The path of *name* for messages (never used to open anything)."""
        return str(self.path / name)

    def open_error(self, name: str, exc: OSError) -> StoreAccessError:
        """The one-line refusal for a failed open of *name* (a symlink, or the OS's reason)."""
        if exc.errno == errno.ELOOP:
            return StoreAccessError(f"{self.describe(name)} is a symlink; refusing to follow it")
        return StoreAccessError(f"cannot open {self.describe(name)}: {exc.strerror}")

    def check_fd(self, fd: int, name: str) -> os.stat_result:
        """The checks every opened file must pass: regular, owner, 0600, one link.

        Raises:
            StoreAccessError: naming the file and the first check it failed.
        """
        st = os.fstat(fd)
        where = self.describe(name)
        if not stat.S_ISREG(st.st_mode):
            raise StoreAccessError(f"{where} is not a regular file")
        if st.st_uid != self.uid:
            raise StoreAccessError(f"{where} is owned by uid {st.st_uid}, expected uid {self.uid}")
        if stat.S_IMODE(st.st_mode) != FILE_MODE:
            raise StoreAccessError(f"{where} has mode {mode_text(st.st_mode)}, expected 0600")
        if st.st_nlink != 1:
            raise StoreAccessError(f"{where} has {st.st_nlink} hard links, expected 1 "
                                   f"(a hard link may point at a file outside the store)")
        return st

    # ------------------------------------------------------------------- reading
    def open_read(self, name: str, *, missing_ok: bool = False) -> int | None:
        """Open *name* read-only and return a checked fd (caller closes it).

        Returns None when the file does not exist and *missing_ok* is set.

        Raises:
            StoreAccessError: bad name, symlink, not regular, wrong owner/mode/links.
            StoreError: the file does not exist (without *missing_ok*).
        """
        validate_name(name)
        try:
            fd = os.open(name, os.O_RDONLY | OPEN_BASE | os.O_NONBLOCK, dir_fd=self.fd)
        except FileNotFoundError:
            if missing_ok:
                return None
            raise StoreError(f"{self.describe(name)} does not exist") from None
        except OSError as exc:
            raise self.open_error(name, exc) from None
        try:
            self.check_fd(fd, name)
            # O_NONBLOCK only guarded against a planted FIFO blocking the open.
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def read_small(self, name: str, *, missing_ok: bool = False,
                   limit: int = MAX_SMALL_FILE) -> bytes | None:
        """The whole content of a small checked file (manifest, record, marker)."""
        fd = self.open_read(name, missing_ok=missing_ok)
        if fd is None:
            return None
        try:
            chunks = []
            total = 0
            while True:
                b = os.read(fd, 65536)
                if not b:
                    break
                total += len(b)
                if total > limit:
                    raise StoreAccessError(f"{self.describe(name)} is larger than {limit} bytes")
                chunks.append(b)
            return b"".join(chunks)
        finally:
            os.close(fd)

    def exists(self, name: str) -> bool:
        """Whether *name* exists (as anything: a symlink counts, so it gets refused later)."""
        validate_name(name)
        try:
            os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return False
        return True

    def lstat(self, name: str) -> os.stat_result | None:
        validate_name(name)
        try:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None

    def listdir(self) -> list[str]:
        """Names in the directory (sorted).  Names outside the alphabet are returned
        too, so callers can report them; they can never be opened."""
        return sorted(os.listdir(self.fd))

    # ------------------------------------------------------------------- writing
    def create_temp(self, suffix: str = "") -> tuple[int, str]:
        """Create a new, empty, exclusive temp file ``.tmp-<random><suffix>``, mode 0600.

        Returns (fd opened for writing, name).  The caller either :meth:`commit_temp`
        s it or :meth:`discard_temp` s it.
        """
        for _ in range(8):
            name = validate_name(f"{TEMP_PREFIX}{secrets.token_hex(16)}{suffix}")
            try:
                fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | OPEN_BASE,
                             FILE_MODE, dir_fd=self.fd)
            except FileExistsError:
                continue
            except OSError as exc:
                raise StoreError(f"cannot create a file in {self.path}: {exc.strerror}") from None
            try:
                os.fchmod(fd, FILE_MODE)  # the umask may have removed bits we do not want anyway
                if os.fstat(fd).st_uid != self.uid:
                    os.fchown(fd, self.uid, -1)
            except BaseException as exc:
                os.close(fd)
                self.unlink(name, missing_ok=True)
                if isinstance(exc, OSError):
                    raise StoreAccessError(f"cannot give a new file in {self.path} owner uid {self.uid}: "
                                           f"{exc.strerror}; run as root") from None
                raise
            return fd, name
        raise InternalError("could not find a free temp name in 8 tries")

    def commit_temp(self, fd: int, temp_name: str, final_name: str, *,
                    replace: bool = True) -> None:
        """fsync + close *fd*, rename *temp_name* to *final_name*, fsync the directory.

        With ``replace=False`` an existing *final_name* is an error (``FileExistsError``
        is turned into StoreError); the temp file is then removed.

        Raises:
            StoreError: any OS error (ENOSPC, EIO...); the temp file is removed.
        """
        validate_name(final_name)
        try:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            if replace:
                os.rename(temp_name, final_name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
            else:
                # link + unlink gives "fail if exists" atomically (rename cannot).
                os.link(temp_name, final_name, src_dir_fd=self.fd, dst_dir_fd=self.fd,
                        follow_symlinks=False)
                os.unlink(temp_name, dir_fd=self.fd)
            os.fsync(self.fd)
        except FileExistsError:
            self.unlink(temp_name, missing_ok=True)
            raise StoreError(f"{self.describe(final_name)} already exists") from None
        except OSError as exc:
            self.unlink(temp_name, missing_ok=True)
            raise StoreError(f"cannot store {self.describe(final_name)}: {exc.strerror}") from None

    def discard_temp(self, fd: int | None, temp_name: str) -> None:
        """Close and remove an uncommitted temp file (best effort, never raises OSError)."""
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass
        self.unlink(temp_name, missing_ok=True)

    def write_atomic(self, name: str, data: bytes, *, replace: bool = True) -> None:
        """Write a small file atomically (temp + fsync + rename + fsync dir)."""
        validate_name(name)
        fd, tmp = self.create_temp()
        try:
            write_all(fd, data, self.describe(name))
        except BaseException:
            self.discard_temp(fd, tmp)
            raise
        self.commit_temp(fd, tmp, name, replace=replace)

    def unlink(self, name: str, *, missing_ok: bool = False) -> bool:
        """Remove *name* (never follows anything: unlink acts on the entry itself).

        Returns whether something was removed.
        """
        validate_name(name)
        try:
            os.unlink(name, dir_fd=self.fd)
        except FileNotFoundError:
            if missing_ok:
                return False
            raise StoreError(f"{self.describe(name)} does not exist") from None
        except IsADirectoryError:
            raise StoreAccessError(f"{self.describe(name)} is a directory") from None
        except OSError as exc:
            if missing_ok and exc.errno == errno.ENOENT:
                return False
            raise StoreError(f"cannot remove {self.describe(name)}: {exc.strerror}") from None
        return True

    def sync(self) -> None:
        """fsync the directory (after unlinks that must be durable)."""
        os.fsync(self.fd)

    # ------------------------------------------------------------------- locking
    @contextmanager
    def locked(self, name: str, *, exclusive: bool) -> Iterator[None]:
        """Hold ``flock`` on the lock file *name* (created 0600 on first use)."""
        validate_name(name)
        try:
            fd = os.open(name, os.O_RDWR | os.O_CREAT | OPEN_BASE, FILE_MODE, dir_fd=self.fd)
        except OSError as exc:
            raise self.open_error(name, exc) from None
        try:
            self.check_fd(fd, name)
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # releases the lock

    def try_lock_file(self, name: str) -> int | None:
        """Open *name* and take a non-blocking exclusive flock on it.

        Returns the fd (caller closes it, which releases the lock), or None when the
        file vanished or another process holds the lock (a live writer).  Used by gc
        to tell a crashed writer's temp file from one being written right now.
        """
        validate_name(name)
        try:
            fd = os.open(name, os.O_RDONLY | OPEN_BASE | os.O_NONBLOCK, dir_fd=self.fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                return -1  # a symlink: nothing to lock, the caller may unlink the entry
            raise StoreError(f"cannot open {self.describe(name)}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd


def lock_fd(fd: int) -> None:
    """Take an exclusive flock on a temp file we are writing (see :meth:`SecureDir.try_lock_file`)."""
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def write_all(fd: int, data: bytes | bytearray | memoryview, where: str) -> int:
    """Write all of *data* to *fd* (looping over short writes).

    Raises:
        StoreError: ENOSPC, EFBIG, EIO... named with *where*.
    """
    view = memoryview(data).cast("B") if not isinstance(data, bytes) else memoryview(data)
    total = len(view)
    done = 0
    try:
        while done < total:
            done += os.write(fd, view[done:])
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise StoreError(f"no space left on device while writing {where}; "
                             f"free space in the store and retry") from None
        if exc.errno == errno.EFBIG:
            raise StoreError(f"file size limit reached while writing {where}") from None
        raise StoreError(f"cannot write {where}: {exc.strerror}") from None
    return total


__all__ = ["DIR_MODE", "FILE_MODE", "MAX_SMALL_FILE", "NAME_RE", "TEMP_PREFIX", "SecureDir", "lock_fd",
           "read_protected_file", "validate_name", "write_all"]
