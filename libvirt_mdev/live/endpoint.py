"""Where the destination QEMU really listens, and whether each endpoint is guarded.

Split from :mod:`.guard` (which installs and checks the nftables rules and the socket
directory): this module reads the incoming QEMU's listening sockets from /proc and
decides, before the source sends a byte, whether a bypass is possible — for the hook at
``started begin`` (:func:`check_incoming_endpoint`, :func:`check_unarmed_incoming`) and
for the proxy on each connection (:func:`check_forward_endpoint`).  It never calls
libvirt (the hook would deadlock).
"""
from __future__ import annotations

import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import GuardError
from .guard import (
    FIX_INSTALL,
    LIBVIRT_SOCKET_DIRS,
    PortRanges,
    covers,
    guarded_ports,
    nft_guard,
    ranges_text,
    socket_dir_problem,
)

if TYPE_CHECKING:
    from ..config import Config


# --------------------------------------------------------------------------- /proc
@dataclass(frozen=True)
class Listener:
    """A listening socket of a process: TCP (``address``, ``port``) or UNIX (``path``)."""

    kind: str  # "tcp" | "unix"
    address: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        return f"[{self.address}]:{self.port}" if ":" in self.address else f"{self.address}:{self.port}"


def _hex_ip(text: str) -> str:
    """/proc/net/tcp{,6} addresses: 32-bit words in host (little-endian) byte order."""
    raw = bytes.fromhex(text)
    swapped = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(swapped))


def socket_inodes(pid: int) -> set[int]:
    out = set()
    fd_dir = f"/proc/{pid}/fd"
    for name in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{name}")
        except OSError:
            continue
        if target.startswith("socket:["):
            out.add(int(target[8:-1]))
    return out


def parse_proc_tcp(text: str, inodes: set[int]) -> list[Listener]:
    out = []
    for line in text.splitlines()[1:]:
        f = line.split()
        if len(f) < 10 or f[3] != "0A":  # 0A: TCP_LISTEN
            continue
        if int(f[9]) in inodes:
            addr, port = f[1].split(":")
            out.append(Listener("tcp", _hex_ip(addr), int(port, 16)))
    return out


def parse_proc_unix(text: str, inodes: set[int]) -> list[Listener]:
    out = []
    for line in text.splitlines()[1:]:
        f = line.split(None, 7)
        if len(f) < 7 or not int(f[3], 16) & 0x10000:  # __SO_ACCEPTCON: listening
            continue
        if int(f[6]) in inodes:
            out.append(Listener("unix", path=f[7].strip() if len(f) > 7 else "@"))
    return out


def listeners(pid: int) -> list[Listener]:
    """Every listening TCP/TCP6/UNIX socket process *pid* holds (in its own netns view)."""
    inodes = socket_inodes(pid)
    out: list[Listener] = []
    for name, parse in (("tcp", parse_proc_tcp), ("tcp6", parse_proc_tcp), ("unix", parse_proc_unix)):
        try:
            text = Path(f"/proc/{pid}/net/{name}").read_text()
        except FileNotFoundError:
            continue  # no IPv6 in this kernel
        out.extend(parse(text, inodes))
    return out


@dataclass(frozen=True)
class QemuProcess:
    pid: int
    incoming: bool


def find_qemu(config: Config, domain: str) -> QemuProcess:
    """The running QEMU of *domain*, from libvirt's pid file; checked to be a QEMU of
    that domain in this network namespace."""
    pid_file = config.qemu_run_dir / f"{domain}.pid"
    try:
        pid = int(pid_file.read_text().split()[0])
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        exe = os.readlink(f"/proc/{pid}/exe")
    except (OSError, ValueError, IndexError) as exc:
        raise GuardError(f"cannot find the QEMU of domain {domain} from {pid_file} "
                         f"({getattr(exc, 'strerror', None) or exc}); set qemu_run_dir in libvirt-mdev.conf") from None
    # QEMU's option syntax doubles commas inside a value: -name guest=a,,b for domain "a,b"
    name_opt = f"guest={domain.replace(',', ',,')}".encode()
    if "qemu" not in os.path.basename(exe) or not any(_names_guest(a, name_opt) for a in argv):
        raise GuardError(f"pid {pid} in {pid_file} is not the QEMU of domain {domain} ({exe})")
    if os.stat(f"/proc/{pid}/ns/net").st_ino != os.stat("/proc/self/ns/net").st_ino:
        raise GuardError(f"the QEMU of domain {domain} runs in another network namespace than libvirtd; "
                         f"the guard cannot cover it")
    return QemuProcess(pid, b"-incoming" in argv)


