"""The hook as libvirt calls it, for every operation, with a fake sysfs tree."""
from __future__ import annotations

import io
import json
import statistics
import subprocess
import sys
import time

import pytest

from libvirt_mdev.hook import main
from libvirt_mdev.store.pending import PendingDevice, read_pending, write_pending

from .conftest import ALL_OPS, DOM_UUID, GATES, U1, U2, U3, HookEnv, domain_xml

MATCH = domain_xml({U1: "nvidia-222", U2: "nvidia-224"})
MISMATCH = domain_xml({U1: "nvidia-222", U2: "nvidia-223"})  # this host has U2 as nvidia-224
MISSING = domain_xml({U3: "nvidia-222"})
UNANNOTATED = domain_xml({U1: None}, annotated=False)
PARTLY = domain_xml({U1: "nvidia-222", U2: None})
PLAIN = domain_xml({}, annotated=False)
MALFORMED = b"<domain><name>vm1</name><devices><hostdev"
EMPTY = b""

CASES = {
    # name: (stdin, gate refuses?, words in the refusal line)
    "match": (MATCH, False, ()),
    "plain": (PLAIN, False, ()),
    "mismatch": (MISMATCH, True, (U2, "source type nvidia-223", "this host has type nvidia-224")),
    "missing": (MISSING, True, (U3, "nvidia-222", "does not exist on this host")),
    "unannotated": (UNANNOTATED, True, (U1, "no source type annotation", "nvidia-222")),
    "partly-annotated": (PARTLY, True, (U2, "no source type annotation")),
    "malformed": (MALFORMED, True, ("not well-formed",)),
    "empty": (EMPTY, True, ("no domain XML on stdin",)),
}


@pytest.mark.parametrize("op,sub", ALL_OPS, ids=[f"{o}-{s}" for o, s in ALL_OPS])
@pytest.mark.parametrize("case", list(CASES))
def test_every_operation_with_every_input(hook_env: HookEnv, op: str, sub: str, case: str) -> None:
    stdin, refuses, words = CASES[case]
    if (op, sub, case) == ("restore", "begin", "match"):
        # types match, but no libvirt-mdev splice verified this image: no permit (docs/saveimages.md)
        refuses, words = True, ("libvirt-mdev splice",)
    r = hook_env.call(op, sub, stdin)
    assert r.stdout == b""  # stdout would replace the domain XML
    if (op, sub) in GATES and refuses:
        assert r.returncode == 1
        err = r.stderr.decode()
        assert err.count("\n") == 1 and err.startswith("libvirt-mdev: ")
        assert ("incoming migration refused" if op == "migrate" else "restore refused") in err
        for w in words:
            assert w in err
        assert "Traceback" not in err
    else:
        assert (r.returncode, r.stderr) == (0, b"")
    log = hook_env.log_lines()
    if (op, sub) in GATES:
        assert len(log) >= 1 and f"{op} {sub} domain=vm1:" in log[-1]
        assert ("REFUSED" in log[-1]) == refuses
    elif (op, sub) == ("release", "end"):
        assert len(log) >= 1 and f"{op} {sub} domain=vm1:" in log[-1]
    else:
        assert log == []  # no-ops are logged only with log_level = debug (issue 15)


def test_migrate_begin_match_arms_a_pending_record(hook_env: HookEnv) -> None:
    r = hook_env.call("migrate", "begin", MATCH)
    assert r.returncode == 0
    rec = read_pending(hook_env.runtime_dir, DOM_UUID)
    assert rec is not None
    assert rec.domain_name == "vm1" and rec.domain_uuid == DOM_UUID
    assert rec.devices == (PendingDevice(U1, "0000:00:05.0/vfio", "nvidia-222"),
                           PendingDevice(U2, "0000:00:06.0/vfio", "nvidia-224"))
    assert abs(rec.created - time.time()) < 60
    assert "armed" in hook_env.log_lines()[-1]
    assert (hook_env.runtime_dir.stat().st_mode & 0o777) == 0o700


@pytest.mark.parametrize("case", ["mismatch", "missing", "unannotated", "malformed", "empty", "plain"])
def test_migrate_begin_arms_nothing_unless_allowed_with_mdevs(hook_env: HookEnv, case: str) -> None:
    hook_env.call("migrate", "begin", CASES[case][0])
    assert read_pending(hook_env.runtime_dir, DOM_UUID) is None


