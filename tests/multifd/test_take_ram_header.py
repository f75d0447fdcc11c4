"""The codec's fast path for the proxy (MultifdChannelParser.take_ram_header): a RAM header
taken whole, without feeding it, must be framed and checked exactly as when it is fed,
and must hand the codec back in a state where feeding goes on as if nothing happened."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from libvirt_mdev.errors import StreamError
from libvirt_mdev.stream.events import NEED_DATA
from libvirt_mdev.stream.multifd import (
    ChannelEnd,
    DeviceStatePacket,
    MultifdChannelParser,
    PacketData,
    RamPacket,
)
from testkit import multifd as mk

VM = "7d3b1b86-4a4f-4c8e-9a57-3f0d6c9e2a11"
PAGE = 4096
HEADER = MultifdChannelParser().ram_header_size


def pages(n: int, seed: int) -> tuple[list[int], list[bytes]]:
    return [i * PAGE for i in range(n)], [bytes([(seed + i) % 251]) * PAGE for i in range(n)]


def ram(n: int, num: int, zero: int = 0) -> bytes:
    offs, data = pages(n, num)
    return mk.ram_packet("pc.ram", offs, data, zero=[(n + i) * PAGE for i in range(zero)], packet_num=num)


PACKETS = {
    "ram": lambda k: ram(1 + k % 5, k),
    "full": lambda k: ram(128, k),
    "zero": lambda k: ram(0, k, zero=3),
    "sync": lambda k: mk.sync_packet(k),
    "device": lambda k: mk.device_packet("0000:00:05.0/vfio", 0, bytes([k % 256]) * (100 + k)),
}


def drain(p: MultifdChannelParser, out: list[tuple[type, int, bytes]]) -> None:
    while (ev := p.next_event()) is not NEED_DATA:
        out.append((type(ev), ev.offset, bytes(ev.raw)))


def by_feeding(data: bytes) -> list[tuple[type, int, bytes]]:
    p = MultifdChannelParser()
    out: list[tuple[type, int, bytes]] = []
    p.feed(data)
    p.feed(b"")
    drain(p, out)
    return out


def like_the_pump(data: bytes, choices: list[bool], ram_starts: set[int]) -> tuple[list[tuple[type, int, bytes]], int]:
    """Read the channel as SidePump does with splice: at each packet boundary try the fast
    path on the next HEADER bytes; move the page data past the codec (consume_payload) or,
    when *choices* says so, feed it.  Returns the events and how many headers went fast.
    A RAM packet whose first byte is the next to read (nothing fed past it) must go fast."""
    p = MultifdChannelParser()
    out: list[tuple[type, int, bytes]] = []
    pos, fast, turn = 0, 0, 0
    while pos < len(data):
        ev = p.take_ram_header(data[pos:pos + HEADER])
        assert (ev is not None) == (pos in ram_starts), f"at byte {pos}"
        if ev is None:  # not a RAM header at a boundary: feed what the pump would have read
            due = p.unfed_payload()
            n = 64 if pos == 0 else min(due, 300) if due else HEADER
            n = min(len(data) - pos, n)
            p.feed(data[pos:pos + n])
            pos += n
            drain(p, out)
            continue
        fast += 1
        out.append((RamPacket, ev.offset, bytes(ev.raw)))
        pos += HEADER
        if not ev.data_len:
            continue
        feed = choices[turn % len(choices)]
        turn += 1
        if feed:
            p.feed(data[pos:pos + ev.data_len])
            drain(p, out)
        else:
            assert p.unfed_payload() == ev.data_len
            p.consume_payload(ev.data_len)
            out.append((PacketData, pos, data[pos:pos + ev.data_len]))
        pos += ev.data_len
    p.feed(b"")
    drain(p, out)
    return out, fast


def merged(events: list[tuple[type, int, bytes]]) -> list[tuple[type, int, bytes]]:
    """Payload pieces joined: how many pieces a payload comes in depends on the reads."""
    out: list[tuple[type, int, bytes]] = []
    for kind, at, raw in events:
        if kind is PacketData and out and out[-1][0] is PacketData and out[-1][1] + len(out[-1][2]) == at:
            out[-1] = (kind, out[-1][1], out[-1][2] + raw)
        else:
            out.append((kind, at, raw))
    return out


@settings(max_examples=60, deadline=None)
@given(kinds=st.lists(st.sampled_from(sorted(PACKETS)), min_size=1, max_size=12),
       choices=st.lists(st.booleans(), min_size=1, max_size=4))
def test_the_fast_path_frames_a_channel_exactly_as_feeding_it(kinds: list[str], choices: list[bool]) -> None:
    packets = [PACKETS[k](i) for i, k in enumerate(kinds)]
    data = mk.channel_init(VM, 1) + b"".join(packets)
    starts, at = [], 64
    for packet in packets:
        starts.append(at)
        at += len(packet)
    want = merged(by_feeding(data))
    got, fast = like_the_pump(data, choices, {at for at, kind in zip(starts, kinds, strict=True) if kind != "device"})
    assert merged(got) == want
    assert b"".join(raw for _, _, raw in got) == data
    assert got[-1][0] is ChannelEnd
    assert fast >= (kinds[0] != "device")  # a first RAM packet is met at a boundary


def test_before_the_channel_init_nothing_is_taken() -> None:
    p = MultifdChannelParser()
    assert p.take_ram_header(ram(1, 0)[:HEADER]) is None
    p.feed(mk.channel_init(VM, 3))
    drain(p, [])
    assert p.channel_id == 3
    assert p.take_ram_header(ram(1, 0)[:HEADER]) is not None


def test_a_device_state_header_is_left_to_the_grammar() -> None:
    p = MultifdChannelParser()
    p.feed(mk.channel_init(VM, 1))
    drain(p, [])
    packet = mk.device_packet("0000:00:05.0/vfio", 0, b"x" * 5000)
    assert p.take_ram_header(packet[:HEADER]) is None
    p.feed(packet)
    out: list[tuple[type, int, bytes]] = []
    drain(p, out)
    assert out[0][0] is DeviceStatePacket and out[0][1] == 64
    assert b"".join(raw for _, _, raw in out) == packet


def test_nothing_is_taken_while_fed_bytes_wait_or_payload_is_due() -> None:
    p = MultifdChannelParser()
    p.feed(mk.channel_init(VM, 1) + b"\x11")
    drain(p, [])
    assert p.take_ram_header(ram(1, 0)[:HEADER]) is None      # a fed byte is unread
    p = MultifdChannelParser()
    p.feed(mk.channel_init(VM, 1))
    drain(p, [])
    assert p.take_ram_header(ram(2, 0)[:HEADER]) is not None
    assert p.take_ram_header(ram(2, 1)[:HEADER]) is None      # the first packet's pages are due
    assert p.take_ram_header(ram(2, 1)[:HEADER - 1]) is None  # and a short read never goes fast


@pytest.mark.parametrize("bad, message", [
    (lambda: mk.ram_packet("pc.ram", [0], [b"\0" * PAGE], pages_alloc=129), "129 pages"),
    (lambda: mk.ram_packet("pc.ram", [0], [b"\0" * PAGE], magic=0x1234), "magic 0x1234"),
    (lambda: mk.ram_packet("", [0], [b"\0" * PAGE]), "without a RAM block name"),
    (lambda: mk.ram_packet("pc.ram", [0], [b"\0" * PAGE], flags=1 << 1), "compression"),
])
def test_a_bad_header_fails_the_same_way_taken_or_fed(bad, message: str) -> None:  # type: ignore[no-untyped-def]
    data = mk.channel_init(VM, 1) + ram(1, 0) + bad()
    fed = MultifdChannelParser()
    fed.feed(data)
    with pytest.raises(StreamError) as by_feed:
        drain(fed, [])
    taken = MultifdChannelParser()
    taken.feed(data[:64 + len(ram(1, 0))])
    drain(taken, [])
    with pytest.raises(StreamError) as by_take:
        taken.take_ram_header(bad()[:HEADER])
    assert message in str(by_take.value)
    assert str(by_take.value) == str(by_feed.value)
    with pytest.raises(StreamError):  # and the codec stays failed
        taken.next_event()


def test_the_channel_may_not_end_inside_page_data_taken_fast() -> None:
    p = MultifdChannelParser()
    p.feed(mk.channel_init(VM, 1))
    drain(p, [])
    packet = ram(3, 0)
    ev = p.take_ram_header(packet[:HEADER])
    assert ev is not None and ev.data_len == 3 * PAGE
    p.consume_payload(PAGE)
    p.feed(packet[HEADER + PAGE:HEADER + 2 * PAGE])
    p.feed(b"")
    with pytest.raises(StreamError, match="ends inside multifd page data"):
        drain(p, [])
