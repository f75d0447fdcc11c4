"""`virsh migrate --live` between two real libvirt hosts with our hook and proxy on B.

Layout as a user runs it (README walkthrough): the hook in B's qemu.d arms the
migration at `migrate begin`, the proxy runs on B (inside B's network and mount
namespaces) and serves it:

* TCP: ``--listen-address 127.0.0.1 --migrateuri tcp://B:PORT`` — B's QEMU listens on
  loopback, the proxy on B's address and the same port;
* UNIX: ``--migrateuri unix:///run/libvirt/mig/px.sock`` — a relay-mode proxy on A
  listens on A's path and carries the bytes to B's proxy, which forwards them into
  B's QEMU's socket at the same path.

The guest has no real mdev (no hardware here).  B's config sets ``arm_all`` so an
mdev-less domain is armed too (with no devices).  Refusals use a test hook
``10-test-mdev`` that runs before ours: in mode ``add`` it adds an mdev hostdev
(annotated with a type B lacks) to the incoming XML, so our hook refuses at
`migrate begin` and virsh shows our line; in mode ``view`` it shows our hook that XML
but prints nothing (libvirt starts the mdev-less guest), so the migration is armed
with the mdev — and the proxy, whose sysfs has that mdev with another type now,
refuses the connection.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from libvirt_mdev.store.pending import list_pending
from testkit.fakesysfs import make_fake_sysfs
from tests.harness import logging_hook
from tests.harness.guests import GuestSpec, migratable_guest
from tests.harness.migration import (
    CONF,
    MigrationRig,
    ProxyProcess,
    config_text,
    define_and_start,
    our_hook,
    python_hook,
    remove_guest,
)
from tests.harness.twohosts import TwoHosts

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

U2 = "4b20d080-1b54-4048-85b3-a6a62d165c02"
PARENT = "0000:3b:00.0"
PROXY_CONF = "/etc/libvirt/libvirt-mdev-proxy.conf"
MODE_FILE = MigrationRig.MODE_FILE
PORT = 49152
SOCK = "/run/libvirt/mig/px.sock"

#: the test hook: mode 'add' rewrites the incoming XML (adds an annotated mdev), mode
#: 'view' lets our hook judge that XML but leaves libvirt's XML alone
TEST_HOOK = """
import io, os, sys
data = sys.stdin.buffer.read()
try:
    mode = open(MODE_FILE).read().strip()
except FileNotFoundError:
    mode = ""
if sys.argv[2:4] != ["migrate", "begin"] or not mode:
    sys.exit(0)
from libvirt_mdev.mdev.domain import AnnotatedMdev, Annotation, set_annotation
kind, annotated = mode.split(":")
dev = ("<hostdev mode='subsystem' type='mdev' model='vfio-pci'><source><address uuid='U2'/></source>"
       "<address type='pci' domain='0x0000' bus='0x00' slot='0x0a' function='0x0'/></hostdev>")
xml = data.decode().replace("</devices>", dev + "</devices>", 1)
xml = set_annotation(xml, Annotation({"U2": AnnotatedMdev("U2", annotated, "0000:af:00.0")}, host="lmA"))
if kind == "add":
    sys.stdout.buffer.write(xml)
    sys.exit(0)
