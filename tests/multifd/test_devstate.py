"""VFIO device state on multifd channels (live/devstate.py): bound, checked, stored and
committed before it is forwarded, and loadable only when the whole migration was accepted.

The packets are QEMU 10's exact framing (testkit/synth.py: SyntheticVfioDevice.multifd_packets);
every refusal here is a source that lies about them.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from libvirt_mdev.errors import MdevError, MdevMissing, SignatureError, StreamError, UnsupportedStream
from libvirt_mdev.filter_options import Binding
from libvirt_mdev.live.devstate import MAX_PACKET, MultifdStates, PacketSink
from libvirt_mdev.store import Store
from libvirt_mdev.stream.events import NEED_DATA
from libvirt_mdev.stream.multifd import DeviceStatePacket, MultifdChannelParser, PacketData
from libvirt_mdev.stream.wire import VFIO_STATE_PACKET
from testkit.multifd import channel_init, device_packet
from testkit.synth import SyntheticVfioDevice, vfio_state_packet

ID_A, ID_B = "0000:00:05.0/vfio", "0000:00:06.0/vfio"
U1, U2 = "4b20d080-1b54-4048-85b3-a6a62d165c01", "4b20d080-1b54-4048-85b3-a6a62d165c02"
DOM = "5a9c2a4e-7d1b-4b8e-8f57-0c1d2e3f4001"


def bindings() -> dict[str, Binding]:
    return {ID_A: Binding(U1, "nvidia-222", driver_version="535.1", parent_model="A16"),
            ID_B: Binding(U2, "nvidia-224")}


@pytest.fixture
def store(tmp_path: Path):
    with Store.open(tmp_path / "store", create=True) as s:
        yield s


def states(store: Store, **kw) -> MultifdStates:
    return MultifdStates(store, migration_id="m-devstate-1", domain_name="vm1", domain_uuid=DOM,
                         bindings=bindings(), **kw)


def channel_events(data: bytes) -> Iterator[object]:
    """The parser's events for a whole side channel: a channel init (DOM, id 0), then *data*."""
    p = MultifdChannelParser()
    p.feed(channel_init(DOM, 0) + data)
    p.feed(b"")
    while (ev := p.next_event()) is not NEED_DATA:
        yield ev


def feed(sink: PacketSink, packet: bytes, split: int = 777) -> list[bytes]:
    """Run one whole packet through *sink* as a side channel's pump would: header event,
    payload pieces, end.  Returns what the sink released for forwarding."""
    out: list[bytes] = []
    for ev in channel_events(packet):
        if isinstance(ev, DeviceStatePacket):
            sink.begin(ev)
            header, left = ev, ev.data_len
        elif isinstance(ev, PacketData):
            raw = bytes(ev.raw)
            for i in range(0, len(raw), split):
                sink.data(memoryview(raw[i:i + split]))
            left -= len(raw)
            if left == 0:
                out += [bytes(x) for x in sink.end()]
    assert header is not None
    return out


def device(idstr: str = ID_A, size: int = (2 << 20) + 12345, seed: int = 7) -> SyntheticVfioDevice:
    return SyntheticVfioDevice(idstr=idstr, stopcopy_size=size, framing="v2", multifd=True, seed=seed)


def manifest_id(token: str) -> str:
    from libvirt_mdev.store.tokens import parse_token
    return parse_token(token)


def loadable(store: Store, manifest_id: str) -> bool:
    try:
        store.check_loadable(manifest_id)
    except MdevError:
        return False
    return True


def test_packets_in_order_are_stored_exactly_then_released_byte_identical(store):
    st = states(store)
    packets = device().multifd_packets()
    assert len(packets) == 4  # 1 MiB, 1 MiB, the rest, then config
    sink = st.sink()
    released = [b"".join(feed(sink, p)) for p in packets]
    assert released == packets  # forwarded byte for byte, each packet whole
    (r,) = st.results
    assert (r.idstr, r.mdev_uuid, r.mdev_type, r.blocks) == (ID_A, U1, "nvidia-222", 4)
    assert r.length == sum(map(len, packets))
    assert r.sha256 == hashlib.sha256(b"".join(packets)).hexdigest()
    m = store.manifest(manifest_id(r.token))
    assert (m.vfio_framing, m.mdev_uuid, m.driver_version, m.parent_model, m.domain_uuid) == \
        ("multifd", U1, "535.1", "A16", DOM)
    assert not loadable(store, m.id)  # held until the migration is accepted
    st.accept()
    assert loadable(store, m.id)


