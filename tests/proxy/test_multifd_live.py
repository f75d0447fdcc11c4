"""Real QEMU multifd migrations (``multifd`` capability, 2 and 4 channels) through the proxy.

Two QEMUs (the one on PATH; 7.2 on this machine, whose destination takes the first connection for the main
channel) run with the same ``-uuid`` as the armed domain, as libvirt starts them.  The proxy serves the main
channel and every side channel: the migration completes and the destination runs.  A ``kill -9`` of the proxy
in the middle leaves the guest running on the source.
"""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from libvirt_mdev.live.relay import Endpoint
from tests.harness.qemu_vm import HarnessError, QemuVM
from tests.harness.util import free_port, random_file

from .conftest import DOM_UUID, ProxyEnv, assert_source_kept_the_guest, wait_results
from .test_channels import wait_refusals
from .test_hostile import CliProxy

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
MIB = 128
#: guest-physical bytes compared after a migration: 16..96 MiB, where the firmware of a guest that never
#: boots writes nothing (SeaBIOS keeps its tables below 1 MiB and near the top of RAM)
RAM_CHECK = (16 << 20, 80 << 20)


@pytest.fixture(scope="module")
def ram_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return random_file(tmp_path_factory.mktemp("mfram") / "ram.bin", MIB)


def multifd_pair(tmp_path: Path, ram_file: Path, channels: int,
                 compression: str = "none") -> Iterator[tuple[QemuVM, QemuVM, int]]:
    port = free_port()
    uuid = ["-uuid", DOM_UUID]
    src = QemuVM(tmp_path, name="src", memory_mib=MIB, with_disk=False, ram_file=ram_file, extra_args=uuid)
    # the destination's RAM starts as zeros: what it holds afterwards came through the proxy
    zeros = tmp_path / "dst-ram.bin"
    with open(zeros, "wb") as fh:
        fh.truncate(MIB << 20)
    dst = QemuVM(tmp_path, name="dst", memory_mib=MIB, with_disk=False, ram_file=zeros, incoming_defer=True,
                 extra_args=uuid)
    with src, dst:
        for vm in (src, dst):
            vm.qmp("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
            vm.qmp("migrate-set-parameters", **{"multifd-channels": channels})
            if compression != "none":
                try:
                    vm.qmp("migrate-set-parameters", **{"multifd-compression": compression})
                except HarnessError as exc:
                    pytest.skip(f"this QEMU has no multifd {compression} compression: {exc}")
        dst.incoming(f"tcp:127.0.0.1:{port}")
        yield src, dst, port


@pytest.mark.parametrize("channels", [2, 4])
def test_a_real_multifd_migration_through_the_proxy_completes(proxy_env: ProxyEnv, tmp_path: Path,
                                                              ram_file: Path, channels: int) -> None:
    proxy_env.arm([])
    for src, dst, port in multifd_pair(tmp_path, ram_file, channels):
        px = proxy_env.proxy(Endpoint("127.0.0.1", port))
        src.migrate(f"tcp:127.0.0.1:{px.address.port}")
        info = src.wait_migration(timeout=180)
        assert info["status"] == "completed"
        dst.wait_status("running", timeout=60)
        assert src.status() == "postmigrate"
        wait_results(px, timeout=60)
        res = px.results[0]
        assert res.ok, res.error
        assert px.channels is not None and not px.channels.refusals
        log = proxy_env.config.log_file.read_text()
        assert f"{channels} multifd channel(s)" in log, log
        # most of the random RAM travelled on the side channels, through the proxy
        assert res.bytes_in < (MIB << 20) // 2
        # and it arrived intact: the destination's RAM above the firmware's areas is the source's file
        dst.qmp("stop")
        dump = tmp_path / "dst-dump.bin"
        dst.qmp("pmemsave", val=RAM_CHECK[0], size=RAM_CHECK[1], filename=str(dump))
        with open(ram_file, "rb") as fh:
            fh.seek(RAM_CHECK[0])
            want = fh.read(RAM_CHECK[1])
        assert dump.read_bytes() == want


@pytest.mark.parametrize("compression", ["zlib", "zstd"])
def test_a_compressed_multifd_migration_through_the_proxy_completes(proxy_env: ProxyEnv, tmp_path: Path,
                                                                    ram_file: Path, compression: str) -> None:
    """The proxy learns each channel's compression from its first packet with pages (stream/multifd.py)."""
    proxy_env.arm([])
    for src, dst, port in multifd_pair(tmp_path, ram_file, 2, compression):
        px = proxy_env.proxy(Endpoint("127.0.0.1", port))
        src.migrate(f"tcp:127.0.0.1:{px.address.port}")
        assert src.wait_migration(timeout=240)["status"] == "completed"
        dst.wait_status("running", timeout=60)
        wait_results(px, timeout=60)
        res = px.results[0]
        assert res.ok, res.error
        assert res.channels == 2 and res.channel_bytes_in == res.channel_bytes_out > 0


def test_kill_9_of_the_proxy_mid_multifd_migration_leaves_the_source_running(proxy_env: ProxyEnv,
                                                                              tmp_path: Path,
                                                                              ram_file: Path) -> None:
    proxy_env.arm([])
    for src, _dst, port in multifd_pair(tmp_path, ram_file, 4):
        px = CliProxy(proxy_env, Endpoint("127.0.0.1", port))
        try:
            src.migrate(f"tcp:127.0.0.1:{px.port}", max_bandwidth=16 << 20)   # ~8 s for 128 MiB
            src.wait_transferred(16 << 20)
            px.proc.kill()
            px.proc.wait(10)
            assert_source_kept_the_guest(src)
        finally:
            if px.proc.poll() is None:
                px.proc.kill()
                px.proc.wait(10)


def test_side_channels_of_another_vm_fail_the_real_migration_closed(proxy_env: ProxyEnv, tmp_path: Path,
                                                                    ram_file: Path) -> None:
    """The armed domain is another one: the main channel alone cannot tell (it carries no uuid), the side
    channels can — the whole migration is reset and the guest keeps running on the source."""
    proxy_env.arm([], uuid="0b0b0b0b-1111-4222-8333-444455556666")
    for src, _dst, port in multifd_pair(tmp_path, ram_file, 2):
        px = proxy_env.proxy(Endpoint("127.0.0.1", port))
        src.migrate(f"tcp:127.0.0.1:{px.address.port}")
        assert_source_kept_the_guest(src)
        # the first refusal is the side channel's, whichever channel the proxy bound first (the main channel
        # may not even have sent its header yet: QEMU 7.2 flushes it once the side channels are up)
        refusals = wait_refusals(px)
        assert f"carries VM uuid {DOM_UUID}, not the armed domain's" in refusals[0], refusals
        assert all(r.ok is False for r in px.results)
