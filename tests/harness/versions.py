"""What the QEMU and libvirt under test are, asked of the binaries themselves, never written into a test.

The suite runs against Debian 12's pair (QEMU 7.2, libvirt 9.0) and Debian 13's (QEMU 10.0, libvirt 11.3), see
docs/ci.md. A test that needs a versioned name (the machine type QEMU records in a stream, the
hook argument libvirt passes) asks here, so the same test holds on both and on whatever comes next.
"""
from __future__ import annotations

import functools
import re
import shutil
from typing import TYPE_CHECKING

from ._proc import HarnessError, run

if TYPE_CHECKING:
    from .libvirt_host import LibvirtHost

QEMU_BINARY = "/usr/bin/qemu-system-x86_64"
# libvirt passes the qemu hook's 4th argument ("extra") as "-" when it has nothing to say (docs/testing.md).
HOOK_NO_EXTRA = "-"


def _version(text: str, what: str) -> tuple[int, int, int]:
    match = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not match:
        raise HarnessError(f"cannot read a version of {what} from {text.strip()!r}")
    return int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)


@functools.cache
def qemu_version() -> tuple[int, int, int]:
    """(major, minor, micro) of the QEMU the harness starts, from `qemu-system-x86_64 --version`."""
    out = run([QEMU_BINARY, "--version"], timeout=30).stdout
    return _version(out.split("version", 1)[-1], QEMU_BINARY)


@functools.cache
def libvirt_version() -> tuple[int, int, int]:
    """(major, minor, micro) of the libvirtd the harness starts, from `libvirtd --version`."""
    libvirtd = shutil.which("libvirtd") or "/usr/sbin/libvirtd"
    out = run([libvirtd, "--version"], timeout=30).stdout
    return _version(out.rsplit(" ", 1)[-1], libvirtd)


@functools.cache
def machine_types() -> dict[str, str]:
    """Every machine type QEMU offers, alias -> concrete versioned type (e.g. "pc" -> "pc-i440fx-10.0").

    Concrete types map to themselves, so machine_type("pc-q35-9.1") answers whether QEMU has it.
    """
    out = run([QEMU_BINARY, "-machine", "help"], timeout=30).stdout
    types: dict[str, str] = {}
    for line in out.splitlines()[1:]:
        fields = line.split()
        if not fields:
            continue
        alias = re.search(r"\(alias of ([^)]+)\)", line)
        types[fields[0]] = alias.group(1) if alias else fields[0]
    return types


def machine_type(name: str = "pc") -> str:
    """The concrete machine type QEMU records in a stream for `-M name` (e.g. "pc-i440fx-7.2" on QEMU 7.2).

    Streams carry the resolved name, so a test comparing a stream's machine type must compare with this.
    """
    types = machine_types()
    if name not in types:
        raise HarnessError(f"QEMU {'.'.join(map(str, qemu_version()))} has no machine type {name!r}")
    return types[name]


def hook_calls(log_text: str, domain: str) -> list[tuple[str, str, str]]:
    """(operation, sub-operation, extra) of every hook call for *domain* in a logging_hook() log, in order."""
    calls = []
    for line in log_text.splitlines():
        fields = line.split(" ")
        if len(fields) == 4 and fields[0] == domain:
            calls.append((fields[1], fields[2], fields[3]))
    return calls


def shutoff_reason(host: LibvirtHost, domain: str) -> str:
    """Why *domain* is shut off, as libvirt says it (`virsh domstate --reason`: "destroyed", "migrated", ...)."""
    out = host.virsh("domstate", "--reason", domain).stdout.strip()
    match = re.fullmatch(r"shut off \((.+)\)", out)
    if not match:
        raise HarnessError(f"host {host.name}: {domain} is not shut off with a reason: {out!r}")
    return match.group(1)


def release_extras(host: LibvirtHost, domain: str) -> tuple[str, str]:
    """What `release end` may carry as its 4th argument for *domain*, which must be shut off now.

    Older libvirt passes "-" (libvirt 9.0 passes nothing for any qemu operation); newer libvirt passes the shutoff
    reason (libvirt 11.3: "destroyed", "migrated"). Either is correct; any other word is not. Tests assert
    membership rather than asking for a version, so they hold on both targets and on the next.
    """
    return HOOK_NO_EXTRA, shutoff_reason(host, domain)