def test_out_of_order_over_channels_commits_with_the_packet_that_completes_the_set(store):
    st = states(store)
    p0, p1, p2, cfg = device().multifd_packets()
    a, b = st.sink(), st.sink()
    feed(a, p0)
    feed(b, cfg)        # the config packet before packet 1 and 2 (another channel was faster)
    feed(a, p2)
    assert st.results == []  # incomplete: nothing committed, so QEMU cannot finish the device
    assert feed(b, p1, split=1 << 20) == [p1[:276], p1[276:]]
    assert len(st.results) == 1 and st.results[0].blocks == 4
    st.accept()


def test_two_devices_each_get_their_own_state(store):
    st = states(store)
    pa, pb = device(ID_A).multifd_packets(), device(ID_B, size=100, seed=9).multifd_packets()
    s1, s2 = st.sink(), st.sink()
    for x, y in zip(pa, pb + [b""] * 5, strict=False):
        feed(s1, x)
        if y:
            feed(s2, y)
    assert sorted((r.idstr, r.mdev_uuid) for r in st.results) == [(ID_A, U1), (ID_B, U2)]
    st.accept()


@pytest.mark.parametrize("idstr, inst, exc, match", [
    ("0000:00:09.0/vfio", 0, MdevMissing, "does not have"),
    (ID_A, 1, MdevMissing, "instance 1, which domain vm1 does not have"),
])
def test_a_device_the_domain_lacks_is_refused_before_its_payload(store, idstr, inst, exc, match):
    st = states(store)
    pkt = device_packet(idstr, inst, vfio_state_packet(0, b"x" * 100))
    sink = st.sink()
    with pytest.raises(exc, match=match):
        feed(sink, pkt)
    assert sink._buf == bytearray()  # nothing of it was taken


def test_a_host_that_requires_signatures_refuses_multifd_state(store):
    st = states(store, signed_only="this host requires signed device state (require_signature)")
    with pytest.raises(SignatureError, match="carries no signature.*x-migration-multifd-transfer"):
        feed(st.sink(), device().multifd_packets()[0])


def test_an_oversized_packet_is_refused_from_its_header(store):
    st = states(store)
    ev = DeviceStatePacket(0, b"", flags=64, idstr=ID_A, instance_id=0, data_len=MAX_PACKET + 1)
    with pytest.raises(StreamError, match="larger than the proxy's limit"):
        st.sink().begin(ev)


@pytest.mark.parametrize("payload, exc, match", [
    (vfio_state_packet(0, b"x", version=1), UnsupportedStream, "version 1"),
    (vfio_state_packet(0xFFFFFFFF, b"x"), StreamError, "invalid"),
    (vfio_state_packet(0, b"x", flags=2), StreamError, "unknown flags 0x2"),
    (vfio_state_packet(0, b""), StreamError, "carries no data"),
    (b"\0\0\0\0\0\0", StreamError, "shorter than its 12-byte header"),
    (vfio_state_packet(0, b"no config framing here", config=True), StreamError, "not DEV_CONFIG_STATE"),
])
def test_a_lying_packet_is_refused(store, payload, exc, match):
    st = states(store)
    with pytest.raises(exc, match=match):
        feed(st.sink(), device_packet(ID_A, 0, payload))
    assert st.results == []