def _names_guest(arg: bytes, name_opt: bytes) -> bool:
    """Whether QEMU argument *arg* is ``guest=NAME`` exactly, maybe followed by more
    options (``,debug-threads=on``) — not a longer name that starts the same."""
    if not arg.startswith(name_opt):
        return False
    rest = arg[len(name_opt):]
    return rest == b"" or (rest.startswith(b",") and not rest.startswith(b",,"))


@dataclass(frozen=True)
class DeviceSockets:
    """Listening sockets libvirt sets up for the domain's devices (graphics, chardevs)."""

    tcp: frozenset[tuple[str, int]] = frozenset()
    tcp_any_port: frozenset[int] = frozenset()
    unix: frozenset[str] = frozenset()


def device_sockets(xml: bytes) -> DeviceSockets:
    """Graphics ports and bound UNIX paths from the live domain XML (libvirt's own)."""
    from ..mdev.domain import parse_xml  # the one module that parses XML (lxml, no entities)

    root = parse_xml(xml)
    tcp: set[tuple[str, int]] = set()
    any_port: set[int] = set()
    unix: set[str] = set()
    for g in root.iterfind("devices/graphics"):
        addrs = {a for a in [g.get("listen"), *(lst.get("address") for lst in g.iterfind("listen"))] if a}
        for lst in g.iterfind("listen"):
            if lst.get("socket"):
                unix.add(lst.get("socket") or "")
        for attr in ("port", "tlsPort", "websocket"):
            v = g.get(attr)
            if v and v.lstrip("-").isdigit() and int(v) > 0:
                if addrs:
                    tcp.update((_norm(a), int(v)) for a in addrs)
                else:
                    any_port.add(int(v))  # libvirt's vnc_listen/spice_listen default
    for src in root.iter("source"):
        if src.get("mode") == "bind" and src.get("path"):
            unix.add(src.get("path") or "")
    return DeviceSockets(frozenset(tcp), frozenset(any_port), frozenset(unix))


def _norm(addr: str) -> str:
    try:
        return str(ipaddress.ip_address(addr.strip("[]")))
    except ValueError:
        return addr


def _is_device_socket(lst: Listener, dev: DeviceSockets, socket_dir: Path | None) -> bool:
    if lst.kind == "tcp":
        return (lst.address, lst.port) in dev.tcp or (lst.port in dev.tcp_any_port and _loopback(lst.address))
    if socket_dir is not None and os.path.dirname(lst.path) == str(socket_dir):
        return False  # in the migration directory: judged as an endpoint
    return lst.path in dev.unix or lst.path.startswith(LIBVIRT_SOCKET_DIRS)


def _loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class GuardView:
    """What the endpoint classifier needs to know about this host's guards."""

    nft_ports: PortRanges = ()
    socket_dir: Path | None = None
    socket_dir_problem: str | None = "migration_socket_dir is not set"


def endpoint_problem(ep: Listener, view: GuardView) -> str | None:
    """Why *ep* is not reachable only through the proxy (None: it is guarded)."""
    if ep.kind == "unix":
        if view.socket_dir is None or os.path.dirname(ep.path) != str(view.socket_dir):
            where = f"inside {view.socket_dir}" if view.socket_dir else "inside migration_socket_dir (not set)"
            return (f"QEMU listens on unix socket {ep.path or '(abstract)'}, not {where}; "
                    f"migrate with --migrateuri unix://<migration_socket_dir>/NAME through the proxy")
        if view.socket_dir_problem:
            return f"QEMU listens on unix socket {ep.path} but {view.socket_dir_problem}"
        return None
    if not _loopback(ep.address):
        return (f"QEMU listens on {ep}, reachable without the proxy; migrate with --listen-address 127.0.0.1 "
                f"--migrateuri tcp://<this host>:PORT through the proxy")
    if not covers(view.nft_ports, ep.port):
        if not view.nft_ports:
            return f"QEMU listens on {ep} but no nftables guard is in place; {FIX_INSTALL}"
        return (f"QEMU listens on {ep}, a port the nftables guard does not cover ({ranges_text(view.nft_ports)}); "
                f"add it to guard_ports and {FIX_INSTALL}, or migrate to a guarded port")
    return None


