"""The nftables guard for real, inside a network namespace each test creates: install,
check, remove, idempotence; a non-root client is reset while root passes; the hook's
``started begin`` endpoint check against a fake QEMU; the proxy's connection-time check."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from libvirt_mdev.cli.hookcmd import install as install_hook
from libvirt_mdev.store.pending import read_pending, write_pending

from .conftest import NOBODY, Netns, start_fake_qemu

DOM_UUID = "5a9c2a4e-7d1b-4b8e-8f57-0c1d2e3f4001"
PLAIN = (f"<domain type='qemu'><name>vm1</name><uuid>{DOM_UUID}</uuid><memory unit='KiB'>131072</memory>"
         f"<devices></devices></domain>")
CONNECT = """
import socket, sys
fam = socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET
s = socket.socket(fam)
s.settimeout(5)
try:
    s.connect((sys.argv[1], int(sys.argv[2])))
    print('connected')
except ConnectionRefusedError:
    print('refused')
"""


@pytest.fixture
def env(tmp_path: Path) -> dict[str, Path]:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "qemu.conf").write_text("migration_port_min = 49152\nmigration_port_max = 49215\n")
    conf = etc / "libvirt-mdev.conf"
    conf.write_text(f"[libvirt-mdev]\nqemu_conf = {etc / 'qemu.conf'}\nguard_ports = 49300\n"
                    f"runtime_dir = {tmp_path / 'run'}\nqemu_run_dir = {tmp_path / 'qemu'}\n"
                    f"log_file = {tmp_path / 'hook.log'}\nstore = {tmp_path / 'store'}\n"
                    f"sysfs_root = {tmp_path / 'sys'}\n")
    (tmp_path / "sys").mkdir()
    return {"conf": conf, "qemu.conf": etc / "qemu.conf", "root": tmp_path}


def connect(ns: Netns, host: str, port: int, uid: int | None) -> str:
    code = CONNECT.replace("sys.argv[1]", repr(host)).replace("sys.argv[2]", repr(str(port)))
    return ns.py(code, uid=uid).stdout.strip()


def test_install_check_remove_and_idempotence(netns: Netns, env: dict[str, Path]) -> None:
    conf = env["conf"]
    r = netns.cli(conf, "guard", "check", check=False)
    assert r.returncode == 13 and r.stderr.count("\n") == 1 and "libvirt-mdev guard install" in r.stderr
    assert "installed" in netns.cli(conf, "guard", "install").stdout
    assert "unchanged" in netns.cli(conf, "guard", "install").stdout
    rules = netns.run(["nft", "-a", "list", "ruleset"]).stdout
    assert rules.count("table inet libvirt_mdev") == 1 and rules.count("reject with tcp reset") == 1
    status = json.loads(netns.cli(conf, "guard", "check", "--json").stdout)
    assert status["ok"] and status["nft"]["ports"] == [[49152, 49215], [49300, 49300]]
    # qemu.conf widened: the installed guard no longer covers everything
    env["qemu.conf"].write_text("migration_port_min = 49152\nmigration_port_max = 49250\n")
    r = netns.cli(conf, "guard", "check", check=False)
    assert r.returncode == 13 and "does not cover port(s) 49216-49250" in r.stderr
    assert "updated" in netns.cli(conf, "guard", "install").stdout
    assert netns.cli(conf, "guard", "check").returncode == 0
    assert "removed" in netns.cli(conf, "guard", "remove").stdout
    assert "absent" in netns.cli(conf, "guard", "remove").stdout
    assert netns.cli(conf, "guard", "check", check=False).returncode == 13


def test_non_root_loopback_client_is_reset_root_passes(netns: Netns, env: dict[str, Path],
                                                       fake_qemu_binary: Path) -> None:
    with start_fake_qemu(fake_qemu_binary, ["tcp:127.0.0.1:49160", "tcp:[::1]:49300", "tcp:127.0.0.1:50000"],
                         "vm1", netns=netns):
        # no guard: anyone reaches QEMU's loopback port (the bypass of issue 11)
        assert connect(netns, "127.0.0.1", 49160, NOBODY) == "connected"
        netns.cli(env["conf"], "guard", "install")
        assert connect(netns, "127.0.0.1", 49160, NOBODY) == "refused"
        assert connect(netns, "::1", 49300, NOBODY) == "refused"
        assert connect(netns, "127.0.0.1", 49160, None) == "connected"  # root: the proxy, libvirtd
        assert connect(netns, "::1", 49300, None) == "connected"
        assert connect(netns, "127.0.0.1", 50000, NOBODY) == "connected"  # not a guarded port
        netns.cli(env["conf"], "guard", "remove")
        assert connect(netns, "127.0.0.1", 49160, NOBODY) == "connected"


def _hook(tmp: Path, conf: Path) -> Path:
    hook, _ = install_hook(tmp / "qemu.d", conf)
    return hook


def _call(ns: Netns, hook: Path, op: str, sub: str, xml: str = PLAIN, reason: str = "-") -> tuple[int, str]:
    r = ns.run([str(hook), "vm1", op, sub, reason], input=xml, check=False,
               env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"})
    assert r.stdout == ""
    return r.returncode, r.stderr


def _arm(root: Path) -> None:
    write_pending(root / "run", {"domain_name": "vm1", "domain_uuid": DOM_UUID, "migration_id": "m1",
                                 "created": 1, "devices": []})


def test_migrate_begin_refuses_without_a_guard_and_arms_with_one(netns: Netns, env: dict[str, Path]) -> None:
    conf, root = env["conf"], env["root"]
    conf.write_text(conf.read_text() + "arm_all = yes\n")
    hook = _hook(root, conf)
    rc, err = _call(netns, hook, "migrate", "begin")
    assert rc == 1 and err.count("\n") == 1
    assert err.startswith("libvirt-mdev: incoming migration refused: no guard keeps QEMU's incoming endpoint")
    assert err.rstrip().endswith("run: libvirt-mdev guard install")
    assert read_pending(root / "run", DOM_UUID) is None
    netns.cli(conf, "guard", "install")
    assert _call(netns, hook, "migrate", "begin") == (0, "")
    assert read_pending(root / "run", DOM_UUID) is not None


@pytest.mark.parametrize("listen,ok,words,via_proxy", [
    (["tcp:127.0.0.1:49160"], True, [], True),
    (["tcp:[::1]:49300"], True, [], True),
    (["tcp:0.0.0.0:49161"], False, ["0.0.0.0:49161", "reachable without the proxy"], False),
    (["tcp:127.0.0.1:49160", "tcp:[::]:49162"], False, ["[::]:49162"], True),
    (["tcp:127.0.0.1:50000"], False, ["127.0.0.1:50000", "does not cover"], False),
    ([], False, ["no listening migration socket"], False),
    (["unix:SOCKDIR/in.sock"], True, [], True),
    (["unix:ROOT/elsewhere.sock"], False, ["elsewhere.sock", "not inside"], False),
])
def test_started_begin_checks_the_armed_qemus_endpoint(netns: Netns, env: dict[str, Path], fake_qemu_binary: Path,
                                                       listen: list[str], ok: bool, words: list[str],
                                                       via_proxy: bool) -> None:
    conf, root = env["conf"], env["root"]
    sockdir = root / "mig"
    sockdir.mkdir(mode=0o750)
    sockdir.chmod(0o750)
    conf.write_text(conf.read_text() + f"migration_socket_dir = {sockdir}\n")
    netns.cli(conf, "guard", "install")
    hook = _hook(root, conf)
    listen = [x.replace("SOCKDIR", str(sockdir)).replace("ROOT", str(root)) for x in listen]
    with start_fake_qemu(fake_qemu_binary, listen, "vm1", netns=netns, pid_dir=root / "qemu"):
        # not armed (mdev-less, arm_all = no): a direct migration passes; one that can only come
        # through the proxy is refused now, as the proxy would refuse it mid-stream (issue 15)
        rc, err = _call(netns, hook, "started", "begin")
        if via_proxy:
            assert rc == 1 and "has no mdev hostdevs and arm_all = no, so the proxy would refuse" in err
            assert "set arm_all = yes" in err and err.count("\n") == 1
        else:
            assert (rc, err) == (0, "")
        _arm(root)
        rc, err = _call(netns, hook, "started", "begin")
        if ok:
            assert (rc, err) == (0, "")
            assert "incoming endpoint guarded" in (root / "hook.log").read_text()
        else:
            assert rc == 1 and err.count("\n") == 1 and err.startswith("libvirt-mdev: incoming migration refused: ")
            for w in words:
                assert w in err, err


def test_started_begin_of_a_plain_start_with_a_stale_record_passes(netns: Netns, env: dict[str, Path],
                                                                   fake_qemu_binary: Path) -> None:
    root = env["root"]
    hook = _hook(root, env["conf"])
    _arm(root)
    with start_fake_qemu(fake_qemu_binary, [], "vm1", incoming=False, netns=netns, pid_dir=root / "qemu"):
        assert _call(netns, hook, "started", "begin") == (0, "")


def test_started_begin_refuses_a_pid_that_is_not_the_domains_qemu(netns: Netns, env: dict[str, Path],
                                                                  fake_qemu_binary: Path) -> None:
    root = env["root"]
    hook = _hook(root, env["conf"])
    _arm(root)
    with start_fake_qemu(fake_qemu_binary, ["tcp:127.0.0.1:49160"], "other", netns=netns) as q:
        (root / "qemu").mkdir()
        (root / "qemu" / "vm1.pid").write_text(str(q.pid))
        rc, err = _call(netns, hook, "started", "begin")
        assert rc == 1 and "is not the QEMU of domain vm1" in err
        (root / "qemu" / "vm1.pid").write_text(str(os.getpid()))  # python in the root netns, not qemu
        rc, err = _call(netns, hook, "started", "begin")
        assert rc == 1 and "not the QEMU of domain vm1" in err


def test_release_end_accepts_both_reason_forms(netns: Netns, env: dict[str, Path]) -> None:
    root = env["root"]
    hook = _hook(root, env["conf"])
    for reason in ("-", "migrated", "destroyed", "saved"):
        _arm(root)
        assert _call(netns, hook, "release", "end", reason=reason) == (0, "")
        assert read_pending(root / "run", DOM_UUID) is None
        last = (root / "hook.log").read_text().splitlines()[-1]
        assert "pending record removed" in last
        assert (f"reason {reason}" in last) == (reason != "-")
        assert ("store gc skipped" in last) == (reason == "saved")


FORWARD = """
from pathlib import Path
from libvirt_mdev.config import load_config
from libvirt_mdev.errors import GuardError
from libvirt_mdev.live.endpoint import check_forward_endpoint
cfg = load_config(CONF)
for kw in ARGS:
    try:
        check_forward_endpoint(cfg, **kw)
        print("ok")
    except GuardError as exc:
        print("refused:", exc)