def test_order_lies_are_refused(store):
    dev = device()
    p0, _p1, p2, _cfg = dev.multifd_packets()
    st = states(store)
    s = st.sink()
    feed(s, p0)
    with pytest.raises(StreamError, match="packet 0 of .* arrived twice"):
        feed(s, p0)
    st2 = states(store)
    s2 = st2.sink()
    feed(s2, p2)  # index 2 seen
    early_cfg = device_packet(ID_A, 0, vfio_state_packet(1, dev.config_buffer(), config=True))
    with pytest.raises(StreamError, match="config packet 1 .* is not its last packet"):
        feed(s2, early_cfg)
    st3 = states(store)
    s3 = st3.sink()
    feed(s3, device_packet(ID_A, 0, vfio_state_packet(1, dev.config_buffer(), config=True)))
    with pytest.raises(StreamError, match="data packet 5 .* after its config packet 1"):
        feed(s3, device_packet(ID_A, 0, vfio_state_packet(5, b"late")))


def test_a_packet_after_the_state_was_complete_is_refused(store):
    st = states(store)
    s = st.sink()
    for p in device(size=10).multifd_packets():
        feed(s, p)
    with pytest.raises(StreamError, match="after its state was complete"):
        feed(s, device_packet(ID_A, 0, vfio_state_packet(7, b"more")))


def test_an_incomplete_set_is_refused_at_accept_and_never_loadable(store):
    st = states(store)
    s = st.sink()
    p0, _p1, p2, cfg = device().multifd_packets()
    for p in (p0, p2, cfg):
        feed(s, p)
    with pytest.raises(StreamError, match="never completed: packet\\(s\\) 1 never arrived"):
        st.accept()
    assert st.refused and not st.accepted
    assert store.list() == []  # its state was never committed: the temp file is gone too
    assert [p.name for p in store.root.iterdir()] == [".lock"]  # the store lock only: no temp state left


def test_a_refused_migration_leaves_nothing_loadable_even_after_accept(store):
    st = states(store)
    s = st.sink()
    for p in device(size=10).multifd_packets():
        feed(s, p)
    st.accept()
    (r,) = st.results
    mid = manifest_id(r.token)
    assert loadable(store, mid)
    st.refuse("the main channel failed after the side channels ended")
    assert not loadable(store, mid)
    with pytest.raises(StreamError, match="refused"):
        st.store_packet(DeviceStatePacket(0, b"", flags=64, idstr=ID_A, instance_id=0, data_len=5),
                        vfio_state_packet(9, b"more"))


# --------------------------------------------------------------------------- property: whatever a source sends
def stored_split(stored: bytes) -> list[bytes]:
    out: list[bytearray] = []
    for ev in channel_events(stored):
        if isinstance(ev, DeviceStatePacket):
            out.append(bytearray(ev.raw))
        elif isinstance(ev, PacketData):
            out[-1] += ev.raw
    return [bytes(x) for x in out]


def _lie(packets: list[bytes], how: int, at: int, byte: int) -> list[bytes]:
    """One of the ways a source can lie about a device's packets."""
    out = list(packets)
    i = at % len(out)
    if how == 0:                       # drop one
        del out[i]
    elif how == 1:                     # send one twice
        out.insert(i, out[i])
    elif how == 2:                     # flip a byte of the VFIO packet header or what follows it
        raw = bytearray(out[i])
        raw[276 + byte % 24] ^= 0x5A
        out[i] = bytes(raw)
    elif how == 3:                     # move the config packet
        out.insert(i, out.pop())
    return out


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n_data=st.integers(0, 5), how=st.integers(0, 4), at=st.integers(0, 50), byte=st.integers(0, 255),
       order=st.randoms(use_true_random=False), channels=st.integers(1, 3))
