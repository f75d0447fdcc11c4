"""Restore permits: ``virsh restore`` admits only a save image that libvirt-mdev verified.

Why a permit (issue 11 item 4): at ``restore begin`` the hook gets the domain XML from
the image — which the image's author controls — and nothing else.  So a verifying
``libvirt-mdev splice`` (every device state stored, re-hashed and, with
``require_signature``, its source signature verified) leaves a *permit*: a root-only
file under ``<runtime_dir>/permits/`` naming the domain uuid and the exact output file
it wrote: ``st_dev``, ``st_ino``, size, ``mtime_ns`` and ``ctime_ns`` (the inode change
time, which no user can set and every write or rename updates), plus the SHA-256
computed while writing it, and a short validity (:data:`PERMIT_TTL`).

How the hook finds the image: libvirtd opens the image *before* it runs the
``restore begin`` hook and keeps it open (measured on libvirt 9.0: the file is an
open read-only fd of libvirtd while the hook runs; with ``--bypass-cache`` an
iohelper child reads it).  :func:`admit_restore` therefore looks at the files open in
libvirtd (``/proc/<pid>/fd``) and in its children, and admits the restore only when
one of them is the very inode a valid, unspent permit for that domain names,
unchanged.  The permit is spent (removed) on use: one verification, one restore.
A path would not do: libvirt may be handed a symlink, a bind mount or a file that
was swapped after the splice; the open inode is what QEMU will read.
"""
from __future__ import annotations

import json
import os
import secrets
import stat
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import MdevError, StoreError
from .acl import SecureDir
from .manifest import is_uuid

#: seconds a permit is valid: splice right before restore
PERMIT_TTL = 900
PERMIT_DIR = "permits"
PERMIT_SUFFIX = ".permit"
#: how many open files of libvirtd (and children) we look at, at most
MAX_FDS = 65536


class RestoreNotVerified(MdevError):
    """``virsh restore`` of an image libvirt-mdev did not verify (no valid permit)."""

    exit_code = 1
    kind = "restore-not-verified"


@dataclass(frozen=True)
class FileId:
    """What identifies one version of one file (see the module docstring)."""

    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileId:
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True)
class Permit:
    domain_uuid: str
    file: FileId
    sha256: str
    path: str
    created: int
    expires: int
    #: key id of the verified source signature (None: spliced without signatures)
    signer: str | None = None

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Permit:
        obj = json.loads(data)
        return cls(domain_uuid=obj["domain_uuid"], file=FileId(**obj["file"]), sha256=obj["sha256"],
                   path=obj["path"], created=int(obj["created"]), expires=int(obj["expires"]),
                   signer=obj.get("signer"))


def _runtime_dir(where: Any) -> Path:
    """*where* is a Config (its ``runtime_dir``) or a directory path."""
    return Path(getattr(where, "runtime_dir", where))


def _open_dir(where: Any, create: bool) -> SecureDir:
    root = _runtime_dir(where)
    if create:
        try:
            root.mkdir(mode=0o755, parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create runtime directory {root} for restore permits: {exc.strerror}") from None
    return SecureDir.open(root / PERMIT_DIR, create=create, what="restore permit")


def write_permit(where: Any, domain_uuid: str, path: str | os.PathLike[str], sha256: str, *,
                 signer: str | None = None, ttl: int = PERMIT_TTL,
                 now: float | None = None) -> Permit:
    """Write a permit for the file at *path* (a regular file, not a symlink) as it is now.

    Raises:
        StoreError: *path* is not a regular file; the permit directory is unsafe.
    """
    if not is_uuid(domain_uuid):
        raise StoreError(f"cannot write a restore permit: domain uuid {domain_uuid!r} is not a lowercase UUID")
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise StoreError(f"cannot write a restore permit for {os.fspath(path)}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise StoreError(f"{os.fspath(path)} is not a regular file; no restore permit written")
    t = int(time.time() if now is None else now)
    permit = Permit(domain_uuid, FileId.of(st), sha256, os.path.abspath(path), t, t + ttl, signer)
    with _open_dir(where, create=True) as d:
        d.write_atomic(f"{domain_uuid}.{secrets.token_hex(8)}{PERMIT_SUFFIX}", permit.to_json())
    return permit


def open_files(pid: int, proc: Path = Path("/proc")) -> Iterator[tuple[int, FileId]]:
    """(pid, file identity) of every regular file open in *pid* and its child processes."""
    pids = [pid]
    try:
        for task in os.listdir(proc / str(pid) / "task"):
            try:
                pids += [int(c) for c in (proc / str(pid) / "task" / task / "children").read_text().split()]
            except OSError:
                continue
    except OSError:
        pass
    seen = 0
    for p in pids:
        fddir = proc / str(p) / "fd"
        try:
            fds = os.listdir(fddir)
        except OSError:
            continue
        for fd in fds:
            seen += 1
            if seen > MAX_FDS:
                return
            try:
                st = os.stat(fddir / fd)  # follows the magic link to the open file itself
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                yield p, FileId.of(st)


def _how_to_verify(domain_uuid: str) -> str:
    return (f"restore of domain {domain_uuid} refused: the save image was not verified by libvirt-mdev "
            f"(or its permit expired or was used); verify it first with 'libvirt-mdev splice IMAGE "
            f"VERIFIED' and restore VERIFIED within {PERMIT_TTL // 60} minutes")


def admit_restore(where: Any, domain_uuid: str, libvirtd_pid: int, *, now: float | None = None,
                  require_signer: bool | None = None, proc: Path = Path("/proc")) -> Permit:
    """Admit a ``virsh restore`` (``restore begin`` hook): spend the permit whose file
    libvirtd (or its iohelper child) has open, or refuse.

    *where* is the Config (``runtime_dir``; ``require_signature`` decides whether the
    permit must come from a signature-verifying splice, unless *require_signer* says)
    or the runtime directory.

    Returns:
        The permit spent.
    Raises:
        RestoreNotVerified: no open file of libvirtd matches a valid unspent permit for
            *domain_uuid* (one line saying how to verify the image).
    """
    if require_signer is None:
        require_signer = bool(getattr(where, "require_signature", False))
    t = time.time() if now is None else now
    try:
        d = _open_dir(where, create=False)
    except StoreError:
        raise RestoreNotVerified(_how_to_verify(domain_uuid)) from None
    with d:
        permits: dict[FileId, tuple[str, Permit]] = {}
        for name in d.listdir():
            if not (name.startswith(domain_uuid + ".") and name.endswith(PERMIT_SUFFIX)):
                continue
            try:
                p = Permit.from_json(d.read_small(name, missing_ok=True) or b"")
            except (StoreError, ValueError, KeyError, TypeError):
                continue
            if p.expires < t:
                d.unlink(name, missing_ok=True)  # expired: never admits again
                continue
            if p.domain_uuid == domain_uuid and (p.signer is not None or not require_signer):
                permits[p.file] = (name, p)
        if permits:
            for _pid, fid in open_files(libvirtd_pid, proc):
                hit = permits.get(fid)
                # unlinking is the atomic test-and-set: of two restores only one spends it
                if hit is not None and d.unlink(hit[0], missing_ok=True):
                    return hit[1]
    raise RestoreNotVerified(_how_to_verify(domain_uuid))


__all__ = [
    "PERMIT_TTL",
    "FileId",
    "Permit",
    "RestoreNotVerified",
    "admit_restore",
    "open_files",
    "write_permit",
]
