"""Device state on multifd side channels through the proxy (live/devstate.py via live/channels.py).

QEMU 10's vfio-pci ``x-migration-multifd-transfer``: the main channel's VFIO sections carry a bare
END_OF_STATE, and the device's stop-copy state and config travel as device-state packets spread over the
side channels, in any order.  Synthetic channels in QEMU's exact framing (testkit.synth, testkit.multifd);
a "destination QEMU" (MultiSink) records each connection.  Checked: each packet is stored before it is
forwarded and the state is loadable once the whole migration ended well; every lie fails the whole migration
closed with nothing of the lying packet forwarded and nothing loadable.
"""
from __future__ import annotations

import io
import os
import re
import threading
import time
from pathlib import Path

import pytest

from libvirt_mdev.errors import MdevError
from libvirt_mdev.live.proxy import MigrationProxy
from libvirt_mdev.store import Store
from libvirt_mdev.store.tokens import parse_token
from libvirt_mdev.stream.events import NEED_DATA
from libvirt_mdev.stream.multifd import DeviceStatePacket, MultifdChannelParser
from testkit.multifd import channel_init, device_packet, ram_packet, sync_packet
from testkit.synth import SyntheticVfioDevice, inject, vfio_state_packet

from .conftest import DOM_UUID, ID_A, ID_B, U1, U2, ProxyEnv, wait_results
from .test_channels import MultiSink, connect, finish, main_stream, was_reset

PAGE = 4096


@pytest.fixture
def sink() -> MultiSink:
    s = MultiSink()
    yield s
    s.close()


def vfio_device(idstr: str = ID_A, size: int = (2 << 20) + 999, seed: int = 3) -> SyntheticVfioDevice:
    return SyntheticVfioDevice(idstr=idstr, stopcopy_size=size, framing="v2", multifd=True, seed=seed,
                               marker=b"\x8fMULTIFD-STATE-" + os.urandom(6).hex().encode())


def main_with(tmp_path: Path, *devices: SyntheticVfioDevice) -> bytes:
    """The synthetic main channel with *devices*' VFIO sections in QEMU 10's multifd-transfer shape."""
    src = tmp_path / "main.bin"
    src.write_bytes(main_stream())
    out = io.BytesIO()
    inject(str(src), out, list(devices))
    return out.getvalue()


def side(cid: int, *packets: bytes, uuid: str = DOM_UUID) -> bytes:
    pages = [os.urandom(PAGE) for _ in range(2)]
    return (channel_init(uuid, cid) + ram_packet("pc.ram", [cid * PAGE, (cid + 8) * PAGE], pages, packet_num=cid)
            + b"".join(packets) + sync_packet(cid + 100))