def test_whatever_a_source_sends_only_a_whole_exact_set_becomes_loadable(tmp_path_factory, n_data, how, at, byte,
                                                                         order, channels):
    dev = SyntheticVfioDevice(idstr=ID_A, stopcopy_size=n_data * 3000, block_size=3000, framing="v2", multifd=True)
    packets = dev.multifd_packets()
    sent = _lie(packets, how, at, byte)
    shuffled = list(sent)
    order.shuffle(shuffled)
    with Store.open(tmp_path_factory.mktemp("s") / "store", create=True) as store:
        st_ = states(store)
        sinks = [st_.sink() for _ in range(channels)]
        fed: list[bytes] = []
        try:
            for k, p in enumerate(shuffled):
                feed(sinks[k % channels], p)
                fed.append(p)
            st_.accept()
        except MdevError:
            st_.refuse("refused")
            assert all(not loadable(store, manifest_id(r.token)) for r in st_.results)
            return
        if not fed:
            assert st_.results == []   # nothing sent, nothing stored
            return
        (r,) = st_.results
        assert loadable(store, manifest_id(r.token))
        stored = b"".join(store.iter_verified(manifest_id(r.token)))
        # only a whole set gets here: each index 0..last once, the config packet last ...
        heads = sorted(VFIO_STATE_PACKET.unpack_from(p, 276) for p in fed)
        assert [idx for _v, idx, _f in heads] == list(range(len(fed)))
        assert [f for _v, _i, f in heads] == [0] * (len(fed) - 1) + [1]
        # ... stored exactly as it was fed (opaque data bytes are the driver's business, and a signature's)
        assert len(stored) == sum(map(len, fed)) and r.blocks == len(fed)
        assert sorted(stored_split(stored)) == sorted(fed)


def test_the_loader_gives_the_driver_the_buffers_in_index_order(store, tmp_path):
    """``load --sink`` of multifd state writes what QEMU's loader would write to the device: the data
    buffers by index, without packet headers or the config packet, whatever order they were stored in."""
    import hashlib as _h

    from libvirt_mdev.cli.load import load_state
    from testkit.fakesysfs import make_fake_sysfs
    make_fake_sysfs(tmp_path / "sys", parents={"0000:3b:00.0": ["nvidia-222"]},
                    devices={U1: ("0000:3b:00.0", "nvidia-222")})
    dev = device(size=(2 << 20) + 777)
    p0, p1, p2, cfg = dev.multifd_packets()
    st = states(store)
    a, b = st.sink(), st.sink()
    for sink, p in ((b, p2), (a, cfg), (b, p0), (a, p1)):
        feed(sink, p)
    st.accept()
    (r,) = st.results
    out = load_state(store, r.token, U1, tmp_path / "sys", tmp_path / "driver")
    data = (tmp_path / "driver").read_bytes()
    assert out["framing"] == "multifd" and out["bytes_written"] == len(data) == dev.state_bytes
    assert _h.sha256(data).hexdigest() == dev.expected_sha256()


@pytest.mark.parametrize("edit", ["drop", "twice", "cut"])
def test_the_loader_refuses_a_stored_file_that_is_not_one_whole_set(edit):
    from libvirt_mdev.stream.vfio import multifd_state_order
    p0, p1, cfg = device(size=(1 << 20) + 5).multifd_packets()
    blob = {"drop": p0 + cfg, "twice": p0 + p1 + p1 + cfg, "cut": p0 + p1 + cfg[:-1]}[edit]
    with pytest.raises(StreamError):
        multifd_state_order(lambda off, n: blob[off:off + n], len(blob))
    whole = p1 + cfg + p0
    assert [n for _o, n in multifd_state_order(lambda off, n: whole[off:off + n], len(whole))] == [1 << 20, 5]


@pytest.mark.parametrize("idx, config", [(0xFFFFFFFE, True), (4097, False)])
def test_an_index_far_ahead_is_refused(store, idx, config):
    """QEMU's loader sizes its buffer array by the highest index it is sent: a lying index would make the
    destination QEMU allocate gigabytes (and an accept-time report would walk the whole range)."""
    from libvirt_mdev.live.devstate import MAX_AHEAD
    st = states(store)
    body = device().config_buffer() if config else b"x"
    with pytest.raises(StreamError, match=f"more than {MAX_AHEAD} ahead of the 0 packet"):
        feed(st.sink(), device_packet(ID_A, 0, vfio_state_packet(idx, body, config=config)))
    feed(st.sink(), device_packet(ID_A, 0, vfio_state_packet(MAX_AHEAD, b"x")))   # the limit itself passes
