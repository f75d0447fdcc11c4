"""The harness drives the real libvirtd and QEMU: each test checks one thing others will rely on."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import record_timing
from tests.harness import HarnessError, LibvirtHost, versions
from tests.harness._proc import pid_alive
from tests.harness.guests import RAM_FILL_ADDR, GuestSpec, migratable_guest
from tests.harness.migration import define_and_start
from tests.harness.qemu_vm import QemuVM

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
QEVM_MAGIC = bytes.fromhex("5145564d")
LIBVIRT_SAVE_MAGIC = b"LibvirtQemudSave"


def remove_domain(host: LibvirtHost, name: str) -> None:
    if host.domstate(name) != "shut off":
        host.virsh("destroy", name)
    host.virsh("undefine", name)


def test_guest_defines_starts_and_runs(libvirt_host: LibvirtHost, tmp_path: Path) -> None:
    spec = GuestSpec(name="lm-run", metadata=['<x:tag xmlns:x="urn:lm-test">hello</x:tag>'])
    started = time.monotonic()
    define_and_start(libvirt_host, spec, tmp_path)
    record_timing("define+start lm-run", time.monotonic() - started)
    try:
        libvirt_host.wait_guest_executes(spec.name)
        live = libvirt_host.virsh("dumpxml", spec.name).stdout
        assert "urn:lm-test" in live and "qemu-xhci" in live and "<interface type='user'>" in live
        # libvirt resolves machine='pc' to the versioned type QEMU records in streams; versions asks QEMU the same
        assert f"machine='{versions.machine_type('pc')}'" in live
        conn = libvirt_host.libvirt_connect()
        try:
            assert conn.lookupByName(spec.name).UUIDString() == spec.uuid
        finally:
            conn.close()
    finally:
        remove_domain(libvirt_host, spec.name)


def test_save_image_restores_and_runs(libvirt_host: LibvirtHost, real_save_image: Path,
                                      real_save_guest: GuestSpec) -> None:
    head = real_save_image.read_bytes()[:16]
    assert head == LIBVIRT_SAVE_MAGIC
    assert real_save_image.read_bytes().find(QEVM_MAGIC + b"\x00\x00\x00\x03") > 0
    assert libvirt_host.domstate(real_save_guest.name) == "shut off"
    started = time.monotonic()
    libvirt_host.virsh("restore", str(real_save_image))
    record_timing("virsh restore", time.monotonic() - started)
    try:
        libvirt_host.wait_guest_executes(real_save_guest.name)
        assert real_save_guest.uuid in libvirt_host.virsh("domuuid", real_save_guest.name).stdout
    finally:
        libvirt_host.virsh("destroy", real_save_guest.name)


def test_qmp_stream_has_qevm_header_and_loads(real_qmp_stream: Path, tmp_path: Path) -> None:
    with real_qmp_stream.open("rb") as fh:
        assert fh.read(8) == QEVM_MAGIC + (3).to_bytes(4, "big")
    assert real_qmp_stream.stat().st_size > 64 * 1024
    with QemuVM(tmp_path, name="qmp-dst", incoming_defer=True) as dst:
        assert dst.status() == "inmigrate"
        dst.incoming(f"exec:cat {real_qmp_stream}")
        dst.wait_status("running", timeout=120)
        assert dst.query_migrate().get("status") == "completed"


def test_hooks_in_qemu_d_fire(libvirt_host: LibvirtHost, tmp_path: Path) -> None:
    hooks_log = libvirt_host.host_path("/var/log/libvirt/hooks.log")
    spec = migratable_guest("lm-hook")
    define_and_start(libvirt_host, spec, tmp_path)
    try:
        libvirt_host.virsh("destroy", spec.name)
        release_extras = versions.release_extras(libvirt_host, spec.name)
    finally:
        remove_domain(libvirt_host, spec.name)
    calls = versions.hook_calls(hooks_log.read_text(), spec.name)
    assert [(op, sub) for op, sub, _ in calls] == [
        ("prepare", "begin"), ("start", "begin"), ("started", "begin"), ("stopped", "end"), ("release", "end")]
    assert [extra for _, _, extra in calls[:4]] == ["-"] * 4
    # libvirt 9.0 passes "-" to `release end`, libvirt 11 the shutoff reason: here "destroyed", nothing else
    assert release_extras == ("-", "destroyed") and calls[4][2] in release_extras


@pytest.mark.slow
def test_live_migration_between_two_hosts(two_hosts, tmp_path: Path) -> None:
    a, b = two_hosts.a, two_hosts.b
    spec = migratable_guest("lm-mig")
    define_and_start(a, spec, tmp_path)
    try:
        started = time.monotonic()
        two_hosts.migrate(spec.name)
        record_timing("virsh migrate --live A->B", time.monotonic() - started)
        assert a.domstate(spec.name) == "shut off"
        b.wait_guest_executes(spec.name)
        b_hooks = b.host_path("/var/log/libvirt/hooks.log").read_text().splitlines()
        assert b_hooks[:4] == [f"{spec.name} {op} -" for op in
                               ("migrate begin", "prepare begin", "start begin", "started begin")]
        a_calls = versions.hook_calls(a.host_path("/var/log/libvirt/hooks.log").read_text(), spec.name)
        assert a_calls[-2][:3] == ("stopped", "end", "-") and a_calls[-1][:2] == ("release", "end")
        assert versions.release_extras(a, spec.name) == ("-", "migrated")
        assert a_calls[-1][2] in ("-", "migrated")  # the reason is "migrated" where libvirt passes one (11.x)
        # Back again in peer-to-peer mode: B's daemon dials A's TCP listener from inside B's namespace, and
        # the guest lands on A's inactive persistent definition.
        started = time.monotonic()
        two_hosts.migrate(spec.name, src="B", p2p=True)
        record_timing("virsh migrate --live --p2p B->A", time.monotonic() - started)
        a.wait_guest_executes(spec.name)
        assert b.virsh("domstate", spec.name, check=False).returncode != 0  # transient on B: gone
    finally:
        for host in (a, b):
            if host.virsh("domstate", spec.name, check=False).stdout.strip() == "running":
                host.virsh("destroy", spec.name)
        a.virsh("undefine", spec.name)


@pytest.mark.slow
def test_command_runs_inside_host_b_namespaces(two_hosts) -> None:
    b = two_hosts.b
    assert b.run_in_ns(["hostname"]).stdout.strip() == "lmB"
    assert two_hosts.address("B") in b.run_in_ns(["ip", "-br", "addr"]).stdout
    # /var/log/libvirt inside B is B's own log dir: the file written there appears under b.log_dir.
    b.run_in_ns(["sh", "-c", "echo marker > /var/log/libvirt/ns-probe"])
    assert (b.log_dir / "ns-probe").read_text() == "marker\n"


@pytest.mark.slow
def test_migration_through_a_relay_running_on_host_b(two_hosts, tmp_path: Path) -> None:
    """The proxy path: B's QEMU listens on B's loopback only, a relay started "on B" carries the stream."""
    a, b = two_hosts.a, two_hosts.b
    port = 49160
    spec = migratable_guest("lm-relay")
    define_and_start(a, spec, tmp_path)
    relay = None
    try:
        without = two_hosts.migrate(spec.name, "--listen-address", "127.0.0.1", port=port, check=False)
        assert without.returncode != 0 and "Connection refused" in without.stderr
        assert a.domstate(spec.name) == "running"
        with (tmp_path / "relay.log").open("w") as relay_log:
            relay = b.popen_in_ns(["socat", "-d", "-d", f"TCP-LISTEN:{port},bind={b.address},reuseaddr",
                                   f"TCP:127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=relay_log)
        two_hosts.wait_listening("B", port)
        two_hosts.migrate(spec.name, "--listen-address", "127.0.0.1", port=port)
        b.wait_guest_executes(spec.name)
        assert a.domstate(spec.name) == "shut off"
        relay.wait(timeout=30)  # without fork, socat exits once the single migration connection closed
        log = (tmp_path / "relay.log").read_text()
        assert "accepting connection from" in log and "exiting with status 0" in log
    finally:
        if relay is not None and relay.poll() is None:
            relay.terminate()
            relay.wait(timeout=10)
        for host in (a, b):
            if host.virsh("domstate", spec.name, check=False).stdout.strip() == "running":
                host.virsh("destroy", spec.name)
        a.virsh("undefine", spec.name)


def test_broken_host_fails_fast_with_the_reason_and_leaves_no_daemon(tmp_path: Path, e2e_tools: None) -> None:
    host = LibvirtHost("bad", tmp_path, caps_cache=None,
                       extra_files={"/etc/libvirt/libvirtd.conf": "this is = = not valid\n"})
    started = time.monotonic()
    with pytest.raises(HarnessError) as excinfo:
        host.start()
    assert time.monotonic() - started < 15
    message = str(excinfo.value)
    assert "host bad" in message and "libvirtd.conf" in message and "syntax error" in message
    # virtlogd started before libvirtd failed; the failed start must have stopped it.
    assert "virtlogd" in host.launched_pids
    assert not any(pid_alive(pid) for pid in host.launched_pids.values())


def sample_pages(fill: Path, first: int = 0, last: int | None = None, count: int = 8) -> list[bytes]:
    """Page-aligned 4 KiB pieces spread over fill[first:last]: each is one whole guest page, stored verbatim."""
    data = fill.read_bytes()[first:last]
    pages = len(data) // 4096
    return [data[i * 4096:(i + 1) * 4096] for i in range(0, pages, max(1, pages // count))]


def test_filled_save_image_carries_the_fill_bytes(real_save_image_filled: Path, ram_fill_file: Path) -> None:
    image = real_save_image_filled.read_bytes()
    assert image[:16] == LIBVIRT_SAVE_MAGIC
    assert len(image) > ram_fill_file.stat().st_size
    missing = [i for i, page in enumerate(sample_pages(ram_fill_file)) if image.find(page) < 0]
    assert not missing, f"fill pages {missing} not found in the save image"


def test_filled_qmp_stream_carries_all_ram(real_qmp_stream_filled: Path) -> None:
    ram = real_qmp_stream_filled.parent / "qmp-ram.bin"
    stream = real_qmp_stream_filled.read_bytes()
    assert stream[:8] == QEVM_MAGIC + (3).to_bytes(4, "big")
    assert len(stream) > 256 << 20
    # SeaBIOS writes the low megabyte and tables at the top of RAM; the pages between stay as the file had them.
    pages = sample_pages(ram, first=RAM_FILL_ADDR, last=-(1 << 20))
    missing = [i for i, page in enumerate(pages) if stream.find(page) < 0]
    assert not missing, f"RAM pages {missing} not found in the stream"


def test_qemu_that_fails_to_start_reports_its_stderr(tmp_path: Path) -> None:
    vm = QemuVM(tmp_path, name="bad", with_disk=False, extra_args=["-device", "no-such-device"])
    with pytest.raises(HarnessError) as excinfo:
        vm.start()
    assert "QEMU bad exited" in str(excinfo.value) and "no-such-device" in str(excinfo.value)
    assert vm.proc is None


def test_a_forgotten_qemu_is_stopped_when_python_exits(tmp_path: Path) -> None:
    """The atexit safety net: a test process that never calls stop() must not leave QEMU behind."""
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from tests.harness.qemu_vm import QemuVM\n"
        f"vm = QemuVM(Path({str(tmp_path)!r}), name='forgotten', with_disk=False)\n"
        "vm.start()\n"
        "print(vm.proc.pid, flush=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60,
                          check=True)
    pid = int(proc.stdout.split()[0])
    deadline = time.monotonic() + 5  # a loaded machine may take a moment to tear the process down
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(pid), f"QEMU {pid} outlived the Python process that started it"


@pytest.mark.slow
def test_sigterm_to_pytest_still_stops_the_private_daemons(tmp_path: Path, e2e_tools: None) -> None:
    """timeout(1) in .ci/test ends a hung suite with SIGTERM: the session's libvirtd must not outlive pytest."""
    pid_file = tmp_path / "libvirtd.pid"
    (tmp_path / "test_hold.py").write_text(
        "import time\n"
        "def test_hold(libvirt_host):\n"
        f"    open({str(pid_file)!r}, 'w').write(str(libvirt_host.libvirtd_pid))\n"
        "    time.sleep(600)\n")
    # tests.conftest as a plugin: the inner run gets the real fixtures (and the SIGTERM handler) for a file outside
    inner = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest",
                              "--rootdir", str(tmp_path), "--basetemp", str(tmp_path / "base"),
                              str(tmp_path / "test_hold.py")],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not pid_file.exists() or not pid_file.read_text():
            assert inner.poll() is None, inner.communicate()[0]
            assert time.monotonic() < deadline, "the inner run never started its libvirt host"
            time.sleep(0.2)
        libvirtd = int(pid_file.read_text())
        assert pid_alive(libvirtd)
        inner.terminate()
        out, _ = inner.communicate(timeout=90)
    finally:
        if inner.poll() is None:
            inner.kill()
            inner.wait()
    assert "SIGTERM" in out and inner.returncode == 2, out  # pytest's "interrupted", after the teardown
    assert not pid_alive(libvirtd), f"libvirtd {libvirtd} outlived a SIGTERMed test run"
