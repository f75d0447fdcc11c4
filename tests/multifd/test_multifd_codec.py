"""The multifd side-channel codec (libvirt_mdev/stream/multifd.py), h11-style: whole input,
byte by byte, truncated, trailing data, and each check QEMU's loader makes."""
from __future__ import annotations

import pytest

from libvirt_mdev.errors import StreamError, UnsupportedStream
from libvirt_mdev.stream.events import NEED_DATA
from libvirt_mdev.stream.multifd import (
    MAX_DEVICE_PACKET,
    ChannelEnd,
    ChannelInit,
    Compression,
    DeviceStatePacket,
    MultifdChannelParser,
    MultifdFlag,
    PacketData,
    RamPacket,
    is_multifd_channel,
    read_channel_init,
)
from testkit import multifd as mk

VM = "7d3b1b86-4a4f-4c8e-9a57-3f0d6c9e2a11"
PAGE = 4096


def channel(*packets: bytes, cid: int = 1) -> bytes:
    return mk.channel_init(VM, cid) + b"".join(packets)


def parse(data: bytes, step: int | None = None, **kw: object) -> list[object]:
    p = MultifdChannelParser(**kw)  # type: ignore[arg-type]
    out: list[object] = []
    chunks = [data] if step is None else [data[i:i + step] for i in range(0, len(data), step)]
    for c in [*chunks, b""]:
        p.feed(c)
        while (ev := p.next_event()) is not NEED_DATA:
            if isinstance(ev, PacketData):
                ev = PacketData(ev.offset, bytes(ev.raw))   # views die with the next feed
            out.append(ev)
    return out


def covered(events: list[object]) -> bytes:
    return b"".join(bytes(e.raw) for e in events)  # type: ignore[attr-defined]


SAMPLE = channel(
    mk.ram_packet("pc.ram", [0, 8 * PAGE], [b"\x11" * PAGE, b"\x22" * PAGE], zero=[PAGE], packet_num=5),
    mk.sync_packet(6),
    mk.device_packet("0000:00:05.0/vfio", 0, b"state-bytes" * 100),
)


@pytest.mark.parametrize("step", [None, 1, 7, 4096])
def test_whole_and_chunked_input_cover_every_byte(step: int | None) -> None:
    events = parse(SAMPLE, step)
    assert covered(events) == SAMPLE
    kinds = [type(e) for e in events if not isinstance(e, PacketData)]
    assert kinds == [ChannelInit, RamPacket, RamPacket, DeviceStatePacket, ChannelEnd]
    init = events[0]
    assert isinstance(init, ChannelInit) and init.uuid == VM and init.channel_id == 1
    ram = next(e for e in events if isinstance(e, RamPacket))
    assert (ram.ramblock, ram.normal_pages, ram.zero_pages, ram.packet_num, ram.data_len) == \
        ("pc.ram", 2, 1, 5, 2 * PAGE)
    sync = [e for e in events if isinstance(e, RamPacket)][1]
    assert sync.sync and sync.data_len == 0
    dev = next(e for e in events if isinstance(e, DeviceStatePacket))
    assert (dev.idstr, dev.instance_id, dev.data_len) == ("0000:00:05.0/vfio", 0, 1100)
    body = b"".join(bytes(e.raw) for e in events[events.index(dev) + 1:] if isinstance(e, PacketData))
    assert body == b"state-bytes" * 100


def test_every_truncation_is_an_error_naming_the_offset() -> None:
    boundaries = {len(mk.channel_init(VM, 1))}
    pos = len(mk.channel_init(VM, 1))
    for pkt in (mk.ram_packet("pc.ram", [0, 8 * PAGE], [b"\x11" * PAGE, b"\x22" * PAGE], zero=[PAGE], packet_num=5),
                mk.sync_packet(6), mk.device_packet("0000:00:05.0/vfio", 0, b"state-bytes" * 100)):
        pos += len(pkt)
        boundaries.add(pos)
    for cut in range(0, len(SAMPLE), 97):
        if cut in boundaries:
            events = parse(SAMPLE[:cut])
            assert isinstance(events[-1], ChannelEnd)
            continue
        with pytest.raises(StreamError, match="ends inside") as err:
            parse(SAMPLE[:cut])
        assert err.value.offset is not None


