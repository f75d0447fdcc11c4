"""Live migrations between two real QEMU 7.2 processes (TCG, QMP) through the proxy.

Guest RAM is backed by a random file, so the stream carries 256 MiB of real pages.
The refusals are checked where they matter: the source's ``query-migrate`` says
failed and its guest keeps running; a destination fed a bad stream fails its load.
"""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from libvirt_mdev.live.relay import Endpoint
from libvirt_mdev.stream import SectionFooter, iter_events
from tests.harness.qemu_vm import QemuVM
from tests.harness.util import free_port, random_file

from .conftest import ID_B, U2, ProxyEnv, assert_source_kept_the_guest, replay, wait_results

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
MIB = 256


@pytest.fixture(scope="module")
def ram_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_file(tmp_path_factory.mktemp("ram") / "ram.bin", MIB)



@pytest.fixture
def vms(tmp_path: Path, ram_file: Path) -> Iterator[tuple[QemuVM, QemuVM, int]]:
    """(source running the guest, destination waiting on 127.0.0.1:<port>, port)."""
    port = free_port()
    src = QemuVM(tmp_path, name="src", memory_mib=MIB, with_disk=False, ram_file=ram_file)
    dst = QemuVM(tmp_path, name="dst", memory_mib=MIB, with_disk=False, ram_file=ram_file, incoming_defer=True)
    with src, dst:
        dst.incoming(f"tcp:127.0.0.1:{port}")
        yield src, dst, port


def dest_load_failed(dst: QemuVM, timeout: float = 30) -> bool:
    """QEMU 7.2 exits when an incoming migration fails to load."""
    assert dst.proc is not None
    try:
        rc = dst.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        return False
    return rc != 0 and "load of migration failed" in dst.stderr_log.read_text()


def test_live_migration_through_the_proxy_completes_byte_for_byte(proxy_env: ProxyEnv, vms) -> None:
    src, dst, port = vms
    rec = proxy_env.arm([])
    px = proxy_env.proxy(Endpoint("127.0.0.1", port), digest=True)
    src.migrate(f"tcp:127.0.0.1:{px.address.port}")
    info = src.wait_migration(120)
    dst.wait_status("running", 60)
    wait_results(px)
    res = px.results[0]
    assert res.ok, res.error
    assert res.bytes_in == res.bytes_out and res.sha256_in == res.sha256_out
    assert res.bytes_in > MIB << 20  # every random page really travelled through the proxy
    assert res.bytes_in >= info["ram"]["transferred"] - (1 << 20)
    assert res.migration_id == rec.migration_id
    # the destination executes the guest: after a reset its vCPU leaves the reset vector
    assert dst.status() == "running"
    dst.qmp("system_reset")
    time.sleep(0.5)
    regs = dst.qmp("human-monitor-command", **{"command-line": "info registers"})
    assert "EIP=0000fff0" not in regs and dst.status() == "running"


def test_no_armed_migration_fails_the_source_which_keeps_its_guest(proxy_env: ProxyEnv, vms) -> None:
    src, dst, port = vms
    px = proxy_env.proxy(Endpoint("127.0.0.1", port))
    src.migrate(f"tcp:127.0.0.1:{px.address.port}")
    assert_source_kept_the_guest(src)
    wait_results(px)
    assert "no incoming migration is armed" in px.results[0].error
    assert dst.status() == "inmigrate"  # a refused stranger cannot spoil the armed incoming migration


def test_armed_type_mismatch_fails_the_source_which_keeps_its_guest(proxy_env: ProxyEnv, vms) -> None:
    src, _dst, port = vms
    proxy_env.arm([{"mdev_uuid": U2, "idstr": ID_B, "type": "nvidia-222"}])  # this host: nvidia-224
    px = proxy_env.proxy(Endpoint("127.0.0.1", port))
    src.migrate(f"tcp:127.0.0.1:{px.address.port}")
    assert_source_kept_the_guest(src)
    wait_results(px)
    assert px.results[0].error_kind == "type-mismatch"
    log = proxy_env.config.log_file.read_text()
    assert f"mdev {U2} ({ID_B}) was armed for type nvidia-222 but this host now has type nvidia-224" in log


def test_proxy_killed_mid_migration(proxy_env: ProxyEnv, vms) -> None:
    src, dst, port = vms
    proxy_env.arm([])
    conf = proxy_env.conf_file()
    proc = subprocess.Popen([sys.executable, "-m", "libvirt_mdev.cli", "--config", str(conf), "proxy",
                             "--listen", "127.0.0.1:0", "--forward", f"127.0.0.1:{port}", "--json-log"],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        hello = json.loads(proc.stdout.readline())
        assert hello["event"] == "listening" and hello["forward"] == f"127.0.0.1:{port}"
        src.migrate(f"tcp:127.0.0.1:{hello['listen'].rsplit(':', 1)[1]}", max_bandwidth=48 << 20)
        src.wait_transferred(24 << 20)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(10)
    assert_source_kept_the_guest(src)
    assert dest_load_failed(dst)


def _first_footer_after(data: bytes, offset: int) -> int:
    for ev in iter_events(io.BytesIO(data)):
        if isinstance(ev, SectionFooter) and ev.offset > offset:
            return ev.offset
    raise AssertionError("no footer")


@pytest.mark.parametrize("damage", ["truncated", "corrupted"])
def test_bad_replayed_stream_fails_the_destination_qemu(proxy_env: ProxyEnv, vms, real_qmp_stream: Path,
                                                        damage: str) -> None:
    _src, dst, port = vms
    data = real_qmp_stream.read_bytes()
    if damage == "truncated":
        bad = data[: len(data) // 2]
    else:
        foot = _first_footer_after(data, len(data) // 2)
        bad = data[:foot] + b"\x7f" + data[foot + 1:]  # a section footer that is not 7e <id>
    proxy_env.arm([])
    px = proxy_env.proxy(Endpoint("127.0.0.1", port))
    replay(px.address.port, bad)
    wait_results(px)
    res = px.results[0]
    assert not res.ok and res.error_kind == "stream"
    assert res.bytes_out < len(bad) if damage == "corrupted" else res.bytes_out <= len(bad)
    assert dest_load_failed(dst)
