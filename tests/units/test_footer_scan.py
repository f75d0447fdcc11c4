"""The footer scan: how a body without a length (a vmstate FULL section, our signed-statement records) is ended.

The rule (libvirt_mdev/stream/sections.py, moving to stream/scan.py; docs/architecture.md invariant 2): a body
ends at the first ``7e <be32 id>`` followed by a *well-formed next record* (``next_record_ok``).  Unit tests of
the judge itself (every record kind, valid and invalid, every prefix), then the scan through the parser,
h11-style: whole input, every cutting, truncated at every length, trailing data, every single-byte corruption.
"""
from __future__ import annotations

import pytest

from libvirt_mdev.stream.sections import SectionTable

from .handmade import (
    EOF_,
    HEAD,
    SIG_ID,
    SIG_IDSTR,
    Outcome,
    be16,
    be32,
    bodies,
    command,
    footer,
    full,
    header,
    parse,
    same_outcome,
    signed_record,
    vmdesc,
)
from .scan_api import next_record_ok
from .splits import all_cuts, bytewise, random_cuts, whole

RAM_ID, VFIO_ID, TIMER_ID = 2, 7, 3


def iterative_table() -> SectionTable:
    """RAM and a VFIO device opened by their START records, not ended: the setup/iteration phase."""
    t = SectionTable()
    t.open(RAM_ID, "ram", 0, 4, True, 0)
    t.open(VFIO_ID, "0000:00:05.0/vfio", 0, 1, True, 0)
    return t


def full_table() -> SectionTable:
    """One device FULL section seen: the non-iterable phase."""
    t = SectionTable()
    t.open(TIMER_ID, "timer", 0, 2, False, 0)
    return t


#: (name, table, record bytes, verdict once all of it is there)
CASES: list[tuple[str, SectionTable, bytes, bool]] = [
    ("EOF then vmdesc", iterative_table(), EOF_ + vmdesc(b'{"page_size": 4096}'), True),
    ("FULL of a new id", iterative_table(), header(4, 9, b"timer", 0, 2), True),
    ("START of a new id", iterative_table(), header(1, 9, b"block", 0, 1), True),
    ("FULL of a known id, same name", full_table(), header(4, TIMER_ID, b"timer", 0, 2), True),
    ("PART of open RAM", iterative_table(), b"\x02" + be32(RAM_ID), True),
    ("END of open VFIO", iterative_table(), b"\x03" + be32(VFIO_ID), True),
    ("PING of 4 bytes", iterative_table(), command(2, b"\x00\x00\x00\x01"), True),
    ("OPEN_RETURN_PATH", iterative_table(), command(1, b""), True),
    ("POSTCOPY_ADVISE, variable length", iterative_table(), command(3, b"\x00" * 16), True),
    ("EOF then not a vmdesc", iterative_table(), EOF_ + b"\x01", False),
    ("vmdesc of length 0", iterative_table(), EOF_ + b"\x06" + be32(0) + b"{", False),
    ("vmdesc over the limit", iterative_table(), EOF_ + b"\x06" + be32((16 << 20) + 1) + b"{", False),
    ("vmdesc not an object", iterative_table(), EOF_ + vmdesc(b"[1, 2]"), False),
    ("FULL with an empty idstr", iterative_table(), header(4, 9, b""), False),
    ("FULL with a binary idstr", iterative_table(), header(4, 9, b"ti\x01er"), False),
    ("FULL of a known id, other name", full_table(), header(4, TIMER_ID, b"serial", 0, 2), False),
    ("FULL of a known id, other instance", full_table(), header(4, TIMER_ID, b"timer", 1, 2), False),
    ("START of a known id", iterative_table(), header(1, RAM_ID, b"ram", 0, 4), False),
    ("PART of an unknown id", iterative_table(), b"\x02" + be32(99), False),
    ("PART of a FULL-only id", full_table(), b"\x02" + be32(TIMER_ID), False),
    ("unknown command", iterative_table(), b"\x08" + be16(0x99) + be16(0), False),
    ("PING with the wrong length", iterative_table(), command(2, b""), False),
    ("a footer is not a record", iterative_table(), footer(RAM_ID), False),
    ("unknown record type", iterative_table(), b"\x09" + be32(1), False),
]


@pytest.mark.parametrize("name,table,record,verdict", CASES, ids=[c[0] for c in CASES])
def test_next_record_verdict(name: str, table: SectionTable, record: bytes, verdict: bool) -> None:
    assert next_record_ok(record, True, table) is verdict
    assert next_record_ok(record, False, table) is verdict
    # what follows the record's header never changes the verdict
    assert next_record_ok(record + b"\xff" * 300, False, table) is verdict


