"""A captured real QEMU multifd migration (2 side channels) replayed through the proxy.

The capture comes from tests/multifd/test_multifd_real.py's relay.  Unchanged, every channel reaches the
"destination" byte-identical; with a synthetic QEMU 10 device-state packet injected at a packet boundary of a
side channel, in QEMU's exact framing (testkit/multifd.py), for a device the domain lacks, the whole migration
is refused and nothing of that packet is forwarded (device state that is the domain's: test_multifd_devstate.py).
"""
from __future__ import annotations

import os

import pytest

from libvirt_mdev.stream.multifd import RamPacket
from testkit.multifd import device_packet
from tests.multifd.test_multifd_real import VM_UUID, capture_multifd, parse_channel

from .conftest import ProxyEnv
from .test_channels import MultiSink
from .test_multifd_devstate import migrate

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
RAM_MIB = 32


@pytest.fixture(scope="module")
def capture(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, list[bytes]]:
    return capture_multifd(tmp_path_factory.mktemp("mfcap"), 2, RAM_MIB)


def replay(proxy_env: ProxyEnv, main: bytes, sides: list[bytes]) -> tuple[MultiSink, list[bool], bool]:
    """The capture through a new proxy into a MultiSink (test_multifd_devstate.migrate): (sink, side resets,
    main reset)."""
    sink = MultiSink()
    main_reset, resets = migrate(proxy_env.proxy(sink.endpoint), main, sides, first=4096, timeout=60)
    return sink, resets, main_reset


def test_the_capture_replays_byte_identical(proxy_env: ProxyEnv, capture: tuple[bytes, list[bytes]]) -> None:
    main, sides = capture
    proxy_env.arm([], uuid=VM_UUID)
    sink, resets, main_reset = replay(proxy_env, main, sides)
    px = proxy_env.proxies[-1]
    assert px.results[0].ok, px.results[0].error
    assert not any(resets) and not main_reset
    got = sink.wait(3)
    assert bytes(got[0]["data"]) == main
    assert sorted(bytes(c["data"]) for c in got[1:]) == sorted(sides)
    sink.close()


def test_device_state_injected_on_a_real_side_channel_is_refused(proxy_env: ProxyEnv,
                                                                 capture: tuple[bytes, list[bytes]]) -> None:
    main, sides = capture
    events = parse_channel(sides[1])
    at = [off for kind, off, _, _ in events if kind is RamPacket][3]    # the 4th packet's start: a boundary
    marker = b"INJECTED-VFIO-" + os.urandom(8).hex().encode()
    bad = sides[1][:at] + device_packet("0000:00:05.0/vfio", 0, marker * 100) + sides[1][at:]
    proxy_env.arm([], uuid=VM_UUID)
    sink, resets, main_reset = replay(proxy_env, main, [sides[0], bad])
    px = proxy_env.proxies[-1]
    assert not px.results[0].ok and "which domain vm1 does not have" in px.results[0].error, px.results[0].error
    assert resets[1] and main_reset
    assert not any(marker in c["data"] for c in sink.conns)
    got = sink.wait(len(sink.conns))
    assert got[0]["reset"]                       # the destination's main channel: reset, its load fails
    assert any(c["reset"] for c in got[1:])      # and the refused side channel (the other may have ended first)
    sink.close()
