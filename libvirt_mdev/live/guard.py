"""The no-bypass guard: the destination QEMU's incoming endpoint is reachable only
through the proxy (issue 11, design in docs/guard.md).

Two layouts are guarded, each with a mechanism admins already trust:

* **TCP** (``--listen-address 127.0.0.1 --migrateuri tcp://B:PORT``): QEMU listens on
  loopback.  An nftables table ``inet libvirt_mdev`` rejects (TCP reset) every *new*
  loopback connection to a guarded port from a socket not owned by root.  Guarded
  ports: qemu.conf's ``migration_port_min..max`` plus ``guard_ports`` from our config.
  The proxy (root) and libvirtd (root) pass; a local user's QEMU or script does not.
  No input-chain rule: the proxy itself listens on B's address with the same port.
* **UNIX** (``--migrateuri unix:///DIR/NAME``): QEMU's socket lies directly inside
  ``migration_socket_dir``, a root-owned directory nobody else may enter (only the
  QEMU group may write to it, for QEMU to create its socket).

Checks, in the order a migration meets them:

1. ``migrate begin`` (hook): :func:`guard_problem` — one of the two guards is in place.
The endpoint checks (2 and 3) live in :mod:`.endpoint`:

2. ``started begin`` (hook; QEMU listens, the source has not sent a byte yet):
   :func:`check_incoming_endpoint` — every listening socket of the incoming QEMU that
   is not one of libvirt's own device sockets must be a guarded endpoint; no listening
   socket at all (tunnelled, ``fd:``) is refused too.  A failing ``started`` hook fails
   libvirt's Prepare: the migration is cancelled, the guest keeps running on the source.
3. each source connection (proxy): :func:`check_forward_endpoint` — the guard may be
   removed at run time, so the proxy re-checks before it forwards a byte.

Rules are per network namespace: everything here checks the caller's own namespace
(the hook runs in libvirtd's, which is QEMU's).  This module never calls libvirt (the
hook would deadlock); it reads /proc and runs ``nft``.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import GuardError

if TYPE_CHECKING:
    from ..config import Config

FAMILY = "inet"
TABLE = "libvirt_mdev"
SET = "guarded_ports"
CHAIN = "output"
COMMENT = "libvirt-mdev guard"
#: libvirt's defaults when qemu.conf does not set migration_port_min/max
DEFAULT_PORT_RANGE = (49152, 49215)
#: libvirt's own directories for per-domain sockets (monitor, channels): not endpoints a source chooses
LIBVIRT_SOCKET_DIRS = ("/var/lib/libvirt/qemu/", "/run/libvirt/qemu/")
NFT_TIMEOUT = 10.0
FIX_INSTALL = "run: libvirt-mdev guard install"

PortRanges = tuple[tuple[int, int], ...]


# --------------------------------------------------------------------------- qemu.conf
@dataclass(frozen=True)
class QemuConf:
    """The few qemu.conf settings the guard depends on."""

    port_min: int = DEFAULT_PORT_RANGE[0]
    port_max: int = DEFAULT_PORT_RANGE[1]
    group: str | None = None


_QEMU_CONF_RE = re.compile(r'^\s*(migration_port_min|migration_port_max|group)\s*=\s*("([^"]*)"|(\d+))', re.M)


def read_qemu_conf(path: Path) -> QemuConf:
    """Parse libvirt's qemu.conf for the migration port range and QEMU's group.

    A missing file means libvirt's defaults.  Raises GuardError on an unreadable file or
    a nonsensical range (libvirt itself would refuse to start).
    """
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return QemuConf()
    except OSError as exc:
        raise GuardError(f"cannot read {path}: {exc.strerror}; set qemu_conf in libvirt-mdev.conf") from None
    values: dict[str, str] = {}
    for m in _QEMU_CONF_RE.finditer(text):
        values[m.group(1)] = m.group(3) if m.group(3) is not None else m.group(4)
    try:
        lo = int(values.get("migration_port_min", DEFAULT_PORT_RANGE[0]))
        hi = int(values.get("migration_port_max", DEFAULT_PORT_RANGE[1]))
    except ValueError:
        raise GuardError(f"{path}: migration_port_min/max are not numbers") from None
    if not 1 <= lo <= hi <= 65535:
        raise GuardError(f"{path}: migration port range {lo}-{hi} is not valid")
    return QemuConf(lo, hi, values.get("group"))


def guarded_ports(config: Config) -> PortRanges:
    """Ports the nftables guard must cover: qemu.conf's migration range and ``guard_ports``."""
    qc = read_qemu_conf(config.qemu_conf)
    return merge_ranges([(qc.port_min, qc.port_max), *config.guard_ports])


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> PortRanges:
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return tuple(out)