@pytest.mark.parametrize("name,table,record,verdict", CASES, ids=[c[0] for c in CASES])
def test_next_record_prefixes_never_decide_wrongly(name: str, table: SectionTable, record: bytes,
                                                   verdict: bool) -> None:
    """Byte by byte: a prefix gets "need more" or the final verdict, never the other one; and where it still needed
    more, the same prefix at the end of the input is "not a record" (never "need more" when no more can come)."""
    for k in range(len(record)):
        early = next_record_ok(record[:k], False, table)
        assert early is None or early is verdict, f"{k} bytes: {early}"
        at_end = next_record_ok(record[:k], True, table)
        if early is None and record[:k] != EOF_:
            assert at_end is False, f"{k} bytes at the end: {at_end}"
        elif early is not None:
            assert at_end is early, f"{k} bytes at the end: {at_end}"


def test_eof_alone_is_a_record_only_at_the_end() -> None:
    t = iterative_table()
    assert next_record_ok(EOF_, True, t) is True
    assert next_record_ok(EOF_, False, t) is None
    assert next_record_ok(b"", True, t) is False
    assert next_record_ok(b"", False, t) is None


# -- the scan, through the parser ----------------------------------------------------------------------------

#: a timer body holding its own footer several times, each followed by something that is not a record
DECOYS = (b"\x01\x02" + footer(TIMER_ID) + b"\x09junk"               # unknown record type
          + footer(TIMER_ID) + header(4, 9, b"")                      # empty idstr
          + footer(TIMER_ID) + b"\x02" + be32(1234)                   # PART of an unknown id
          + footer(TIMER_ID) + command(2, b"")                        # PING of the wrong length
          + footer(TIMER_ID) + EOF_ + b"\x06" + be32(0) + b"{"        # vmdesc of length 0
          + footer(TIMER_ID) + footer(TIMER_ID)                       # footer twice
          + b"\x7e\x00\x00" + b"\x03\x7e")                            # a footer cut short
#: where the stream could legally end early: right after the decoy "footer, EOF" (then nothing follows)
EARLY_END = len(HEAD) + 19 + DECOYS.index(footer(TIMER_ID) + EOF_ + b"\x06") + 6
SIGNED_TEXT = b"LMDS2\n{\"kind\":\"hello\",\"seq\":1}\nc2lnbmF0dXJl"
VMDESC = vmdesc(b'{"page_size":4096,"devices":[]}')
DEVICES = HEAD + full(TIMER_ID, b"timer", DECOYS, 0, 2) + full(4, b"serial", b"\x00" * 8)
STREAM = (HEAD + full(TIMER_ID, b"timer", DECOYS, 0, 2) + signed_record(SIGNED_TEXT)
          + full(4, b"serial", b"\x00" * 8) + EOF_ + VMDESC)


def assert_same_at_any_cutting(data: bytes, seeds: int = 8) -> Outcome:
    expected = parse(whole(data))
    for how, cuts in all_cuts(data, seeds):
        got = parse(cuts)
        assert same_outcome(got, expected), f"{how}: {got.error} != {expected.error}"
    return expected


def test_decoy_footers_stay_in_the_body() -> None:
    got = parse(whole(STREAM))
    assert got.error is None
    assert bodies(got) == {TIMER_ID: DECOYS, SIG_ID: SIGNED_TEXT, 4: b"\x00" * 8}
    assert [s.name for s in got.events if s.name == "SectionFooter"] == ["SectionFooter"] * 3
    assert b"".join(s.raw for s in got.events) == STREAM
    assert got.events[-1].name == "StreamEnd" and got.events[-1].offset == len(STREAM)


def test_every_cutting_gives_the_one_shot_events() -> None:
    expected = parse(whole(STREAM))
    for how, cuts in all_cuts(STREAM):
        assert parse(cuts) == expected, how


def test_a_footer_followed_by_a_record_ends_the_body_there() -> None:
    """The documented ambiguity, made concrete: footer + a well-formed record inside device data ends the body
    early; what follows is then parsed as records (here a second header for a body with no footer: refused)."""
    body = b"\x05" + footer(TIMER_ID) + header(4, 9, b"cpu", 0, 12) + b"\xaa" * 4
    data = HEAD + full(TIMER_ID, b"timer", body, 0, 2) + EOF_
    got = assert_same_at_any_cutting(data, seeds=2)
    assert bodies(got)[TIMER_ID] == b"\x05"
    assert got.error is not None and got.error[0] == "StreamError"


def test_truncated_at_every_length_is_a_stream_error() -> None:
    """Every strict prefix is refused with StreamError (not a subclass, not another error), the same one whether
    it arrives whole or byte by byte; the one exception is the prefix that is itself a complete stream."""
    complete = []
    for n in range(len(STREAM) - len(VMDESC)):  # before the vmdesc: the stream is unfinished
        at_once = parse(whole(STREAM[:n]))
        assert same_outcome(parse(bytewise(STREAM[:n])), at_once), n
        if at_once.error is None:
            complete.append(n)
            assert at_once.events[-1].name == "StreamEnd"
        else:
            assert at_once.error[0] == "StreamError", (n, at_once.error)
    assert complete == [EARLY_END]
    inside_body = STREAM[:len(HEAD) + 19 + 10]
    message = (f"stream ends inside a section body (no footer) (section timer[0] id {TIMER_ID}) "
               f"at byte {len(inside_body) - 4}")
    assert parse(whole(inside_body)).error == ("StreamError", message)