from libvirt_mdev.hook import main
sys.exit(main(sys.argv[1:], io.BytesIO(xml), io.BytesIO(), sys.stderr, config_path=CONF))
"""


def hook_config(sysfs: Path, arm_all: bool) -> str:
    return config_text(sysfs, arm_all=arm_all, require_guard=False)


class Setup(MigrationRig):
    def __init__(self, hosts: TwoHosts, sysfs: Path, sysfs_now: Path) -> None:
        super().__init__(hosts)
        self.sysfs = sysfs          # U2 is nvidia-224 (what the hook sees)
        self.sysfs_now = sysfs_now  # U2 is nvidia-222 (the proxy's view in the 'mdev re-created' test)

    def b_conf(self, arm_all: bool) -> None:
        self.b.host_path(CONF).write_text(hook_config(self.sysfs, arm_all))

    def start_guest(self, name: str, tmp_path: Path) -> GuestSpec:
        """A migratable guest *name*, defined and running on A."""
        spec = migratable_guest(name)
        define_and_start(self.a, spec, tmp_path)
        return spec


@pytest.fixture(scope="module")
def setup(e2e_tools: None, harness_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    base = tmp_path_factory.mktemp("pxl")
    make_fake_sysfs(base / "sys", parents={PARENT: ["nvidia-222", "nvidia-224"]},
                    devices={U2: (PARENT, "nvidia-224")})
    make_fake_sysfs(base / "sys-now", parents={PARENT: ["nvidia-222", "nvidia-224"]},
                    devices={U2: (PARENT, "nvidia-222")})
    test_hook = TEST_HOOK.replace("MODE_FILE", repr(MODE_FILE)).replace("CONF", repr(CONF)) \
        .replace("'U2'", "'" + U2 + "'").replace('"U2"', repr(U2))
    with TwoHosts(base / "two", hooks=[logging_hook()],
                  hooks_b=[python_hook("10-test-mdev", test_hook), our_hook(base / "staging")],
                  extra_files_b={CONF: hook_config(base / "sys", True),
                                 PROXY_CONF: hook_config(base / "sys-now", False)}) as hosts:
        yield Setup(hosts, base / "sys", base / "sys-now")


def cleanup(s: Setup, name: str, proxies: list[ProxyProcess | None]) -> None:
    remove_guest(s.hosts, name, proxies)
    s.mode("")


def armed_lines(log: str, name: str) -> list[str]:
    return [line for line in log.splitlines() if f"domain={name}:" in line or f"domain {name} " in line]


def test_virsh_migrate_tcp_through_the_proxy(setup: Setup, tmp_path: Path) -> None:
    s, b = setup, setup.hosts.b
    s.b_conf(arm_all=True)
    spec = s.start_guest("px-tcp", tmp_path)
    addr = s.hosts.address("B")
    proxy = ProxyProcess(b, "--listen", f"{addr}:{PORT}", "--forward", f"127.0.0.1:{PORT}", "--digest")
    try:
        t0 = time.monotonic()
        s.hosts.migrate(spec.name, "--listen-address", "127.0.0.1", port=PORT)
        t1 = time.monotonic()
        res = proxy.result()
        print(f"virsh migrate {t1 - t0:.2f}s, proxy result after {time.monotonic() - t1:.2f}s, session {res['seconds']}s")
        assert res["ok"], res
        assert res["domain_name"] == spec.name and res["domain_uuid"] == spec.uuid
        assert res["bytes_in"] == res["bytes_out"] > 1 << 20 and res["sha256_in"] == res["sha256_out"]
        assert s.hosts.a.domstate(spec.name) == "shut off"
        b.wait_guest_executes(spec.name)
        lines = armed_lines(s.log(), spec.name)
        assert any("migrate begin" in ln and "armed" in ln and res["migration_id"] in ln for ln in lines)
        assert any(f"serving domain {spec.name} ({spec.uuid}) migration {res['migration_id']}" in ln
                   for ln in lines)
        assert list_pending(b.host_path("/run/libvirt/libvirt-mdev")) == []  # spent
    finally:
        cleanup(s, spec.name, [proxy])


def test_virsh_migrate_parallel_tcp_through_the_proxy(setup: Setup, tmp_path: Path) -> None:
    """`virsh migrate --parallel --parallel-connections 4`: libvirt turns multifd on in both QEMUs; the proxy
    serves the main channel and the four side channels of the one armed migration."""
    s, b = setup, setup.hosts.b
    s.b_conf(arm_all=True)
    spec = s.start_guest("px-par", tmp_path)
    addr = s.hosts.address("B")
    proxy = ProxyProcess(b, "--listen", f"{addr}:{PORT}", "--forward", f"127.0.0.1:{PORT}")
    try:
        s.hosts.migrate(spec.name, "--listen-address", "127.0.0.1", "--parallel", "--parallel-connections", "4",
                        port=PORT)
        res = proxy.result()
        assert res["ok"], res
        assert res["domain_name"] == spec.name and res["domain_uuid"] == spec.uuid
        assert s.hosts.a.domstate(spec.name) == "shut off"
        b.wait_guest_executes(spec.name)
        lines = armed_lines(s.log(), spec.name)
        assert any(f"migration {res['migration_id']} done" in ln and "4 multifd channel(s)" in ln for ln in lines), \
            lines
        assert "multifd channel REFUSED" not in s.log()
        assert list_pending(b.host_path("/run/libvirt/libvirt-mdev")) == []  # spent
    finally:
        cleanup(s, spec.name, [proxy])


def unix_layout(s: Setup) -> tuple[ProxyProcess, ProxyProcess]:
    """The UNIX-socket layout: B's proxy on B's address (port PORT + 1) forwarding into B's QEMU's socket SOCK,
    and A's relay on SOCK carrying to it: (B's proxy, A's relay)."""
    addr = s.hosts.address("B")
    dest = ProxyProcess(s.b, "--listen", f"{addr}:{PORT + 1}", "--forward", f"unix:{SOCK}")
    relay = ProxyProcess(s.a, "--mode", "relay", "--listen", f"unix:{SOCK}", "--forward", f"{addr}:{PORT + 1}")
    return dest, relay


