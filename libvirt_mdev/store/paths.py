"""The rules every checked file obeys, and the only two places a *path* is resolved.

The rules (why: :mod:`.acl`): names from a fixed alphabet, files 0600 and directories
0700 owned by the expected uid, ``O_NOFOLLOW | O_CLOEXEC`` on every open.  A path is
resolved only to open a trusted directory (:func:`open_checked_dir`, the anchor of a
:class:`.acl.SecureDir`, which opens everything else relative to its fd) and to read
a protected file an admin names (:func:`read_protected_file`: a trusted public key).
Files a user names for output are :mod:`.output`'s.
"""
from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path

from ..errors import StoreAccessError

#: The only names we ever open: letters, digits, ``.``, ``_``, ``-``; 1..200 chars.
#: (``.`` and ``..`` are refused separately.)  No ``/``, NUL, newline or space.
NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,200}\Z")
#: Prefix of in-progress files.  Readers never accept a name with this prefix.
TEMP_PREFIX = ".tmp-"
FILE_MODE = 0o600
DIR_MODE = 0o700
#: Manifests, pending records and markers are small; refuse to read anything bigger.
MAX_SMALL_FILE = 1 << 20
#: flags of every open: never through a symlink, never inherited by a child
OPEN_BASE = os.O_NOFOLLOW | os.O_CLOEXEC

PathArg = str | os.PathLike[str]


def validate_name(name: object, what: str = "file name") -> str:
    """Return *name* if it is a plain name from the allowed alphabet.

    Raises:
        StoreAccessError: anything else (separators, ``..``, NUL, newline, empty,
            too long, not a string).
    """
    if not isinstance(name, str) or not NAME_RE.match(name) or name in (".", ".."):
        raise StoreAccessError(
            f"refusing {what} {name!r}: only plain names of letters, digits, '.', '_' "
            f"and '-' are allowed (no '/', '..', NUL or newline)")
    return name


def mode_text(mode: int) -> str:
    """``0640``: the permission bits of *mode* as chmod takes them."""
    return f"{stat.S_IMODE(mode):04o}"


def open_checked_dir(path: PathArg, *, create: bool = False, uid: int = 0,
                     what: str = "store") -> tuple[Path, int]:
    """Open directory *path* (absolute) and return it with its fd, checking it is a
    real directory (not a symlink), owned by *uid*, mode exactly 0700.  With
    *create*, make it (0700, owner *uid*) when it does not exist; its parent must exist.

    Raises:
        StoreAccessError: missing (without *create*), symlink, not a directory,
            wrong owner or mode, or an OS error opening it.
    """
    p = Path(path)
    if not p.is_absolute():
        p = Path.cwd() / p
    if create:
        _create_dir(p, uid, what)
    fd = _open_dir_fd(p, what)
    try:
        st = os.fstat(fd)
        _check_kind_and_owner(st, p, f"{what} directory", uid)
        if stat.S_IMODE(st.st_mode) != DIR_MODE:
            raise StoreAccessError(f"{what} directory {p} has mode {mode_text(st.st_mode)}, expected 0700; "
                                   f"fix with: chmod 0700 {p}")
    except BaseException:
        os.close(fd)
        raise
    return p, fd


def _check_kind_and_owner(st: os.stat_result, p: PathArg, label: str, uid: int) -> None:
    """A directory (for a *label* ending in "directory") or else a regular file, owned by *uid*.

    Raises:
        StoreAccessError: naming *label* *p* and the fix.
    """
    want_dir = label.endswith("directory")
    if not (stat.S_ISDIR if want_dir else stat.S_ISREG)(st.st_mode):
        raise StoreAccessError(f"{label} {p} is not a {'directory' if want_dir else 'regular file'}")
    if st.st_uid != uid:
        raise StoreAccessError(f"{label} {p} is owned by uid {st.st_uid}, expected uid {uid}; "
                               f"fix with: chown {uid} {p}")


def _create_dir(p: Path, uid: int, what: str) -> None:
    """mkdir *p* 0700 owned by *uid*; an existing one is left to the caller's checks."""
    if not os.path.lexists(p) and os.geteuid() != uid:
        # it would be ours, not uid's: only root can give it away (issue 12)
        raise StoreAccessError(
            f"cannot create {what} directory {p} as uid {os.geteuid()}: it must be owned by uid {uid}; "
            f"run as root, or have root create it: install -d -m 0700 -o {uid} {p}")
    try:
        os.mkdir(p, DIR_MODE)
    except FileExistsError:
        return  # checked by the caller exactly like a pre-existing directory
    except OSError as exc:
        raise StoreAccessError(f"cannot create {what} directory {p}: {exc.strerror}") from None
    # mkdir obeys the umask and creates with our euid: set both explicitly,
    # through an fd so a racing rename cannot redirect the change.
    fd = _open_dir_fd(p, what)
    try:
        os.fchmod(fd, DIR_MODE)
        if os.fstat(fd).st_uid != uid:
            os.fchown(fd, uid, -1)
    except OSError as exc:
        raise StoreAccessError(f"cannot give {what} directory {p} owner uid {uid} and mode 0700: "
                               f"{exc.strerror}; run as root") from None
    finally:
        os.close(fd)


def _open_dir_fd(p: Path, what: str) -> int:
    try:
        return os.open(p, os.O_RDONLY | os.O_DIRECTORY | OPEN_BASE)
    except FileNotFoundError:
        raise StoreAccessError(f"{what} directory {p} does not exist "
                               f"(create it with mode 0700, owner root)") from None
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            # O_NOFOLLOW on the last component gives ELOOP for a symlink.
            if os.path.islink(p):
                raise StoreAccessError(f"{what} directory {p} is a symlink; refusing to follow it") from None
            raise StoreAccessError(f"{what} {p} is not a directory") from None
        raise StoreAccessError(f"cannot open {what} directory {p}: {exc.strerror}") from None


def read_protected_file(path: PathArg, *, uid: int = 0, what: str = "file", limit: int = MAX_SMALL_FILE) -> bytes:
    """Read a small configuration-like file that decides what we trust (a trusted
    public key): never through a symlink, a regular file owned by *uid* that neither
    group nor others may write.  (It may be world-readable: public keys are not secret.)

    Raises:
        StoreAccessError: missing, symlink, not regular, wrong owner, writable by others,
            larger than *limit*.
    """
    p = os.fspath(path)
    try:
        fd = os.open(p, os.O_RDONLY | OPEN_BASE | os.O_NONBLOCK)
    except FileNotFoundError:
        raise StoreAccessError(f"{what} {p} does not exist") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise StoreAccessError(f"{what} {p} is a symlink; refusing to follow it") from None
        raise StoreAccessError(f"cannot open {what} {p}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        _check_kind_and_owner(st, p, what, uid)
        if st.st_mode & 0o022:
            raise StoreAccessError(f"{what} {p} has mode {mode_text(st.st_mode)}: others may "
                                   f"change it; fix with: chmod go-w {p}")
        if st.st_size > limit:
            raise StoreAccessError(f"{what} {p} is larger than {limit} bytes")
        data = os.read(fd, limit + 1)
        if len(data) > limit:
            raise StoreAccessError(f"{what} {p} is larger than {limit} bytes")
        return data
    finally:
        os.close(fd)
