"""The no-bypass guard on two real libvirt hosts (issue 11 item 1): attackers who do not
cooperate.

B runs our hook (``arm_all = yes``: the mdev-less test guest is armed and checked like
an mdev guest) and the proxy.  An attacker hook ``60-attacker`` on B runs at
``started begin`` — when B's QEMU already listens and the source has not sent a byte —
and, as uid 65534, connects to QEMU's incoming endpoint and sends bytes.  Shown:

1. with the guard (nftables in B's netns / the socket directory), the non-root
   connection is reset or denied, and the real migration still completes through the
   proxy (TCP and UNIX layouts);
2. a source that picks ``--listen-address 0.0.0.0``, an unguarded port, a UNIX path
   outside the guarded directory, or no ``--migrateuri`` fails at ``started begin``
   with our line in virsh's error, the guest still running on A and nothing on B;
3. without the guard, ``migrate begin`` refuses with the one-line fix.
"""
from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from testkit.fakesysfs import make_fake_sysfs
from tests.harness import HookFile, logging_hook
from tests.harness.guests import migratable_guest
from tests.harness.migration import (
    CONF,
    MigrationRig,
    ProxyProcess,
    cli_in_ns,
    config_text,
    define_and_start,
    host_text,
    our_hook,
    remove_guest,
)
from tests.harness.twohosts import TwoHosts

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

ATTACK_TARGET = "/var/lib/libvirt/attack-target"
ATTACK_LOG = "/var/log/libvirt/attacker.log"
SOCKDIR = "/run/libvirt/mig"
PROXY_PORT = 49300  # outside qemu.conf's range: listed in guard_ports
REFUSED = "libvirt-mdev: incoming migration refused: "

#: at started begin, as uid 65534, connect to the endpoint named in ATTACK_TARGET and
#: send a QEMU stream header; log what happened.  Prints nothing (stdout is libvirt's).
ATTACKER = r"""
import os, socket, subprocess, sys
sys.stdin.buffer.read()
if sys.argv[2:4] != ["started", "begin"]:
    sys.exit(0)
try:
    target = open(ATTACK_TARGET).read().strip()
except FileNotFoundError:
    sys.exit(0)
code = '''
import socket, sys
t = sys.argv[1]
if t.startswith("unix:"):
    s = socket.socket(socket.AF_UNIX); addr = t[5:]
else:
    h, p = t.rsplit(":", 1); s = socket.socket(); addr = (h, int(p))
s.settimeout(5)
try:
    s.connect(addr)
    s.sendall(b"QEVM\\0\\0\\0\\3")
    print("connected-and-sent")
except OSError as e:
    print("failed:" + type(e).__name__)
'''
r = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", PYTHON, "-I", "-c", code,
                    target], capture_output=True, text=True, timeout=20)
with open(ATTACK_LOG, "a") as f:
    f.write(f"{sys.argv[1]} {target} {os.getuid()} {(r.stdout + r.stderr).strip()}\n")
"""


def hook_config(sysfs: Path) -> str:
    return config_text(sysfs, arm_all=True, guard_ports=f"{PROXY_PORT} {PROXY_PORT + 1}", migration_socket_dir=SOCKDIR)


