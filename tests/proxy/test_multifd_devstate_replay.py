"""A captured real QEMU multifd migration with synthetic VFIO device state injected in QEMU's exact framing,
replayed through the proxy (the capture: tests/proxy/test_multifd_replay.py).

Two ways QEMU sends a device's state during a multifd migration:
* on the main channel (QEMU <= 9, or QEMU 10 without x-migration-multifd-transfer): VFIO sections with data
  blocks, while RAM travels on the side channels;
* on the side channels (QEMU 10 with x-migration-multifd-transfer): bare VFIO END/FULL sections on the main
  channel, the state and config as device-state packets inserted at packet boundaries of the side channels.
Both are stored and verified before they are forwarded, forwarded byte-identical, and accounted exactly.  Each
lie (a device the domain lacks, a type mismatch, a tampered packet, a channel of another migration) fails the
whole migration; a channel after completion is refused alone and leaves the accepted state alone.
"""
from __future__ import annotations

import io
import os
import time
from pathlib import Path

import pytest

from libvirt_mdev.errors import MdevError
from libvirt_mdev.store import Store
from libvirt_mdev.stream.multifd import RamPacket
from testkit.multifd import channel_init, device_packet
from testkit.synth import SyntheticVfioDevice, inject, vfio_state_packet
from tests.harness.relay import SideChannelInjector
from tests.multifd.test_multifd_real import VM_UUID, capture_multifd, parse_channel

from .conftest import ID_A, U1, ProxyEnv, wait_results
from .test_channels import connect, finish
from .test_multifd_devstate import loadable, stored_packets
from .test_multifd_replay import RAM_MIB, replay

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
OTHER_UUID = "0b0b0b0b-1111-4222-8333-444455556666"


@pytest.fixture(scope="module")
def capture(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, list[bytes]]:
    return capture_multifd(tmp_path_factory.mktemp("mfcap"), 2, RAM_MIB)


def device(*, multifd: bool, size: int = (3 << 20) + 4321) -> SyntheticVfioDevice:
    return SyntheticVfioDevice(idstr=ID_A, stopcopy_size=size, framing="v2", multifd=multifd, seed=11,
                               marker=b"\x8fREPLAYED-STATE-" + os.urandom(6).hex().encode())


def with_device(tmp_path: Path, main: bytes, dev: SyntheticVfioDevice) -> bytes:
    src = tmp_path / "captured-main"
    src.write_bytes(main)
    out = io.BytesIO()
    inject(str(src), out, [dev])
    return out.getvalue()


def insert(side: bytes, packets: list[bytes], nth: int = 2) -> bytes:
    """*packets* inserted at the start of the side channel's *nth* RAM packet: a packet boundary."""
    at = [off for kind, off, _, _ in parse_channel(side) if kind is RamPacket][nth]
    return side[:at] + b"".join(packets) + side[at:]


def wait_loadable(store_dir: Path, token: str) -> None:
    deadline = time.monotonic() + 10
    while not loadable(store_dir, token):
        assert time.monotonic() < deadline, "the accepted migration's state is not loadable"
        time.sleep(0.05)


def test_state_on_the_side_channels_is_stored_verified_and_forwarded(proxy_env: ProxyEnv, tmp_path: Path,
                                                                     capture: tuple[bytes, list[bytes]]) -> None:
    main, sides = capture
    dev = device(multifd=True)
    main2 = with_device(tmp_path, main, dev)
    p0, p1, p2, p3, cfg = dev.multifd_packets()
    sides2 = [insert(sides[0], [p0, p3]), insert(sides[1], [cfg, p1, p2], nth=1)]
    proxy_env.arm([{"mdev_uuid": U1, "idstr": ID_A, "type": "nvidia-222"}], uuid=VM_UUID)
    sink, resets, main_reset = replay(proxy_env, main2, sides2)
    res = proxy_env.proxies[-1].results[0]
    assert res.ok, res.error
    assert not any(resets) and not main_reset
    got = sink.wait(3)
    assert bytes(got[0]["data"]) == main2
    assert sorted(bytes(c["data"]) for c in got[1:]) == sorted(sides2)
    (d,) = [d for d in res.devices if d.get("channel") == "multifd"]
    assert (d["mdev_uuid"], d["mdev_type"], d["blocks"]) == (U1, "nvidia-222", 5)
    assert d["length"] == sum(map(len, (p0, p1, p2, p3, cfg)))
    assert sorted(stored_packets(proxy_env.config.store, d["token"])) == sorted([p0, p1, p2, p3, cfg])
    wait_loadable(proxy_env.config.store, d["token"])
    sink.close()


def test_state_on_the_main_channel_with_ram_on_side_channels(proxy_env: ProxyEnv, tmp_path: Path,
                                                             capture: tuple[bytes, list[bytes]]) -> None:
    main, sides = capture
    dev = device(multifd=False)
    main2 = with_device(tmp_path, main, dev)
    proxy_env.arm([{"mdev_uuid": U1, "idstr": ID_A, "type": "nvidia-222"}], uuid=VM_UUID)
    sink, resets, main_reset = replay(proxy_env, main2, sides)
    res = proxy_env.proxies[-1].results[0]
    assert res.ok, res.error
    assert not main_reset and not any(resets)
    got = sink.wait(3)
    assert bytes(got[0]["data"]) == main2 and sorted(bytes(c["data"]) for c in got[1:]) == sorted(sides)
    (d,) = res.devices
    assert (d["mdev_uuid"], d["length"], d["sha256"]) == (U1, dev.state_bytes, dev.expected_sha256())
    wait_loadable(proxy_env.config.store, d["token"])
    sink.close()


@pytest.mark.parametrize("case", ["device the domain lacks", "type mismatch", "tampered packet",
                                  "channel of another migration"])