def covers(ranges: PortRanges, port: int) -> bool:
    return any(lo <= port <= hi for lo, hi in ranges)


def ranges_text(ranges: PortRanges) -> str:
    return ", ".join(f"{lo}-{hi}" if lo != hi else str(lo) for lo, hi in ranges) or "none"


# --------------------------------------------------------------------------- nftables
def nft_binary() -> str:
    found = shutil.which("nft") or next((p for p in ("/usr/sbin/nft", "/sbin/nft") if os.access(p, os.X_OK)), None)
    if found is None:
        raise GuardError("the nft command is missing; install it with: apt-get install nftables")
    return found


def _nft(args: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run nft with captured output (the hook's stdout must never be inherited: libvirt
    would take it as a replacement domain XML)."""
    try:
        return subprocess.run([nft_binary(), *args], input=stdin, capture_output=True, text=True,
                              timeout=NFT_TIMEOUT, stdin=None if stdin is not None else subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise GuardError(f"cannot run nft: {exc}") from None


def render_ruleset(ports: PortRanges) -> str:
    """The whole table, replaced atomically (``table`` + ``delete table`` + definition
    is one nft transaction: installing twice gives the same ruleset, never a gap)."""
    elements = ", ".join(f"{lo}-{hi}" if lo != hi else str(lo) for lo, hi in ports)
    return (f"table {FAMILY} {TABLE}\n"
            f"delete table {FAMILY} {TABLE}\n"
            f"table {FAMILY} {TABLE} {{\n"
            f"  set {SET} {{ type inet_service; flags interval; elements = {{ {elements} }} }}\n"
            f"  chain {CHAIN} {{\n"
            f"    type filter hook output priority filter; policy accept;\n"
            f"    oif \"lo\" tcp dport @{SET} ct state new meta skuid != 0 counter reject with tcp reset "
            f"comment \"{COMMENT}\"\n"
            f"  }}\n"
            f"}}\n")


def nft_table() -> list[dict[str, Any]] | None:
    """Our table as nft's JSON objects, or None when it does not exist (in this netns)."""
    r = _nft(["-j", "list", "table", FAMILY, TABLE])
    if r.returncode != 0:
        if "No such file or directory" in r.stderr or "does not exist" in r.stderr:
            return None
        raise GuardError(f"nft list table failed: {' '.join(r.stderr.split()) or r.returncode}")
    try:
        doc = json.loads(r.stdout)
        items = doc["nftables"]
    except (ValueError, KeyError, TypeError):
        raise GuardError("nft -j printed something that is not its JSON schema") from None
    return [i for i in items if isinstance(i, dict)]


@dataclass
class NftGuard:
    """What the installed table does: the ports its rule really rejects, and what is wrong."""

    present: bool
    ports: PortRanges = ()
    problems: list[str] = field(default_factory=list)

    @property
    def effective(self) -> bool:
        return self.present and not self.problems


def _set_ranges(elem: Any) -> PortRanges:
    out = []
    for e in elem if isinstance(elem, list) else [elem]:
        if isinstance(e, int):
            out.append((e, e))
        elif isinstance(e, dict) and isinstance(e.get("range"), list) and len(e["range"]) == 2:
            out.append((int(e["range"][0]), int(e["range"][1])))
        elif isinstance(e, dict) and "elem" in e:
            out.extend(_set_ranges(e["elem"].get("val") if isinstance(e["elem"], dict) else e["elem"]))
        elif isinstance(e, dict) and "set" in e:
            out.extend(_set_ranges(e["set"]))
    return merge_ranges(out)


def _is_guard_rule(expr: list[Any], sets: dict[str, PortRanges]) -> PortRanges | None:
    """The ports a rule guards if it is exactly our rule's logic, else None.

    Needed: ``oif lo``, ``tcp dport`` in a set or range, ``ct state new`` (replies of a
    non-root QEMU must pass), ``meta skuid != 0``, and a final ``reject``/``drop``.
    Any other match makes the rule narrower than we can vouch for, so it does not count.
    """
    facts = {"lo": False, "new": False, "skuid": False, "verdict": False}
    ports: PortRanges | None = None
    for e in expr:
        if not isinstance(e, dict):
            return None
        if "counter" in e:
            continue
        if "reject" in e or "drop" in e:
            facts["verdict"] = True
            continue
        m = e.get("match")
        if not isinstance(m, dict):
            return None
        left, right, op = m.get("left"), m.get("right"), m.get("op")
        if left == {"meta": {"key": "oif"}} and op == "==" and right == "lo":
            facts["lo"] = True
        elif left == {"meta": {"key": "skuid"}} and op == "!=" and right == 0:
            facts["skuid"] = True
        elif left == {"ct": {"key": "state"}} and op in ("in", "==") and right in ("new", ["new"]):
            facts["new"] = True
        elif left == {"payload": {"protocol": "tcp", "field": "dport"}} and op in ("==", "in"):
            if isinstance(right, str) and right.startswith("@"):
                ports = sets.get(right[1:], ())
            else:
                ports = _set_ranges(right if not isinstance(right, dict) or "set" in right else [right])
        else:
            return None
    return ports if all(facts.values()) and ports else None


def parse_nft_guard(items: list[dict[str, Any]] | None) -> NftGuard:
    """Judge our table from ``nft -j list table`` output (None: no table)."""
    if items is None:
        return NftGuard(present=False, problems=[f"no nftables table {FAMILY} {TABLE}"])
    sets = {i["set"]["name"]: _set_ranges(i["set"].get("elem", [])) for i in items if "set" in i}
    chains = [i["chain"] for i in items if "chain" in i]
    out = NftGuard(present=True)
    ours = [c for c in chains if c.get("name") == CHAIN]
    if not ours or ours[0].get("hook") != "output" or ours[0].get("type") != "filter":
        out.problems.append(f"table {FAMILY} {TABLE} has no filter chain on the output hook")
        return out
    covered: list[tuple[int, int]] = []
    for i in items:
        rule = i.get("rule")
        if isinstance(rule, dict) and rule.get("chain") == CHAIN:
            got = _is_guard_rule(rule.get("expr", []), sets)
            if got:
                covered.extend(got)
    out.ports = merge_ranges(covered)
    if not out.ports:
        out.problems.append(f"table {FAMILY} {TABLE} has no rule rejecting non-root loopback connections")
    return out


def nft_guard() -> NftGuard:
    return parse_nft_guard(nft_table())


def install_nft_guard(ports: PortRanges) -> None:
    r = _nft(["-f", "-"], stdin=render_ruleset(ports))
    if r.returncode != 0:
        raise GuardError(f"nft refused the guard table: {' '.join(r.stderr.split())}")


def remove_nft_guard() -> bool:
    """Delete our table; returns whether it existed."""
    if nft_table() is None:
        return False
    r = _nft(["delete", "table", FAMILY, TABLE])
    if r.returncode != 0:
        raise GuardError(f"nft delete table failed: {' '.join(r.stderr.split())}")
    return True


def missing_ports(have: PortRanges, need: PortRanges) -> PortRanges:
    """The parts of *need* that *have* does not cover."""
    out = []
    for lo, hi in need:
        p = lo
        while p <= hi:
            cover = next(((a, b) for a, b in have if a <= p <= b), None)
            if cover:
                p = cover[1] + 1
                continue
            nxt = min([a for a, _ in have if a > p] + [hi + 1])
            out.append((p, min(hi, nxt - 1)))
            p = nxt
    return tuple(out)


# --------------------------------------------------------------------------- socket dir
def _group_gid(name: str | None) -> int | None:
    if not name:
        name = "libvirt-qemu"
    if name.startswith("+") and name[1:].isdigit():
        return int(name[1:])
    try:
        import grp

        return grp.getgrnam(name).gr_gid
    except (KeyError, ImportError):
        return None


def socket_dir_problem(config: Config) -> str | None:
    """Why ``migration_socket_dir`` does not guard the UNIX layout (None: it does).

    The directory: a real directory owned by root, no access for others, group write
    only for QEMU's group (qemu.conf ``group``; QEMU creates its socket there).  Every
    directory above it: owned by root, not writable by group or others (a root-owned
    sticky directory such as /tmp is allowed: nobody else can rename what root owns).
    """
    d = config.migration_socket_dir
    if d is None:
        return "migration_socket_dir is not set"
    fix = f"fix with: chown root {d} && chmod 0750 {d}"
    try:
        st = os.lstat(d)
    except OSError as exc:
        return f"migration_socket_dir {d}: {exc.strerror}; create it: install -d -o root -m 0750 {d}"
    if not stat.S_ISDIR(st.st_mode):
        return f"migration_socket_dir {d} is not a directory (or is a symlink)"
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid != 0:
        return f"migration_socket_dir {d} is owned by uid {st.st_uid}, not root; {fix}"
    if mode & 0o007:
        return f"migration_socket_dir {d} has mode {mode:04o}: others have access; {fix}"
    if mode & 0o020 and st.st_gid not in (0, _group_gid(read_qemu_conf(config.qemu_conf).group)):
        return f"migration_socket_dir {d} is writable by group {st.st_gid}, which is not QEMU's group; {fix}"
    p = os.path.dirname(os.path.abspath(d))
    while True:
        pst = os.lstat(p)
        if stat.S_ISLNK(pst.st_mode):
            return f"directory {p} above migration_socket_dir is a symlink; name the real path"
        sticky_root = pst.st_uid == 0 and pst.st_mode & stat.S_ISVTX
        if pst.st_uid != 0 or (pst.st_mode & 0o022 and not sticky_root):
            return (f"directory {p} above migration_socket_dir must be owned by root and not writable by "
                    f"group or others; fix with: chown root {p} && chmod go-w {p}")
        if p == "/":
            return None
        p = os.path.dirname(p)


# --------------------------------------------------------------------------- readiness
def guard_problem(config: Config) -> str | None:
    """None when a guard is in place (nftables for every qemu.conf migration port, or a
    correctly permissioned ``migration_socket_dir``) or not required
    (``require_guard = no``); else one line naming the fix."""
    if not config.require_guard:
        return None
    sock = socket_dir_problem(config) if config.migration_socket_dir is not None else None
    if config.migration_socket_dir is not None and sock is None:
        return None
    need = guarded_ports(config)
    state = nft_guard()
    if state.effective:
        gap = missing_ports(state.ports, need)
        if not gap:
            return None
        why = f"the nftables guard does not cover port(s) {ranges_text(gap)}"
    else:
        why = "; ".join(state.problems)
    if sock:
        why += f" and {sock}"
    return f"no guard keeps QEMU's incoming endpoint behind the proxy ({why}); {FIX_INSTALL}"


__all__ = [
    "guard_problem",
    "guarded_ports",
    "install_nft_guard",
    "merge_ranges",
    "missing_ports",
    "nft_guard",
    "parse_nft_guard",
    "read_qemu_conf",
    "remove_nft_guard",
    "render_ruleset",
    "socket_dir_problem",
]