class Setup(MigrationRig):
    def cli_b(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return cli_in_ns(self.b, *args, check=check)

    def attack(self, target: str | None) -> None:
        path = self.b.host_path(ATTACK_TARGET)
        if target is None:
            path.unlink(missing_ok=True)
        else:
            path.write_text(target)
        self.b.host_path(ATTACK_LOG).unlink(missing_ok=True)

    def attacker_log(self) -> str:
        return host_text(self.b, ATTACK_LOG)


@pytest.fixture(scope="module")
def setup(e2e_tools: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    base = tmp_path_factory.mktemp("guard2")
    make_fake_sysfs(base / "sys", parents={"0000:3b:00.0": ["nvidia-222"]}, devices={})
    shebang = f"#!{sys.executable} -I\n"
    attacker = shebang + ATTACKER.replace("ATTACK_TARGET", repr(ATTACK_TARGET)).replace(
        "ATTACK_LOG", repr(ATTACK_LOG)).replace("PYTHON", repr("/usr/bin/python3"))  # uid 65534 may not enter /root
    with TwoHosts(base / "two", hooks=[logging_hook()],
                  hooks_b=[our_hook(base / "staging"), HookFile(name="60-attacker", content=attacker)],
                  extra_files_b={CONF: hook_config(base / "sys")}) as hosts:
        hosts.b.host_path(SOCKDIR).chmod(0o750)  # root:root, nobody else may enter
        s = Setup(hosts)
        s.cli_b("guard", "install")
        yield s


def cleanup(s: Setup, name: str, proxies: list[ProxyProcess | None]) -> None:
    remove_guest(s.hosts, name, proxies)
    s.attack(None)


def assert_refused_on_b(s: Setup, name: str, r: subprocess.CompletedProcess, words: list[str]) -> None:
    """The migration failed with our one line in virsh's error; the guest runs on A; nothing on B."""
    print(r.stderr.strip())
    assert r.returncode != 0
    assert REFUSED in r.stderr, r.stderr
    for w in words:
        assert w in r.stderr, (w, r.stderr)
    s.hosts.a.wait_guest_executes(name)
    assert s.b.virsh("domstate", name, check=False).returncode != 0  # no domain left on B


def test_tcp_non_root_attacker_gets_nothing_and_the_migration_completes(setup: Setup, tmp_path: Path) -> None:
    s, b = setup, setup.b
    spec = migratable_guest("gd-tcp")
    define_and_start(s.hosts.a, spec, tmp_path)
    s.attack(f"127.0.0.1:{PROXY_PORT}")
    proxy = ProxyProcess(b, "--listen", f"{s.hosts.address('B')}:{PROXY_PORT}", "--forward", f"127.0.0.1:{PROXY_PORT}")
    try:
        s.hosts.migrate(spec.name, "--listen-address", "127.0.0.1", port=PROXY_PORT)
        res = proxy.result()
        assert res["ok"], res
        assert res["domain_name"] == spec.name and res["bytes_in"] == res["bytes_out"] > 1 << 20
        b.wait_guest_executes(spec.name)
        assert s.hosts.a.domstate(spec.name) == "shut off"
        attacks = s.attacker_log().splitlines()
        print(attacks)
        assert len(attacks) == 1 and attacks[0].endswith("failed:ConnectionRefusedError")  # the guard's TCP reset
        assert f"incoming endpoint guarded: 127.0.0.1:{PROXY_PORT}" in s.log()
    finally:
        cleanup(s, spec.name, [proxy])


def test_unix_non_root_attacker_gets_nothing_and_the_migration_completes(setup: Setup, tmp_path: Path) -> None:
    s, a, b = setup, setup.hosts.a, setup.b
    sock = f"{SOCKDIR}/gd.sock"
    spec = migratable_guest("gd-unix")
    define_and_start(a, spec, tmp_path)
    s.attack(f"unix:{sock}")
    addr = s.hosts.address("B")
    dest = ProxyProcess(b, "--listen", f"{addr}:{PROXY_PORT + 1}", "--forward", f"unix:{sock}")
    relay = ProxyProcess(a, "--mode", "relay", "--listen", f"unix:{sock}", "--forward", f"{addr}:{PROXY_PORT + 1}")
    try:
        s.hosts.migrate(spec.name, migrateuri=f"unix://{sock}")
        res, carried = dest.result(), relay.result()
        assert res["ok"] and carried["ok"], (res, carried)
        b.wait_guest_executes(spec.name)
        assert a.domstate(spec.name) == "shut off"
        attacks = s.attacker_log().splitlines()
        print(attacks)
        assert len(attacks) == 1 and attacks[0].endswith("failed:PermissionError")  # cannot enter the directory
        assert f"incoming endpoint guarded: unix:{sock}" in s.log()
    finally:
        cleanup(s, spec.name, [dest, relay])


@pytest.mark.parametrize("case", ["listen-any", "uncovered-port", "no-migrateuri", "unix-outside"])
def test_source_choices_that_bypass_the_proxy_fail_with_the_guest_on_a(setup: Setup, tmp_path: Path,
                                                                       case: str) -> None:
    s = setup
    spec = migratable_guest(f"gd-{case}")
    define_and_start(s.hosts.a, spec, tmp_path)
    addr = s.hosts.address("B")
    try:
        if case == "listen-any":
            r = s.hosts.migrate(spec.name, "--listen-address", "0.0.0.0", port=PROXY_PORT, check=False)
            words = [f"0.0.0.0:{PROXY_PORT}", "reachable without the proxy"]
        elif case == "uncovered-port":
            r = s.hosts.migrate(spec.name, "--listen-address", "127.0.0.1", migrateuri=f"tcp://{addr}:50000",
                                check=False)
            words = ["127.0.0.1:50000", "does not cover"]
        elif case == "no-migrateuri":
            r = s.hosts.migrate(spec.name, port=None, check=False)
            words = ["reachable without the proxy"]
        else:
            other = "/run/libvirt/other"
            s.b.host_path(other).mkdir(exist_ok=True)
            s.hosts.a.host_path(other).mkdir(exist_ok=True)
            r = s.hosts.migrate(spec.name, migrateuri=f"unix://{other}/x.sock", check=False)
            words = [f"{other}/x.sock", f"not inside {SOCKDIR}"]
        assert_refused_on_b(s, spec.name, r, words)
    finally:
        cleanup(s, spec.name, [])


def test_guarded_port_without_the_proxy_fails_with_the_guest_on_a(setup: Setup, tmp_path: Path) -> None:
    """A guarded loopback port that no proxy serves: B's hook lets it start (the endpoint
    is guarded), the source cannot reach it, the migration fails, the guest stays on A."""
    s = setup
    spec = migratable_guest("gd-noproxy")
    define_and_start(s.hosts.a, spec, tmp_path)
    try:
        r = s.hosts.migrate(spec.name, "--listen-address", "127.0.0.1", port=49153, check=False)
        print(r.stderr.strip())
        assert r.returncode != 0 and "Connection refused" in r.stderr
        s.hosts.a.wait_guest_executes(spec.name)
        assert s.b.virsh("domstate", spec.name, check=False).returncode != 0
    finally:
        cleanup(s, spec.name, [])


def test_without_the_guard_migrate_begin_refuses_with_the_fix(setup: Setup, tmp_path: Path) -> None:
    s = setup
    conf = s.b.host_path(CONF)
    saved = conf.read_text()
    spec = migratable_guest("gd-noguard")
    define_and_start(s.hosts.a, spec, tmp_path)
    try:
        conf.write_text(saved.replace(f"migration_socket_dir = {SOCKDIR}\n", ""))
        s.cli_b("guard", "remove")
        r = s.hosts.migrate(spec.name, "--listen-address", "127.0.0.1", port=PROXY_PORT, check=False)
        assert_refused_on_b(s, spec.name, r, ["no guard keeps QEMU's incoming endpoint behind the proxy",
                                              "run: libvirt-mdev guard install"])
        assert "migrate begin" in [ln for ln in s.log().splitlines() if "REFUSED" in ln][-1]
        # a broken socket directory does not count as a guard either
        conf.write_text(saved)
        s.b.host_path(SOCKDIR).chmod(0o777)
        r = s.hosts.migrate(spec.name, migrateuri=f"unix://{SOCKDIR}/gd.sock", check=False)
        assert_refused_on_b(s, spec.name, r, ["others have access", "run: libvirt-mdev guard install"])
    finally:
        conf.write_text(saved)
        s.b.host_path(SOCKDIR).chmod(0o750)
        s.cli_b("guard", "install")
        cleanup(s, spec.name, [])


def test_control_without_nftables_the_attacker_connects_and_started_begin_refuses(setup: Setup,
                                                                                  tmp_path: Path) -> None:
    """The same attacker without the nftables guard (the UNIX guard keeps ``migrate begin``
    open): it reaches B's QEMU — the bypass of issue 11 — and ``started begin`` refuses
    the TCP endpoint, so the migration fails with the guest on A."""
    s = setup
    spec = migratable_guest("gd-control")
    define_and_start(s.hosts.a, spec, tmp_path)
    s.attack(f"127.0.0.1:{PROXY_PORT}")
    try:
        s.cli_b("guard", "remove")
        r = s.hosts.migrate(spec.name, "--listen-address", "127.0.0.1", port=PROXY_PORT, check=False)
        assert_refused_on_b(s, spec.name, r, [f"127.0.0.1:{PROXY_PORT} but no nftables guard is in place",
                                              "run: libvirt-mdev guard install"])
        attacks = s.attacker_log().splitlines()
        assert len(attacks) == 1 and attacks[0].endswith("connected-and-sent"), attacks
    finally:
        s.cli_b("guard", "install")
        cleanup(s, spec.name, [])


def test_unarmed_domain_through_the_proxy_is_refused_before_any_byte(setup: Setup, tmp_path: Path) -> None:
    """Issue 15: an mdev-less domain with ``arm_all = no`` is not armed; migrating it to
    the proxy used to fail mid-stream with only "Unable to write to socket".  Now
    ``started begin`` sees QEMU waiting behind the proxy and refuses with the fix."""
    s = setup
    conf = s.b.host_path(CONF)
    saved = conf.read_text()
    spec = migratable_guest("gd-unarmed")
    define_and_start(s.hosts.a, spec, tmp_path)
    proxy = ProxyProcess(s.b, "--listen", f"{s.hosts.address('B')}:{PROXY_PORT}", "--forward", f"127.0.0.1:{PROXY_PORT}")
    try:
        conf.write_text(saved.replace("arm_all = yes", "arm_all = no"))
        r = s.hosts.migrate(spec.name, "--listen-address", "127.0.0.1", port=PROXY_PORT, check=False)
        assert_refused_on_b(s, spec.name, r, [f"domain {spec.name} has no mdev hostdevs and arm_all = no",
                                              "set arm_all = yes"])
        assert proxy.proc.poll() is None  # the proxy never saw a connection
    finally:
        conf.write_text(saved)
        cleanup(s, spec.name, [proxy])