def test_cut_inside_the_vmdesc_is_refused() -> None:
    for n in range(len(STREAM) - len(VMDESC) + 1, len(STREAM)):
        got = parse(whole(STREAM[:n]))
        assert got.error is not None and got.error[0] == "StreamError", n
        assert same_outcome(parse(bytewise(STREAM[:n])), got), n


@pytest.mark.parametrize("trailing", [b"\x00", b"\x7e", VMDESC, b"\x00" * 5000],
                         ids=["EOF", "footer byte", "second vmdesc", "5000 zeros"])
def test_trailing_data_after_the_stream_is_refused(trailing: bytes) -> None:
    expected = ("StreamError", f"data after the end of the stream at byte {len(STREAM)}")
    for cuts in (whole(STREAM + trailing), bytewise(STREAM + trailing), random_cuts(STREAM + trailing, 1)):
        got = parse(cuts)
        assert got.error == expected
        assert b"".join(s.raw for s in got.events) == STREAM


def _corruptions(data: bytes) -> list[tuple[int, bytes]]:
    out = []
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0xFF
        out.append((i, bytes(bad)))
    return out


def test_every_single_byte_corruption_is_judged_the_same_at_any_cutting() -> None:
    """Flip each byte of a stream of device sections in turn: the outcome (events, or the error and its offset)
    is the same fed whole, byte by byte and in random pieces; and no exception other than MdevError escapes."""
    refused = 0
    for i, data in _corruptions(DEVICES + EOF_ + VMDESC):
        at_once = parse(whole(data))
        refused += at_once.error is not None
        assert same_outcome(parse(bytewise(data)), at_once), i
        assert same_outcome(parse(random_cuts(data, i)), at_once), i
    assert refused > len(DEVICES) // 2  # most flips are caught; the rest fall inside opaque bodies


# -- our own records (signed statements) ----------------------------------------------------------------------

def _signed_stream(text: bytes) -> bytes:
    return HEAD + signed_record(text) + full(TIMER_ID, b"timer", b"\x00" * 4, 0, 2) + EOF_


#: first byte of a signed record's body in _signed_stream
SIGNED_BODY_AT = len(HEAD) + len(header(4, SIG_ID, SIG_IDSTR))


@pytest.mark.parametrize("bad", [b"\x00", b"\xff", b"\t", b"\r"], ids=["NUL", "0xff", "tab", "CR"])
def test_signed_record_body_must_be_printable_ascii(bad: bytes) -> None:
    """A signed-statement body is printable ASCII lines, so it cannot contain its own footer: any other byte is
    refused, at any cutting."""
    data = _signed_stream(b"LMDS2\nab" + bad + b"cd\nsig")
    for how, cuts in all_cuts(data, seeds=2):
        got = parse(cuts)
        assert got.error is not None and got.error[0] == "StreamError", how
        assert got.error[1].startswith("a libvirt-mdev record with non-ASCII bytes (section "
                                       "libvirt-mdev/signed-statement[0] id 4294967280) at byte "), how


def test_a_tilde_in_a_signed_record_is_text() -> None:
    text = b"LMDS2\n{\"a\":\"~\x7e\"}\nsig~"
    got = assert_same_at_any_cutting(_signed_stream(text), seeds=2)
    assert got.error is None and bodies(got)[SIG_ID] == text


def test_signed_record_refusal_names_the_bad_byte_at_any_cutting() -> None:
    text = b"LMDS2\nab\x00cd\nsig"
    got = assert_same_at_any_cutting(_signed_stream(text), seeds=2)
    bad_at = SIGNED_BODY_AT + text.index(0)
    assert got.error is not None and got.error[1].endswith(f"at byte {bad_at}")


def test_signed_record_over_its_limit_is_refused() -> None:
    limit = 64 << 10  # MAX_OUR_RECORD (libvirt_mdev/stream/wire.py): records are a few hundred bytes
    fits = parse(whole(_signed_stream(b"A" * limit)))
    assert fits.error is None and bodies(fits)[SIG_ID] == b"A" * limit
    data = _signed_stream(b"A" * (limit + 1))
    for cuts in (whole(data), *(random_cuts(data, seed, most=5000) for seed in range(3))):
        got = parse(cuts)
        assert got.error is not None and got.error[0] == "StreamError"
        assert f"section body longer than {limit} bytes without a footer" in got.error[1]


def test_signed_record_over_its_limit_names_one_offset_at_any_cutting() -> None:
    data = _signed_stream(b"A" * ((64 << 10) + 1))
    expected = parse(whole(data))
    for seed in range(3):
        assert same_outcome(parse(random_cuts(data, seed, most=5000)), expected)