def test_arm_all_arms_a_domain_without_mdevs_with_no_devices(hook_env: HookEnv) -> None:
    """arm_all: the proxy may be always in the path; an mdev-less domain is armed with
    no devices (the proxy then refuses any VFIO state in its stream)."""
    hook_env.write_config(arm_all="yes")
    r = hook_env.call("migrate", "begin", CASES["plain"][0])
    assert r.returncode == 0, r.stderr
    rec = read_pending(hook_env.runtime_dir, DOM_UUID)
    assert rec is not None and rec.devices == () and rec.domain_name == "vm1"
    assert "no mdev hostdevs (arm_all)" in hook_env.log_lines()[-1]
    # a mismatch is still refused, arm_all or not
    assert hook_env.call("migrate", "begin", MISMATCH).returncode == 1


def test_restore_begin_writes_no_pending_record(hook_env: HookEnv) -> None:
    r = hook_env.call("restore", "begin", MATCH)
    assert r.returncode == 1 and b"libvirt-mdev splice" in r.stderr  # no permit for an unverified image
    assert read_pending(hook_env.runtime_dir, DOM_UUID) is None


def test_release_end_removes_the_pending_record(hook_env: HookEnv) -> None:
    assert hook_env.call("migrate", "begin", MATCH).returncode == 0
    assert read_pending(hook_env.runtime_dir, DOM_UUID) is not None
    r = hook_env.call("release", "end", MATCH)
    assert (r.returncode, r.stdout, r.stderr) == (0, b"", b"")
    assert read_pending(hook_env.runtime_dir, DOM_UUID) is None
    assert "pending record removed" in hook_env.log_lines()[-1]
    hook_env.call("release", "end", MATCH)
    assert "pending record absent" in hook_env.log_lines()[-1]


def test_release_end_runs_store_gc_for_the_domain(hook_env: HookEnv) -> None:
    from libvirt_mdev.store.store import Store

    Store.open(hook_env.store, create=True).close()
    assert hook_env.call("release", "end", PLAIN).returncode == 0
    assert "store gc removed 0 manifest(s)" in hook_env.log_lines()[-1]


def test_unannotated_allowed_when_not_required(hook_env: HookEnv) -> None:
    hook_env.write_config(require_annotation="no")
    r = hook_env.call("migrate", "begin", UNANNOTATED)
    assert (r.returncode, r.stderr) == (0, b"")
    rec = read_pending(hook_env.runtime_dir, DOM_UUID)
    assert rec is not None and rec.devices[0].type is None


def test_broken_config_refuses_gates_only(hook_env: HookEnv) -> None:
    hook_env.config.write_text("[libvirt-mdev]\nsysfs_root = relative/path\n")
    r = hook_env.call("restore", "begin", MATCH)
    assert r.returncode == 1 and b"sysfs_root must be an absolute path" in r.stderr
    assert hook_env.call("start", "begin", MATCH).returncode == 0


def test_unreadable_sysfs_refuses_in_one_line(hook_env: HookEnv) -> None:
    link = hook_env.sysfs / "devices/pci0000:00/0000:3b:00.0" / U1 / "mdev_type"
    link.unlink()
    link.symlink_to("../mdev_supported_types/vanished")
    r = hook_env.call("migrate", "begin", MATCH)
    assert r.returncode == 1
    assert r.stderr.decode().count("\n") == 1 and f"cannot read the type of mdev {U1}" in r.stderr.decode()


def test_bad_runtime_dir_refuses_migration(hook_env: HookEnv) -> None:
    hook_env.runtime_dir.mkdir(mode=0o777)
    hook_env.runtime_dir.chmod(0o777)  # not 0700: the store's checks refuse it
    r = hook_env.call("migrate", "begin", MATCH)
    assert r.returncode == 1 and b"runtime" in r.stderr and r.stderr.count(b"\n") == 1