def classify(found: Sequence[Listener], dev: DeviceSockets, view: GuardView) -> str | None:
    """The verdict on an incoming QEMU's listening sockets: None (every migration
    endpoint guarded) or the one-line reason.  No endpoint at all is refused: a
    tunnelled or ``fd:`` migration reaches QEMU through libvirtd, past the proxy."""
    endpoints = [ep for ep in found if not _is_device_socket(ep, dev, view.socket_dir)]
    if not endpoints:
        return ("QEMU has no listening migration socket (tunnelled or fd: migrations reach QEMU past the proxy); "
                "migrate with --listen-address 127.0.0.1 --migrateuri tcp://<this host>:PORT or "
                "--migrateuri unix://<migration_socket_dir>/NAME through the proxy")
    for ep in endpoints:
        problem = endpoint_problem(ep, view)
        if problem:
            return problem
    return None


def guard_view(config: Config) -> GuardView:
    """This netns's guards as the classifier needs them (runs nft only when needed)."""
    sd = config.migration_socket_dir
    sd_problem = socket_dir_problem(config) if sd is not None else "migration_socket_dir is not set"
    state = nft_guard()
    return GuardView(nft_ports=state.ports if state.effective else (),
                     socket_dir=Path(os.path.abspath(sd)) if sd else None, socket_dir_problem=sd_problem)


def check_incoming_endpoint(config: Config, domain: str, xml: bytes) -> str:
    """The ``started begin`` check of an armed incoming migration.

    Returns a short description for the log; raises GuardError with the one line.
    A QEMU started without ``-incoming`` (a plain start while a stale record exists)
    is not an incoming migration: nothing to check.
    """
    if not config.require_guard:
        return "endpoint NOT checked: require_guard = no (the proxy can be bypassed)"
    q = find_qemu(config, domain)
    if not q.incoming:
        return "QEMU is not an incoming migration; nothing to check"
    found = listeners(q.pid)
    dev = device_sockets(xml)
    view = guard_view(config)
    problem = classify(found, dev, view)
    if problem:
        raise GuardError(problem)
    endpoints = [ep for ep in found if not _is_device_socket(ep, dev, view.socket_dir)]
    return "incoming endpoint guarded: " + ", ".join(str(ep) for ep in endpoints)


def check_unarmed_incoming(config: Config, domain: str, xml: bytes, pid: int) -> str:
    """``started begin`` of an incoming migration that ``migrate begin`` did not arm (no
    mdevs, ``arm_all = no``).  If QEMU waits where only the proxy can reach it (loopback
    on a guarded port, or inside ``migration_socket_dir``), the proxy is the path and
    would refuse the unarmed domain mid-stream with a bare socket error on the source
    (issue 15).  Refuse now, with the fix, instead.  A direct migration passes."""
    routed = []
    ports = guarded_ports(config)
    sd = str(Path(os.path.abspath(config.migration_socket_dir))) if config.migration_socket_dir else None
    dev = device_sockets(xml)
    for ep in listeners(pid):
        if _is_device_socket(ep, dev, config.migration_socket_dir):
            continue
        if (ep.kind == "tcp" and _loopback(ep.address) and covers(ports, ep.port)) or \
                (ep.kind == "unix" and sd is not None and os.path.dirname(ep.path) == sd):
            routed.append(ep)
    if routed:
        raise GuardError(f"domain {domain} has no mdev hostdevs and arm_all = no, so the proxy would refuse this "
                         f"migration to {routed[0]}; set arm_all = yes on this host, or migrate it without the proxy")
    return "unarmed incoming migration, not through the proxy"


def check_forward_endpoint(config: Config, *, host: str | None = None, port: int | None = None,
                           path: str | None = None) -> None:
    """The proxy's re-check, for each accepted source connection, before it forwards a
    byte to QEMU's endpoint (TCP *host*/*port* or UNIX *path*).  The guard can be removed
    at run time (``nft flush ruleset``, chmod), so the hook's earlier check is not enough.

    Raises:
        GuardError: one line naming the fix.
    """
    if not config.require_guard:
        return
    if path is not None:
        ep = Listener("unix", path=os.path.abspath(path))
    elif host is not None and port is not None:
        addr = "127.0.0.1" if host == "localhost" else _norm(host)
        ep = Listener("tcp", addr, int(port))
    else:
        raise GuardError("the proxy's forward endpoint is neither HOST:PORT nor unix:PATH")
    problem = endpoint_problem(ep, guard_view(config))
    if problem:
        raise GuardError(problem.replace("QEMU listens on", "the proxy forwards to", 1))


__all__ = [
    "DeviceSockets",
    "GuardView",
    "Listener",
    "check_forward_endpoint",
    "check_incoming_endpoint",
    "check_unarmed_incoming",
    "classify",
    "device_sockets",
    "endpoint_problem",
    "find_qemu",
    "listeners",
]
