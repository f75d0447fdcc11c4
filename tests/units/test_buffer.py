"""libvirt_mdev/stream/buffer.py (the parser's input buffer), h11-style.

The buffer's promise (its docstring): fed chunks are kept as zero-copy views, every ``take*``/``peek*`` either
succeeds or returns ``None`` without consuming anything, and what comes out does not depend on how the input was
cut into feeds.  A toy reader of length-prefixed records (be32 length, body) drives it the way the parser does:
try, and on ``None`` wait for the next feed.
"""
from __future__ import annotations

import array
import re
import struct

import pytest

from libvirt_mdev.stream.buffer import GATHER, Input

from .splits import Cuts, all_cuts, bytewise, random_cuts, whole


def record(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def take_records(inp: Input) -> list[bytes]:
    """Every complete record now available; a short one is left untouched for the next feed."""
    out: list[bytes] = []
    while True:
        head = inp.peek(4)
        if head is None:
            return out
        (n,) = struct.unpack(">I", head)
        before = (inp.offset, inp.available())
        rec = inp.take(4 + n)
        if rec is None:
            assert (inp.offset, inp.available()) == before, "a failed take consumed bytes"
            return out
        out.append(bytes(rec[4:]))


def feed_and_read(cuts: Cuts) -> tuple[list[bytes], Input]:
    inp = Input()
    got: list[bytes] = []
    for piece in cuts:
        inp.feed(piece)
        got += take_records(inp)
    inp.feed(b"")
    got += take_records(inp)
    return got, inp


BODIES = [b"", b"a", b"\x00\x01\x02\x03\x04", bytes(range(256)) * 2, b"tail"]
SMALL = b"".join(record(b) for b in BODIES)


def test_records_are_the_same_however_the_input_is_cut() -> None:
    expected, one_shot = feed_and_read(whole(SMALL))
    assert expected == BODIES and one_shot.at_end() and one_shot.offset == len(SMALL)
    for how, cuts in all_cuts(SMALL):
        got, inp = feed_and_read(cuts)
        assert got == expected, how
        assert inp.offset == len(SMALL) and inp.at_end(), how


def test_large_feeds_mixed_with_small_ones() -> None:
    """Feeds at and above GATHER are queued as they are, smaller ones gathered: both paths, interleaved."""
    bodies = [bytes([i]) * n for i, n in enumerate((GATHER - 2, 3, GATHER + 7, 1, 50_000, GATHER * 2 // 3))]
    data = b"".join(record(b) for b in bodies)
    cuttings = {"whole": whole(data), "bytewise": bytewise(data),
                "GATHER-1": [data[i:i + GATHER - 1] for i in range(0, len(data), GATHER - 1)],
                "GATHER+1": [data[i:i + GATHER + 1] for i in range(0, len(data), GATHER + 1)]}
    cuttings.update({f"random {s}": random_cuts(data, s, most=3 * GATHER) for s in range(4)})
    for how, cuts in cuttings.items():
        got, inp = feed_and_read(cuts)
        assert got == bodies, how
        assert inp.offset == len(data) and inp.at_end(), how


@pytest.mark.parametrize("trailing", [b"\x00", b"\x00\x00\x00\x05abc", b"\x00\x00\xff\xff" + b"x" * 100],
                         ids=["part of a length", "short body", "long body"])
def test_trailing_partial_record_is_left_unconsumed(trailing: bytes) -> None:
    """A short last record: nothing of it is consumed, it stays available, and the input is not at its end."""
    data = SMALL + trailing
    for how, cuts in all_cuts(data, seeds=2):
        got, inp = feed_and_read(cuts)
        assert got == BODIES, how
        assert inp.offset == len(SMALL), how
        assert inp.available() == len(trailing), how
        assert inp.eof and not inp.at_end(), how
        assert inp.peek_upto(1000) == trailing, how


def test_failed_take_and_peek_change_nothing() -> None:
    inp = Input()
    inp.feed(b"abc")
    inp.feed(b"d" * GATHER)  # a second chunk behind the gathered one
    assert inp.take(3 + GATHER + 1) is None and inp.peek(3 + GATHER + 1) is None
    assert inp.offset == 0 and inp.available() == 3 + GATHER
    view = inp.take(5)  # straddles the two chunks: copied, correct
    assert view is not None and bytes(view) == b"abcdd" and inp.offset == 5
    assert inp.peek(2) == b"dd" and inp.offset == 5


def test_peek_upto_returns_what_there_is() -> None:
    inp = Input()
    inp.feed(b"xyz")
    assert inp.peek_upto(10) == b"xyz" and inp.peek_upto(2) == b"xy" and inp.offset == 0


def test_take_upto_hands_out_the_input_in_order_within_one_chunk() -> None:
    data = bytes(range(256)) * 700  # > GATHER: some feeds queued as views, some gathered
    for how, cuts in [("whole", whole(data)), ("bytewise", [*bytewise(data[:5000]), data[5000:]]),
                      *((f"random {s}", random_cuts(data, s, most=GATHER + 100)) for s in range(4))]:
        inp = Input()
        out = bytearray()
        for piece in cuts:
            inp.feed(piece)
            while (view := inp.take_upto(1000)) is not None:
                assert 1 <= len(view) <= 1000, how
                out += view
        assert inp.take_upto(1000) is None
        assert bytes(out) == data and inp.offset == len(data), how


def test_large_feeds_are_not_copied() -> None:
    """Zero-copy is the reason the buffer exists: a view handed out points into the object that was fed."""
    big = bytes(GATHER * 2)
    inp = Input()
    inp.feed(big)
    first = inp.take(100)
    rest = inp.take_upto(len(big))
    assert first is not None and rest is not None
    assert first.obj is big and rest.obj is big
    assert len(first) + len(rest) == len(big)


def test_small_feeds_are_gathered_into_one_chunk() -> None:
    """A peer dripping one byte per feed must not cost one queued view per byte: the bytes come out in one piece."""
    inp = Input()
    for i in range(1000):
        inp.feed(bytes([i % 256]))
    view = inp.take_upto(10_000)
    assert view is not None and bytes(view) == bytes(i % 256 for i in range(1000))


def test_non_byte_memoryviews_are_read_as_bytes() -> None:
    words = array.array("I", [1, 2, 0xDEADBEEF])
    inp = Input()
    inp.feed(memoryview(words))
    got = inp.take(len(words) * words.itemsize)
    assert got is not None and bytes(got) == words.tobytes()


def test_match_consumes_the_longest_match_in_the_current_chunk_only() -> None:
    inp = Input()
    inp.feed(b"aaaab" + b"a" * (GATHER - 5))
    inp.feed(b"a" * GATHER)  # a second chunk: a match never runs into it
    pat = re.compile(rb"a+")
    m = inp.match(pat)
    assert m is not None and bytes(m) == b"aaaa" and inp.offset == 4
    assert inp.match(pat) is None and inp.offset == 4  # no match: nothing consumed
    assert inp.match(re.compile(rb"a*")) is None and inp.offset == 4  # an empty match is no match
    b = inp.take(1)
    assert b is not None and bytes(b) == b"b"
    m = inp.match(pat)
    assert m is not None and len(m) == GATHER - 5 and inp.offset == GATHER
    m = inp.match(pat)
    assert m is not None and len(m) == GATHER and inp.offset == 2 * GATHER


def test_search_in_chunk_is_relative_and_consumes_nothing() -> None:
    first = b"." * (GATHER - 2) + b"xy"
    inp = Input()
    inp.feed(first)
    inp.feed(b"z" + b"." * GATHER)
    assert inp.search_in_chunk(re.compile(rb"xy")) == GATHER - 2
    assert inp.search_in_chunk(re.compile(rb"xyz")) == -1  # straddles two chunks: not in this one
    assert inp.take(10) is not None
    assert inp.search_in_chunk(re.compile(rb"xy")) == GATHER - 12 and inp.offset == 10
    assert inp.chunk_remaining() == GATHER - 10


def test_offsets_are_absolute_across_chunks() -> None:
    inp = Input()
    inp.feed(b"a" * GATHER)
    inp.feed(b"b" * GATHER)
    assert inp.take_upto(2 * GATHER) is not None and inp.offset == GATHER
    view = inp.take_upto(10)
    assert view is not None and bytes(view) == b"b" * 10 and inp.offset == GATHER + 10


def test_end_of_input() -> None:
    inp = Input()
    assert not inp.eof and not inp.at_end()
    inp.feed(b"ab")
    inp.feed(b"")
    assert inp.eof and not inp.at_end()
    assert inp.take(3) is None
    ab = inp.take(2)
    assert ab is not None and bytes(ab) == b"ab" and inp.at_end()