def migrate(px: MigrationProxy, main: bytes, sides: list[bytes], *, first: int = 200,
            timeout: float = 30) -> tuple[bool, list[bool]]:
    """Part of the main channel first, then the side channels, then the rest of the main channel once every
    side channel reached the destination (as QEMU's destination waits for them): (main reset, side resets)."""
    m = connect(px)
    m.sendall(main[:first])
    resets = [False] * len(sides)

    def run(i: int) -> None:
        resets[i] = finish(connect(px), sides[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(sides))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    main_reset = was_reset(m) if any(resets) else finish(m, main[first:])
    wait_results(px, timeout=timeout)
    return main_reset, resets


def stored_packets(store_dir: Path, token: str) -> list[bytes]:
    """The device-state packets in a stored multifd state, parsed back with the codec."""
    with Store.open(store_dir) as store:
        m = store.manifest(parse_token(token))
        assert m.vfio_framing == "multifd"
        data = b"".join(store.iter_verified(m.id))
    p = MultifdChannelParser()
    p.feed(channel_init(DOM_UUID, 0) + data)
    p.feed(b"")
    out, cur = [], b""
    while (ev := p.next_event()) is not NEED_DATA:
        if isinstance(ev, DeviceStatePacket):
            if cur:
                out.append(cur)
            cur = bytes(ev.raw)
        elif cur:
            cur += bytes(ev.raw)
    return [*out, cur]


def loadable(store_dir: Path, token: str) -> bool:
    with Store.open(store_dir) as store:
        try:
            store.check_loadable(parse_token(token))
        except MdevError:
            return False
    return True


def test_device_state_spread_over_side_channels_is_stored_then_forwarded_byte_identical(
        proxy_env: ProxyEnv, sink: MultiSink, tmp_path: Path) -> None:
    dev = vfio_device()
    main = main_with(tmp_path, dev)
    p0, p1, p2, cfg = dev.multifd_packets()
    sides = [side(0, p0, p2), side(1, cfg, p1)]   # the config packet before packet 1: out of order
    proxy_env.arm()
    px = proxy_env.proxy(sink.endpoint)
    main_reset, resets = migrate(px, main, sides)
    res = px.results[0]
    assert res.ok, res.error
    assert not main_reset and not any(resets)
    got = sink.wait(3)
    assert bytes(got[0]["data"]) == main
    assert sorted(bytes(c["data"]) for c in got[1:]) == sorted(sides)   # byte-identical, packets and RAM
    assert res.channels == 2 and res.channel_bytes_in == res.channel_bytes_out == sum(map(len, sides))
    assert res.to_json()["channels"] == 2   # what --json-log prints
    multifd = [d for d in res.devices if d.get("channel") == "multifd"]
    assert len(multifd) == 1
    d = multifd[0]
    assert (d["idstr"], d["mdev_uuid"], d["mdev_type"], d["blocks"]) == (ID_A, U1, "nvidia-222", 4)
    assert d["length"] == sum(map(len, (p0, p1, p2, cfg)))                 # exact accounting
    assert sorted(stored_packets(proxy_env.config.store, d["token"])) == sorted([p0, p1, p2, cfg])
    deadline = time.monotonic() + 10   # the last side channel may settle just after the main one
    while not loadable(proxy_env.config.store, d["token"]):
        assert time.monotonic() < deadline, "the accepted migration's multifd state is not loadable"
        time.sleep(0.05)
    # the main channel's own VFIO state of the device (its bare sections: nothing) is there too
    assert [x["idstr"] for x in res.devices if x.get("channel") is None] == [ID_A]


def test_two_devices_on_side_channels(proxy_env: ProxyEnv, sink: MultiSink, tmp_path: Path) -> None:
    a, b = vfio_device(ID_A, size=5000), vfio_device(ID_B, size=70000, seed=4)
    main = main_with(tmp_path, a, b)
    pa, pb = a.multifd_packets(), b.multifd_packets()
    proxy_env.arm()
    px = proxy_env.proxy(sink.endpoint)
    main_reset, resets = migrate(px, main, [side(0, *pa), side(1, *pb)])
    res = px.results[0]
    assert res.ok, res.error
    assert not main_reset and not any(resets)
    got = {(d["idstr"], d["mdev_uuid"]) for d in res.devices if d.get("channel") == "multifd"}
    assert got == {(ID_A, U1), (ID_B, U2)}


def assert_failed_closed(px: MigrationProxy, sink: MultiSink, main_reset: bool, resets: list[bool],
                         text: str, marker: bytes | None, store_dir: Path) -> None:
    res = px.results[0]
    assert not res.ok and re.search(text, res.error or ""), res.error
    assert main_reset and any(resets)
    if marker is not None:
        assert not any(marker in c["data"] for c in sink.conns)   # nothing of the lying packet
    conns = sink.wait(len(sink.conns))
    assert all(c["reset"] for c in conns[:1])   # the destination's main channel (if it got one): reset
    with Store.open(store_dir, create=True) as store:
        for e in store.list():
            with pytest.raises(MdevError):
                store.check_loadable(e.id)


@pytest.mark.parametrize("case", ["bad version", "index twice", "config not last", "config garbage",
                                  "device the domain lacks", "other instance"])
def test_a_lying_packet_fails_the_whole_migration(proxy_env: ProxyEnv, sink: MultiSink, tmp_path: Path,
                                                  case: str) -> None:
    dev = vfio_device()
    main = main_with(tmp_path, dev)
    p0, p1, p2, cfg = dev.multifd_packets()
    mark = b"LIE-" + os.urandom(8).hex().encode()
    head, tail = dev.config_buffer()[:8], dev.config_buffer()[-8:]   # DEV_CONFIG_STATE ... END_OF_STATE
    lie, text = {
        "bad version": (device_packet(ID_A, 0, vfio_state_packet(3, mark, version=7)), "version 7"),
        "index twice": (device_packet(ID_A, 0, vfio_state_packet(0, mark)), "arrived twice"),
        # an early config packet (index 1, while index 2 was seen)
        "config not last": (device_packet(ID_A, 0, vfio_state_packet(1, head + mark + tail, config=True)),
                            "is not its last packet"),
        "config garbage": (device_packet(ID_A, 0, vfio_state_packet(9, mark, config=True)), "not DEV_CONFIG_STATE"),
        "device the domain lacks": (device_packet("0000:00:09.0/vfio", 0, vfio_state_packet(0, mark)),
                                    "does not have"),
        "other instance": (device_packet(ID_A, 2, vfio_state_packet(0, mark)), "does not have"),
    }[case]
    proxy_env.arm()
    px = proxy_env.proxy(sink.endpoint)
    # the lie after packets 0 and 2 and before packet 1 on its channel: whatever the other channel does, the set
    # cannot be complete before the lie arrives, and an early config packet always has a higher index behind it
    main_reset, resets = migrate(px, main, [side(0, p0, p2, lie, p1), side(1, cfg)])
    assert_failed_closed(px, sink, main_reset, resets, text, mark, proxy_env.config.store)


def test_a_type_mismatch_refuses_the_main_channel_and_every_side_channel(proxy_env: ProxyEnv, sink: MultiSink,
                                                                         tmp_path: Path) -> None:
    dev = vfio_device()
    p0, p1, p2, cfg = dev.multifd_packets()
    proxy_env.arm([{"mdev_uuid": U1, "idstr": ID_A, "type": "nvidia-224"}])   # this host's U1 is nvidia-222
    px = proxy_env.proxy(sink.endpoint)
    main_reset, resets = migrate(px, main_with(tmp_path, dev), [side(0, p0, p1), side(1, p2, cfg)])
    assert_failed_closed(px, sink, main_reset, resets, "nvidia-224", dev.marker, proxy_env.config.store)
    assert sink.conns == []   # refused at the main channel's arming: the destination saw nothing


def test_a_host_that_requires_signed_state_refuses_multifd_device_state(proxy_env: ProxyEnv, sink: MultiSink,
                                                                        tmp_path: Path) -> None:
    """Such packets carry no signature: a signing host cannot take them (only unsigned RAM passes)."""
    import dataclasses

    from libvirt_mdev.sign.keys import generate_key, write_key_pair
    _priv, pub = write_key_pair(generate_key("source"), tmp_path / "keys")
    proxy_env.config = dataclasses.replace(proxy_env.config, trusted_keys=(pub,))
    dev = vfio_device()
    p0, p1, p2, cfg = dev.multifd_packets()
    proxy_env.arm()
    px = proxy_env.proxy(sink.endpoint)
    main_reset, resets = migrate(px, main_with(tmp_path, dev), [side(0, p0, p1), side(1, p2, cfg)])
    assert_failed_closed(px, sink, main_reset, resets, "carries no signature, and this host verifies device state",
                         dev.marker, proxy_env.config.store)


def test_an_incomplete_set_is_never_loadable(proxy_env: ProxyEnv, sink: MultiSink, tmp_path: Path) -> None:
    """A source that leaves out a packet: QEMU's destination cannot finish the device, and the state stored
    so far is refused when the migration ends (one REFUSED line)."""
    dev = vfio_device()
    p0, _p1, p2, cfg = dev.multifd_packets()
    proxy_env.arm()
    px = proxy_env.proxy(sink.endpoint)
    migrate(px, main_with(tmp_path, dev), [side(0, p0), side(1, p2, cfg)])
    deadline = time.monotonic() + 10
    text = "never completed: packet(s) 1 never arrived"
    while text not in proxy_env.config.log_file.read_text():
        assert time.monotonic() < deadline, proxy_env.config.log_file.read_text()[-2000:]
        time.sleep(0.05)
    with Store.open(proxy_env.config.store) as store:
        assert all(e.manifest is None or e.manifest.vfio_framing != "multifd" for e in store.list())


def test_a_side_channel_left_open_after_the_main_channel_ended_is_cut(proxy_env: ProxyEnv, sink: MultiSink,
                                                                       tmp_path: Path) -> None:
    """A source that keeps a side channel open after the migration: cut at the drain deadline, and the
    device state of the migration is refused (never loadable), with one line."""
    dev = vfio_device(size=100)
    p0, cfg = dev.multifd_packets()
    proxy_env.arm()
    px = proxy_env.proxy(sink.endpoint, drain_timeout=1.0)
    main = main_with(tmp_path, dev)
    m = connect(px)
    m.sendall(main[:200])
    done = connect(px)
    assert not finish(done, side(0, p0, cfg))
    lingering = connect(px)
    lingering.sendall(side(1))          # never half-closed
    sink.wait_connected(3)
    assert not finish(m, main[200:])
    wait_results(px)
    assert px.results[0].ok, px.results[0].error
    assert was_reset(lingering, timeout=15)
    text = "still open 1s after the main channel ended"
    deadline = time.monotonic() + 10
    while text not in proxy_env.config.log_file.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    (d,) = [d for d in px.results[0].devices if d.get("channel") == "multifd"]
    assert not loadable(proxy_env.config.store, d["token"])