def test_environment_variables_are_ignored(hook_env: HookEnv, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Only the baked config path counts: a LIBVIRT_MDEV_CONFIG in the daemon's env must not."""
    lax = tmp_path / "lax.conf"
    lax.write_text("[libvirt-mdev]\nrequire_annotation = no\n")
    r = subprocess.run([str(hook_env.hook), "vm1", "restore", "begin", "-"], input=UNANNOTATED,
                       env={"PATH": "/usr/bin:/bin", "LC_ALL": "C", "LIBVIRT_MDEV_CONFIG": str(lax),
                            "PYTHONPATH": "/nonexistent"}, capture_output=True, timeout=30)
    assert r.returncode == 1


def test_no_child_keeps_stdout_or_stderr_open(hook_env: HookEnv) -> None:
    """libvirt waits for EOF on both pipes; read them to EOF as libvirt does, with a deadline."""
    for op, sub in ALL_OPS:
        p = subprocess.Popen([str(hook_env.hook), "vm1", op, sub, "-"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={"PATH": "/usr/bin:/bin"})
        p.communicate(MATCH, timeout=20)
        # started begin after the armed migrate begin: no QEMU of vm1 runs here, so the
        # endpoint check refuses (the guard tests cover that case)
        # and restore begin: no splice verified an image for vm1 (no permit)
        assert p.returncode == (1 if (op, sub) in (("started", "begin"), ("restore", "begin")) else 0)


def test_hook_imports_neither_libvirt_nor_click() -> None:
    from pathlib import Path

    repo = str(Path(__file__).resolve().parents[2])
    code = (
        f"import io, sys; sys.path.insert(0, {repo!r})\n"
        "from libvirt_mdev.hook import main\n"
        "main(['vm', 'started', 'begin', '-'], io.BytesIO(b''), io.BytesIO(), io.StringIO(), '/nonexistent.conf')\n"
        "noop = sorted(m for m in ('libvirt', 'click', 'lxml') if m in sys.modules)\n"
        "main(['vm', 'restore', 'begin', '-'], io.BytesIO(b'<domain><name>vm</name></domain>'), io.BytesIO(),"
        " io.StringIO(), '/nonexistent-default.conf')\n"
        "gate = sorted(m for m in ('libvirt', 'click', 'lxml') if m in sys.modules)\n"
        "print(noop, gate)\n")
    r = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=30)
    assert r.stdout.strip() == "[] ['lxml']", r.stderr


def test_noop_call_is_fast(hook_env: HookEnv) -> None:
    """Target < 150 ms per no-op call on these machines (measured ~70 ms median); the bound
    here is looser so a loaded CI box does not flake, and the number is printed."""
    times = []
    for _ in range(7):
        t = time.perf_counter()
        assert hook_env.call("started", "begin", MATCH).returncode == 0
        times.append((time.perf_counter() - t) * 1000)
    med = statistics.median(times)
    print(f"no-op hook call: median {med:.0f} ms, min {min(times):.0f} ms")
    assert med < 300


def test_main_in_process_contract() -> None:
    out, err = io.BytesIO(), io.StringIO()
    assert main(["vm"], io.BytesIO(), out, err) == 2 and "DOMAIN OPERATION SUBOP" in err.getvalue()
    err = io.StringIO()
    assert main(["vm", "stopped", "end", "-"], io.BytesIO(MATCH), out, err, "/nonexistent.conf") == 0
    assert out.getvalue() == b"" and err.getvalue() == ""


def test_pending_record_is_replaced_by_a_new_migration(hook_env: HookEnv) -> None:
    write_pending(hook_env.runtime_dir, {"domain_name": "vm1", "domain_uuid": DOM_UUID, "migration_id": "old",
                                         "created": 1, "devices": []})
    assert hook_env.call("migrate", "begin", MATCH).returncode == 0
    rec = read_pending(hook_env.runtime_dir, DOM_UUID)
    assert rec is not None and rec.migration_id != "old" and len(rec.devices) == 2
    json.dumps(rec.to_dict())


def test_noops_are_logged_only_at_debug_level(hook_env: HookEnv) -> None:
    assert hook_env.call("prepare", "begin", MATCH).returncode == 0
    assert hook_env.log_lines() == []
    hook_env.write_config(log_level="debug")
    assert hook_env.call("prepare", "begin", MATCH).returncode == 0
    assert hook_env.call("started", "begin", MATCH).returncode == 0
    lines = hook_env.log_lines()
    assert len(lines) == 2 and " DEBUG " in lines[0] and lines[0].endswith("prepare begin domain=vm1: no-op")
    assert "started begin domain=vm1: no-op" in lines[1]


def test_hook_noop_imports_nothing_it_does_not_need() -> None:
    from pathlib import Path

    repo = str(Path(__file__).resolve().parents[2])
    code = (f"import io, sys; sys.path.insert(0, {repo!r})\n"
            "before = set(sys.modules)\n"
            "from libvirt_mdev.hook import main\n"
            "main(['vm', 'prepare', 'begin', '-'], io.BytesIO(b''), io.BytesIO(), io.StringIO(), '/nonexistent.conf')\n"
            "print(sorted(m for m in set(sys.modules) - before if not m.startswith('libvirt_mdev')))\n")
    r = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True, text=True, timeout=30)
    extra = set(eval(r.stdout))
    assert not extra & {"typing", "logging", "configparser", "lxml", "json", "re", "socket"}, extra