def test_a_lie_fails_the_whole_migration(proxy_env: ProxyEnv, tmp_path: Path, capture: tuple[bytes, list[bytes]],
                                         case: str) -> None:
    main, sides = capture
    dev = device(multifd=True)
    main2 = with_device(tmp_path, main, dev)
    p0, p1, p2, p3, cfg = dev.multifd_packets()
    devices = [{"mdev_uuid": U1, "idstr": ID_A, "type": "nvidia-222"}]
    text = ""
    lie = dev.marker   # bytes of what is refused: none of them may reach the destination
    if case == "device the domain lacks":
        devices = [{"mdev_uuid": U1, "idstr": "0000:00:07.0/vfio", "type": "nvidia-222"}]
        text = "does not have"
    elif case == "type mismatch":
        devices[0]["type"] = "nvidia-224"
        text = "armed for type nvidia-224"
    elif case == "tampered packet":
        p1 = p1[:276] + b"\x00\x00\x00\x05" + p1[280:]    # the VFIO packet version, as a forger would
        text, lie = "version 5", p1[300:400]
    sides2 = [insert(sides[0], [p0, p3]), insert(sides[1], [cfg, p1, p2], nth=1)]
    if case == "channel of another migration":
        sides2[1] = channel_init(OTHER_UUID, 1) + sides2[1][64:]
        text, lie = f"carries VM uuid {OTHER_UUID}", p1[300:400]
    proxy_env.arm(devices, uuid=VM_UUID)
    sink, resets, main_reset = replay(proxy_env, main2, sides2)
    res = proxy_env.proxies[-1].results[0]
    assert not res.ok and text in (res.error or ""), res.error
    assert main_reset and any(resets)
    assert not any(lie in c["data"] for c in sink.conns)
    conns = sink.wait(len(sink.conns))
    assert all(c["reset"] for c in conns[:1])
    with Store.open(proxy_env.config.store, create=True) as store:
        for e in store.list():
            with pytest.raises(MdevError):
                store.check_loadable(e.id)
    sink.close()


def test_a_channel_after_completion_is_refused_alone(proxy_env: ProxyEnv, tmp_path: Path,
                                                     capture: tuple[bytes, list[bytes]]) -> None:
    main, sides = capture
    dev = device(multifd=True, size=5000)
    main2 = with_device(tmp_path, main, dev)
    p0, cfg = dev.multifd_packets()
    sides2 = [insert(sides[0], [p0]), insert(sides[1], [cfg])]
    proxy_env.arm([{"mdev_uuid": U1, "idstr": ID_A, "type": "nvidia-222"}], uuid=VM_UUID)
    sink, _resets, _main_reset = replay(proxy_env, main2, sides2)
    px = proxy_env.proxies[-1]
    res = px.results[0]
    assert res.ok, res.error
    (d,) = [d for d in res.devices if d.get("channel") == "multifd"]
    wait_loadable(proxy_env.config.store, d["token"])
    n = len(sink.conns)
    assert finish(connect(px), sides2[0])              # a replayed side channel: reset
    assert px.channels is not None
    deadline = time.monotonic() + 10
    while not any("after its migration ended" in r or "no migration to serve it" in r for r in px.channels.refusals):
        assert time.monotonic() < deadline, list(px.channels.refusals)
        time.sleep(0.05)
    assert len(sink.conns) == n                        # it reached nothing
    assert loadable(proxy_env.config.store, d["token"])   # and the accepted state stays accepted
    sink.close()


# --------------------------------------------------------------------------- a real source QEMU
@pytest.mark.parametrize("case", ["device the domain lacks", "tampered packet"])
def test_a_lie_in_a_real_multifd_migration_leaves_the_guest_on_the_source(proxy_env: ProxyEnv, tmp_path: Path,
                                                                          case: str) -> None:
    from libvirt_mdev.live.relay import Endpoint
    from tests.harness.qemu_vm import HarnessError, QemuVM
    from tests.harness.util import free_port
    mib = 64
    ram = tmp_path / "ram"
    ram.write_bytes(os.urandom(mib << 20))
    idstr = "0000:00:09.0/vfio" if case == "device the domain lacks" else ID_A
    version = 0 if case == "device the domain lacks" else 3
    packet = device_packet(idstr, 0, vfio_state_packet(0, b"\x8fREAL-LIE" * 100, version=version))
    proxy_env.arm([{"mdev_uuid": U1, "idstr": ID_A, "type": "nvidia-222"}], uuid=VM_UUID)
    uuid = ["-uuid", VM_UUID]
    src = QemuVM(tmp_path, name="src", memory_mib=mib, with_disk=False, ram_file=ram, extra_args=uuid)
    dst = QemuVM(tmp_path, name="dst", memory_mib=mib, with_disk=False, incoming_defer=True, extra_args=uuid)
    with src, dst:
        for vm in (src, dst):
            vm.qmp("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
            vm.qmp("migrate-set-parameters", **{"multifd-channels": 2})
        port = free_port()
        dst.incoming(f"tcp:127.0.0.1:{port}")
        px = proxy_env.proxy(Endpoint("127.0.0.1", port))
        relay = SideChannelInjector(px.address.port, packet)
        try:
            src.migrate(f"tcp:127.0.0.1:{relay.port}")
            with pytest.raises(HarnessError, match="migration failed"):  # failed, not still running at the deadline
                src.wait_migration(timeout=120)
        finally:
            relay.close()
        assert relay.injected.is_set()
        src.wait_status("running", timeout=30)   # the guest stays on the source (QEMU resumes it after the failure)
        wait_results(px, timeout=60)
        res = px.results[0]
        assert not res.ok and ("does not have" if version == 0 else "version 3") in (res.error or ""), res.error