def test_virsh_migrate_unix_socket_through_relay_and_proxy(setup: Setup, tmp_path: Path) -> None:
    s, a, b = setup, setup.hosts.a, setup.hosts.b
    s.b_conf(arm_all=True)
    spec = s.start_guest("px-unix", tmp_path)
    dest, relay = unix_layout(s)
    try:
        s.hosts.migrate(spec.name, migrateuri=f"unix://{SOCK}")
        res, carried = dest.result(), relay.result()
        assert res["ok"] and carried["ok"], (res, carried)
        assert res["domain_name"] == spec.name and carried["bytes_in"] == res["bytes_in"] > 1 << 20
        b.wait_guest_executes(spec.name)
        assert a.domstate(spec.name) == "shut off"
        assert any(f"serving domain {spec.name}" in ln for ln in armed_lines(s.log(), spec.name))
    finally:
        cleanup(s, spec.name, [dest, relay])


def test_virsh_migrate_parallel_unix_socket_through_relay_and_proxy(setup: Setup, tmp_path: Path) -> None:
    """The UNIX-socket layout with `--parallel --parallel-connections 4`: A's relay carries each of the five
    connections verbatim; B's proxy binds the side channels and forwards all five into B's QEMU's socket."""
    s, a, b = setup, setup.hosts.a, setup.hosts.b
    s.b_conf(arm_all=True)
    spec = s.start_guest("px-upar", tmp_path)
    dest, relay = unix_layout(s)
    try:
        s.hosts.migrate(spec.name, "--parallel", "--parallel-connections", "4", migrateuri=f"unix://{SOCK}")
        res = dest.result()
        assert res["ok"], res
        b.wait_guest_executes(spec.name)
        assert a.domstate(spec.name) == "shut off"
        assert any(f"migration {res['migration_id']} done" in ln and "4 multifd channel(s)" in ln
                   for ln in armed_lines(s.log(), spec.name))
    finally:
        cleanup(s, spec.name, [dest, relay])


def test_hook_refusal_shows_in_virsh_and_keeps_the_guest_on_a(setup: Setup, tmp_path: Path) -> None:
    s, b = setup, setup.hosts.b
    s.b_conf(arm_all=True)
    s.mode("add:nvidia-222")  # B has U2 as nvidia-224
    spec = s.start_guest("px-ref", tmp_path)
    try:
        r = s.hosts.migrate(spec.name, "--listen-address", "127.0.0.1", port=PORT, check=False)
        assert r.returncode != 0
        print(r.stderr.strip())
        assert (f"libvirt-mdev: incoming migration refused: domain {spec.name}: mdev {U2}: source type "
                f"nvidia-222 but this host has type nvidia-224") in r.stderr
        s.hosts.a.wait_guest_executes(spec.name)
        assert b.virsh("domstate", spec.name, check=False).returncode != 0  # nothing left on B
        assert list_pending(b.host_path("/run/libvirt/libvirt-mdev")) == []
    finally:
        cleanup(s, spec.name, [])