def test_trailing_garbage_after_a_packet_is_refused() -> None:
    with pytest.raises(StreamError, match="magic"):
        parse(SAMPLE + b"\x00" * 12)


def test_error_is_sticky() -> None:
    p = MultifdChannelParser()
    p.feed(b"\x00" * 64)
    with pytest.raises(StreamError):
        p.next_event()
    with pytest.raises(StreamError):
        p.next_event()


@pytest.mark.parametrize("blob, match", [
    (mk.channel_init(VM, 0, magic=0x51455646), "magic"),
    (mk.channel_init(VM, 0, version=2), "version 2"),
])
def test_channel_init_checks(blob: bytes, match: str) -> None:
    with pytest.raises(StreamError, match=match):
        parse(blob)


def test_channel_init_helper_and_channel_detection() -> None:
    assert read_channel_init(mk.channel_init(VM, 3)) == (VM, 3)
    assert is_multifd_channel(mk.channel_init(VM, 3)[:4])
    assert not is_multifd_channel(b"QEVM")
    with pytest.raises(UnsupportedStream):
        read_channel_init(mk.channel_init(VM, 3, version=9))


@pytest.mark.parametrize("packet, match", [
    (mk.device_packet(b"x" * 256, 0, b"abc"), "unterminated"),
    (mk.device_packet("0000:00:05.0/vfio", 0, b""), "empty device state"),
    (mk.device_packet("0000:00:05.0/vfio", 0, b"abc", flags=int(MultifdFlag.DEVICE_STATE | MultifdFlag.SYNC)),
     "SYNC device state"),
    (mk.device_packet("0000:00:05.0/vfio", 0, b"", size=MAX_DEVICE_PACKET + 1), "larger than the limit"),
    (mk.device_packet("bad\nname", 0, b"abc"), "not printable"),
    (mk.ram_packet("pc.ram", [0], [b"\0" * PAGE], pages_alloc=129), "129 pages"),
    (mk.ram_packet("pc.ram", [0, PAGE], [b"\0" * PAGE] * 2, pages_alloc=1), "non-zero pages"),
    (mk.ram_packet("pc.ram", [0], [b"\0" * PAGE], zero=[PAGE], pages_alloc=1), "zero pages"),
    (mk.ram_packet("", [0], [b"\0" * PAGE]), "without a RAM block"),
    (mk.ram_packet("pc.ram", [0], [b"\0" * PAGE], flags=int(MultifdFlag.ZSTD)), "compression"),
])
def test_packet_checks_match_qemus_loader(packet: bytes, match: str) -> None:
    with pytest.raises(StreamError, match=match):
        parse(channel(packet))


def test_oversized_device_claim_is_refused_before_reading_it() -> None:
    # only the 12 + 264 header bytes are there: the refusal must not wait for 256 MiB
    blob = channel(mk.device_packet("0000:00:05.0/vfio", 0, b"", size=MAX_DEVICE_PACKET + 1))
    p = MultifdChannelParser()
    p.feed(blob)
    assert isinstance(p.next_event(), ChannelInit)
    with pytest.raises(StreamError, match="limit"):
        p.next_event()


def test_compressed_channel_reads_next_packet_size() -> None:
    # a zstd packet lists 2 pages but carries next_packet_size bytes of compressed data
    pkt = mk.ram_packet("pc.ram", [0, PAGE], [b"Z" * 60, b"Z" * 40], flags=int(MultifdFlag.ZSTD))
    events = parse(channel(pkt), compression=Compression.ZSTD)
    ram = next(e for e in events if isinstance(e, RamPacket))
    assert ram.data_len == 100 and covered(events) == channel(pkt)
    with pytest.raises(UnsupportedStream):
        parse(channel(pkt))        # the channel was negotiated without compression