"""


def test_proxy_connection_time_check(netns: Netns, env: dict[str, Path]) -> None:
    conf, root = env["conf"], env["root"]
    sockdir = root / "mig"
    sockdir.mkdir(mode=0o700)
    conf.write_text(conf.read_text() + f"migration_socket_dir = {sockdir}\n")
    args = [{"host": "127.0.0.1", "port": 49160}, {"host": "::1", "port": 49300}, {"host": "localhost", "port": 49161},
            {"host": "127.0.0.1", "port": 50000}, {"host": "10.1.2.3", "port": 49160},
            {"path": str(sockdir / "q.sock")}, {"path": str(root / "q.sock")}]
    code = FORWARD.replace("CONF", repr(str(conf))).replace("ARGS", repr(args))

    def run() -> list[str]:
        return netns.py(code).stdout.splitlines()

    without = run()
    assert all("no nftables guard" in line and line.endswith("run: libvirt-mdev guard install")
               for line in without[:4])
    assert "reachable without the proxy" in without[4]
    assert without[5] == "ok" and without[6].startswith("refused:")
    netns.cli(conf, "guard", "install")
    got = run()
    assert got[:3] == ["ok", "ok", "ok"]
    assert got[3].startswith("refused: the proxy forwards to 127.0.0.1:50000") and "does not cover" in got[3]
    assert "reachable without the proxy" in got[4]
    sockdir.chmod(0o777)  # the UNIX guard broken at run time
    assert run()[5].startswith("refused:") and "others have access" in run()[5]
    netns.run(["nft", "flush", "ruleset"])  # the nft guard removed at run time
    assert "no nftables guard" in run()[0]


def test_require_guard_no_arms_without_a_guard_and_check_says_so(netns: Netns, env: dict[str, Path]) -> None:
    conf, root = env["conf"], env["root"]
    conf.write_text(conf.read_text() + "arm_all = yes\nrequire_guard = no\n")
    hook = _hook(root, conf)
    assert _call(netns, hook, "migrate", "begin") == (0, "")
    assert "arming without the no-bypass guard" in (root / "hook.log").read_text()
    r = netns.cli(conf, "guard", "check", check=False)
    assert r.returncode == 13 and "require_guard = no" in r.stderr