def test_proxy_refusal_of_an_armed_type_mismatch_keeps_the_guest_on_a(setup: Setup, tmp_path: Path) -> None:
    s, b = setup, setup.hosts.b
    s.b_conf(arm_all=False)  # only the test hook's view arms (with the mdev)
    s.mode("view:nvidia-224")
    spec = s.start_guest("px-mis", tmp_path)
    addr = s.hosts.address("B")
    proxy = ProxyProcess(b, "--listen", f"{addr}:{PORT}", "--forward", f"127.0.0.1:{PORT}", config=PROXY_CONF)
    try:
        started = time.monotonic()
        r = s.hosts.migrate(spec.name, "--listen-address", "127.0.0.1", port=PORT, check=False)
        assert r.returncode != 0, r.stdout
        print(f"virsh ({time.monotonic() - started:.1f}s): {r.stderr.strip()}")
        res = proxy.result()
        assert not res["ok"] and res["error_kind"] == "type-mismatch" and res["domain_name"] == spec.name
        line = (f"mdev {U2} (0000:00:0a.0/vfio) was armed for type nvidia-224 but this host now has type "
                f"nvidia-222")
        assert line in res["error"] and line in s.log()
        s.hosts.a.wait_guest_executes(spec.name)
        assert any("armed" in ln and "1 mdev(s) match" in ln for ln in armed_lines(s.log(), spec.name))
    finally:
        cleanup(s, spec.name, [proxy])


def test_proxy_refusal_with_parallel_keeps_the_guest_on_a(setup: Setup, tmp_path: Path) -> None:
    """The same refusal with `--parallel --parallel-connections 4`: main and side channels are reset, virsh
    fails, the guest runs on A."""
    s = setup
    s.b_conf(arm_all=False)
    s.mode("view:nvidia-224")
    spec = s.start_guest("px-pmis", tmp_path)
    addr = s.hosts.address("B")
    proxy = ProxyProcess(s.b, "--listen", f"{addr}:{PORT}", "--forward", f"127.0.0.1:{PORT}", config=PROXY_CONF)
    try:
        started = time.monotonic()
        r = s.hosts.migrate(spec.name, "--listen-address", "127.0.0.1", "--parallel", "--parallel-connections", "4",
                            port=PORT, check=False)
        took = time.monotonic() - started
        assert r.returncode != 0, r.stdout
        print(f"virsh ({took:.1f}s): {r.stderr.strip()}")
        res = proxy.result()
        assert not res["ok"] and res["error_kind"] == "type-mismatch" and res["domain_name"] == spec.name
        s.hosts.a.wait_guest_executes(spec.name)
        assert took < 20     # not held until the main-channel deadline
    finally:
        cleanup(s, spec.name, [proxy])


RUNDIR = "/run/libvirt/libvirt-mdev"


def test_a_migration_aborted_after_migrate_begin_does_not_block_the_next_domain(setup: Setup,
                                                                                tmp_path: Path) -> None:
    """Issue 12: a migration that fails after `migrate begin` ("domain ... already exists"
    on B) gets no `release end`: its pending record stays.  Before, the next domain's
    migration through the same proxy was refused ("2 incoming migrations are armed")."""
    from libvirt_mdev.store.pending import remove_pending

    s, a, b = setup, setup.hosts.a, setup.hosts.b
    s.b_conf(arm_all=True)
    first, second = migratable_guest("px-ab1"), migratable_guest("px-ab2")
    clash = migratable_guest("px-ab1")  # same name, another uuid: defined on B
    define_and_start(a, first, tmp_path)
    define_and_start(a, second, tmp_path)
    time.sleep(1.5)  # A's QEMUs (visible in this machine's shared /proc) start well before B's records
    clash_xml = tmp_path / "clash.xml"
    clash_xml.write_text(clash.to_xml())
    b.virsh("define", str(clash_xml))
    addr = s.hosts.address("B")
    proxy = ProxyProcess(b, "--listen", f"{addr}:{PORT}", "--forward", f"127.0.0.1:{PORT}")
    try:
        r = s.hosts.migrate(first.name, "--listen-address", "127.0.0.1", port=PORT, check=False)
        assert r.returncode != 0 and "already exists" in r.stderr, r.stderr
        left = list_pending(b.host_path(RUNDIR))
        assert [x.domain_uuid for x in left] == [first.uuid]  # the record libvirt never releases
        a.wait_guest_executes(first.name)
        r2 = s.hosts.migrate(second.name, "--listen-address", "127.0.0.1", port=PORT, check=False)
        res = proxy.result()
        assert r2.returncode == 0 and res["ok"] and res["domain_name"] == second.name, res["error"]
        b.wait_guest_executes(second.name, timeout=30)  # TCG guest on a loaded 2-core box
        assert [x.domain_uuid for x in list_pending(b.host_path(RUNDIR))] == [first.uuid]
    finally:
        b.virsh("undefine", clash.name, check=False)
        remove_pending(b.host_path(RUNDIR), first.uuid)
        cleanup(s, second.name, [proxy])
        cleanup(s, first.name, [])