def test_page_data_is_handed_out_without_copying_the_packet() -> None:
    big = channel(mk.ram_packet("pc.ram", list(range(0, 128 * PAGE, PAGE)), [bytes([i]) * PAGE for i in range(128)]))
    p = MultifdChannelParser()
    p.feed(big)
    sizes = []
    while (ev := p.next_event()) is not NEED_DATA:
        if isinstance(ev, PacketData):
            sizes.append(len(ev.raw))
            assert isinstance(ev.raw, memoryview)
    assert sum(sizes) == 128 * PAGE


# --------------------------------------------------------------------------- payload moved past the parser
def skim(data: bytes, cut: int, take: int) -> tuple[list[object], int]:
    """Feed *data* up to *cut*, then whenever page data is due and unfed, move up to *take* bytes of it
    past the parser (consume_payload) instead of feeding them; feed the rest.  (events, bytes moved)"""
    p = MultifdChannelParser()
    out: list[object] = []
    pos, moved = cut, 0

    def drain() -> None:
        while (ev := p.next_event()) is not NEED_DATA:
            out.append(type(ev)(ev.offset, bytes(ev.raw)) if isinstance(ev, PacketData) else ev)

    if cut:                 # (an empty feed is the end of input)
        p.feed(data[:cut])
    drain()
    while pos < len(data):
        due = p.unfed_payload()
        if due and isinstance(p.current_packet, RamPacket):
            n = min(due, take, len(data) - pos)
            p.consume_payload(n)
            pos, moved = pos + n, moved + n
        else:
            p.feed(data[pos:pos + 100])
            pos += 100
        drain()
    p.feed(b"")
    drain()
    return out, moved


def test_ram_header_size_is_what_precedes_the_page_data() -> None:
    assert MultifdChannelParser().ram_header_size == 12 + 308 + 8 * 128 == 1344
    assert MultifdChannelParser(page_size=65536).ram_header_size == 12 + 308 + 8 * 8


def test_unfed_payload_counts_what_is_due_and_not_buffered() -> None:
    pkt = mk.ram_packet("pc.ram", [0, PAGE], [b"\x11" * PAGE, b"\x22" * PAGE])
    p = MultifdChannelParser()
    p.feed(channel(pkt)[:64 + 1344 + 100])
    assert isinstance(p.next_event(), ChannelInit)
    assert p.unfed_payload() == 0 and p.current_packet is None
    ram = p.next_event()
    assert isinstance(ram, RamPacket) and p.current_packet is ram
    assert p.unfed_payload() == 2 * PAGE - 100           # 100 bytes are buffered, not yet handed out
    with pytest.raises(ValueError, match="still unread"):
        p.consume_payload(1)                              # they must go out first: order is the framing
    piece = p.next_event()
    assert isinstance(piece, PacketData) and len(piece.raw) == 100
    assert p.next_event() is NEED_DATA
    assert p.unfed_payload() == 2 * PAGE - 100
    with pytest.raises(ValueError, match="are due"):
        p.consume_payload(2 * PAGE - 99)
    p.consume_payload(2 * PAGE - 100)
    assert p.unfed_payload() == 0
    p.feed(mk.sync_packet(3))
    sync = p.next_event()
    assert isinstance(sync, RamPacket) and sync.sync and sync.offset == 64 + len(pkt)
    assert p.current_packet is None and p.unfed_payload() == 0
    with pytest.raises(ValueError):
        p.consume_payload(1)                              # between packets nothing is due


@pytest.mark.parametrize("take", [1, 777, PAGE, 1 << 20])
@pytest.mark.parametrize("cut", [0, 64, 64 + 12, 64 + 1344, 64 + 1344 + 5, 64 + 1344 + 2 * PAGE])
def test_moving_page_data_past_the_parser_keeps_framing_and_offsets(take: int, cut: int) -> None:
    packets = [mk.ram_packet("pc.ram", [0, PAGE], [b"\x11" * PAGE, b"\x22" * PAGE], packet_num=1),
               mk.sync_packet(2), mk.device_packet("0000:00:05.0/vfio", 0, b"dev" * 1000),
               mk.ram_packet("pc.ram", [0], [b"\x33" * PAGE], packet_num=3)]
    data = channel(*packets)
    events, moved = skim(data, cut, take)
    full = parse(data)
    headers = [e for e in full if not isinstance(e, PacketData)]
    assert [e for e in events if not isinstance(e, PacketData)] == headers     # same events, same offsets
    assert moved + len(covered(events)) == len(data)
    for e in events:                                                           # every piece where it belongs
        assert data[e.offset:e.offset + len(e.raw)] == bytes(e.raw)            # type: ignore[attr-defined]
    i = next(i for i, e in enumerate(events) if isinstance(e, DeviceStatePacket))
    j = next(j for j in range(i + 1, len(events)) if not isinstance(events[j], PacketData))
    assert covered(events[i + 1:j]) == b"dev" * 1000   # device state is never moved past the parser here


def test_an_end_inside_moved_page_data_is_an_error_at_the_right_offset() -> None:
    pkt = mk.ram_packet("pc.ram", [0, PAGE], [b"\x11" * PAGE, b"\x22" * PAGE])
    p = MultifdChannelParser()
    p.feed(channel(pkt)[:64 + 1344])
    while p.next_event() is not NEED_DATA:
        pass
    p.consume_payload(PAGE + 3)
    p.feed(b"")
    with pytest.raises(StreamError, match=r"ends inside multifd page data \(4093 of 8192") as err:
        p.next_event()
    assert err.value.offset == 64 + 1344 + PAGE + 3
    assert p.unfed_payload() == 0   # a failed parser owes nothing


def test_a_proxy_learns_the_compression_from_the_first_packet_with_pages() -> None:
    """compression=None: the first packet with pages names it (QEMU checks those flags before it reads any
    payload, so taking them cannot frame a packet differently than QEMU); every later packet must agree."""
    z1 = mk.ram_packet("pc.ram", [0], [b"Z" * 70], flags=int(MultifdFlag.ZLIB), packet_num=1)
    z2 = mk.ram_packet("pc.ram", [PAGE], [b"Y" * 33], flags=int(MultifdFlag.ZLIB), packet_num=2)
    data = channel(mk.sync_packet(0), z1, mk.sync_packet(3), z2)
    events = parse(data, compression=None)
    assert [e.data_len for e in events if isinstance(e, RamPacket)] == [0, 70, 0, 33]
    assert covered(events) == data
    plain = mk.ram_packet("pc.ram", [0], [b"P" * PAGE], packet_num=4)
    with pytest.raises(UnsupportedStream, match="do not match the channel's \\(zlib\\)"):
        parse(channel(z1, plain), compression=None)
    assert covered(parse(channel(plain), compression=None)) == channel(plain)   # uncompressed learnt alike
    qpl = mk.ram_packet("pc.ram", [0], [b"Q" * 10], flags=int(MultifdFlag.QPL))
    with pytest.raises(UnsupportedStream, match="qpl, uadk or qatzip"):
        parse(channel(qpl), compression=None)


def test_a_compressed_packet_without_pages_reads_nothing_whatever_it_announces() -> None:
    """QEMU 7.2 leaves the previous packet's next_packet_size in a packet without normal pages, and its
    loader reads nothing for it: neither do we."""
    z1 = mk.ram_packet("pc.ram", [0], [b"Z" * 70], flags=int(MultifdFlag.ZLIB))
    stale = mk.ram_packet("pc.ram", [], [], zero=[PAGE], flags=int(MultifdFlag.ZLIB), next_size=70)
    events = parse(channel(z1, stale, mk.sync_packet(9)), compression=None)
    assert [e.data_len for e in events if isinstance(e, RamPacket)] == [70, 0, 0]
