"""``BodyGuard``: the search of every scan-delimited body for a hidden VFIO section (docs/architecture.md,
invariant 2), h11-style.

If our end of a vmstate body ever differs from QEMU's, QEMU reads records inside bytes we passed as opaque; the
guard refuses any body holding the bytes a VFIO section header or a PART/END of an open VFIO section would need.
Its verdict, the offset it names and which of two hidden records it reports must not depend on how the body
arrives (a fuzzer found the order once: tests/fuzz/regressions/stream-guard-order-*).
"""
from __future__ import annotations

import pytest

from libvirt_mdev.errors import StreamError
from libvirt_mdev.stream.sections import SectionInfo, SectionTable

from .handmade import (
    DEV_CONFIG_STATE,
    END_OF_STATE,
    EOF_,
    HEAD,
    be32,
    full,
    header,
    parse,
    same_outcome,
    vfio_end,
    vfio_start,
)
from .scan_api import BodyGuard
from .splits import Cuts, all_cuts, whole

VFIO_ID, OTHER_ID, TIMER_ID = 7, 8, 3
VFIO_IDSTR = b"0000:00:05.0/vfio"
#: where the guarded body starts in the stream (any value: offsets must be absolute)
BASE = 1000
LABEL = f"timer[0] id {TIMER_ID}"


def _tables() -> tuple[SectionInfo, SectionTable]:
    """The guarded timer section, and a table where a VFIO device (and another iterative section) is open."""
    table = SectionTable()
    table.open(VFIO_ID, VFIO_IDSTR.decode(), 0, 1, True, 0)
    table.open(OTHER_ID, "ram", 0, 4, True, 0)
    timer = SectionTable().open(TIMER_ID, "timer", 0, 2, False, 0)
    return timer, table


def guard(cuts: Cuts) -> tuple[str, str] | None:
    """Feed the body in *cuts*: None when it passes, else (error class, message)."""
    info, table = _tables()
    g = BodyGuard(info, table)
    off = BASE
    try:
        for piece in cuts:
            g.feed(memoryview(piece), off)
            off += len(piece)
    except StreamError as exc:
        return type(exc).__name__, str(exc)
    return None


def assert_guard_same_at_any_cutting(body: bytes) -> tuple[str, str] | None:
    expected = guard(whole(body))
    for how, cuts in all_cuts(body, seeds=4):
        assert guard(cuts) == expected, how
    return expected


def refusal(what: str, at: int) -> tuple[str, str]:
    message = (f"{what} is hidden inside the body of {LABEL}; the section boundaries are ambiguous, refusing "
               f"(section {LABEL}) at byte {BASE + at}")
    return "StreamError", message


def hidden_header(rtype: int = 1, idstr: bytes = VFIO_IDSTR, version: int = 1) -> bytes:
    return header(rtype, 42, idstr, 0, version)


def hidden_part(sid: int = VFIO_ID, rtype: int = 2, marker: int = 1) -> bytes:
    return bytes([rtype]) + be32(sid) + b"\xff\xff\xff\xff\xef\x10\x00" + bytes([marker])


PAD = bytes(range(0x20, 0x7E)) + b"\x00\x01\x02\x03\x04"  # printable text and record-type bytes, nothing hidden


HIDDEN_HEADERS = [
    ("START of a VFIO device", hidden_header(1)),
    ("FULL of a VFIO device", hidden_header(4)),
    ("FULL named bare vfio", hidden_header(4, b"vfio", 0)),
    ("START, version 0", hidden_header(1, version=0)),
]


@pytest.mark.parametrize("name,record", HIDDEN_HEADERS, ids=[c[0] for c in HIDDEN_HEADERS])
def test_hidden_vfio_header_is_refused_at_its_offset(name: str, record: bytes) -> None:
    body = PAD + record + PAD
    idstr = record[6:6 + record[5]].decode()
    assert assert_guard_same_at_any_cutting(body) == refusal(f"a VFIO section header ({idstr!r})", len(PAD))


@pytest.mark.parametrize("rtype", [2, 3])
@pytest.mark.parametrize("marker", [1, 4, 6])
def test_hidden_part_or_end_of_an_open_vfio_section_is_refused(rtype: int, marker: int) -> None:
    body = PAD + hidden_part(VFIO_ID, rtype, marker) + PAD
    assert assert_guard_same_at_any_cutting(body) == refusal(f"a PART/END record of VFIO section id {VFIO_ID}",
                                                             len(PAD))


NEAR_MISSES = [
    ("PART of a non-VFIO section", hidden_part(OTHER_ID)),
    ("PART of an unknown id", hidden_part(99)),
    ("VFIO marker 0 (not a flag)", hidden_part(VFIO_ID, marker=0)),
    ("VFIO marker 7 (not a flag)", hidden_part(VFIO_ID, marker=7)),
    ("record type 1 before a marker", hidden_part(VFIO_ID, rtype=1)),
    ("a name that only ends in vfio", hidden_header(1, b"0000:00:05.0/xvfio")),
    ("vfio as a suffix without a slash", hidden_header(1, b"0000:00:05.0-vfio")),
    ("version 2", hidden_header(1, version=2)),
    ("not a START/FULL type byte", b"\x02" + hidden_header(1)[1:]),
    ("length byte that does not match", hidden_header(1)[:5] + b"\x10" + hidden_header(1)[6:]),
    ("a non-printable name", hidden_header(1, b"0000:00:05.\x01/vfio")),
    ("the word alone", b"... vfio ... /vfio\x00\x00\x00\x00\x00\x00\x00\x01"),
]


@pytest.mark.parametrize("name,record", NEAR_MISSES, ids=[c[0] for c in NEAR_MISSES])
def test_near_misses_pass(name: str, record: bytes) -> None:
    """What is not a hidden VFIO record passes: the guard must not refuse ordinary device state."""
    assert assert_guard_same_at_any_cutting(PAD + record + PAD) is None


def test_of_two_hidden_records_the_first_is_reported_at_any_cutting() -> None:
    """The fuzzer's finding: the header was searched before the PART, so a later header in the same piece won
    over an earlier PART when fed whole but not in pieces."""
    body = PAD + hidden_part(VFIO_ID) + PAD + hidden_header(1) + PAD
    assert assert_guard_same_at_any_cutting(body) == refusal(f"a PART/END record of VFIO section id {VFIO_ID}",
                                                             len(PAD))
    body = PAD + hidden_header(4) + hidden_part(VFIO_ID)
    assert assert_guard_same_at_any_cutting(body) == refusal(f"a VFIO section header ({VFIO_IDSTR.decode()!r})",
                                                             len(PAD))


def test_a_pattern_split_over_many_pieces_far_apart_is_seen() -> None:
    """The guard keeps a tail between pieces: a header spread over pieces of one byte after a long body."""
    body = bytes(5000) + hidden_header(1)
    pieces = [body[:5000]] + [body[i:i + 1] for i in range(5000, len(body))]
    assert guard(pieces) == refusal(f"a VFIO section header ({VFIO_IDSTR.decode()!r})", 5000)


# -- through the parser: every scan-delimited body is guarded ------------------------------------------------

STATE = bytes(range(256)) * 3


def _stream(timer_body: bytes, vfio_config: bytes = b"\x10" * 64) -> bytes:
    """A VFIO device (START, END with its state, FULL with its config) and a timer device."""
    return (HEAD + vfio_start(VFIO_ID) + vfio_end(VFIO_ID, STATE)
            + full(VFIO_ID, VFIO_IDSTR, DEV_CONFIG_STATE + vfio_config + END_OF_STATE)
            + full(TIMER_ID, b"timer", timer_body, 0, 2) + EOF_)


def test_the_clean_stream_parses_at_any_cutting() -> None:
    data = _stream(PAD)
    expected = parse(whole(data))
    assert expected.error is None and expected.events[-1].name == "StreamEnd"
    for how, cuts in all_cuts(data, seeds=2):
        assert parse(cuts) == expected, how


@pytest.mark.parametrize("hidden,what", [
    (hidden_part(VFIO_ID, 3), f"a PART/END record of VFIO section id {VFIO_ID}"),
    (hidden_header(1), f"a VFIO section header ({VFIO_IDSTR.decode()!r})"),
], ids=["hidden END", "hidden START header"])
def test_a_vmstate_body_hiding_vfio_is_refused_at_any_cutting(hidden: bytes, what: str) -> None:
    data = _stream(PAD + hidden + PAD)
    at = data.index(hidden)
    got = parse(whole(data))
    message = (f"{what} is hidden inside the body of {LABEL}; the section boundaries are ambiguous, refusing "
               f"(section {LABEL}) at byte {at}")
    assert got.error == ("StreamError", message)
    for how, cuts in all_cuts(data, seeds=2):
        assert same_outcome(parse(cuts), got), how


def test_a_vfio_config_body_hiding_a_header_is_refused() -> None:
    """The VFIO config (DEV_CONFIG_STATE ... END_OF_STATE) is scan-delimited too, so it is guarded too."""
    data = _stream(PAD, vfio_config=b"\x10" * 8 + hidden_header(4, b"0000:00:06.0/vfio") + b"\x10" * 8)
    got = parse(whole(data))
    assert got.error is not None and got.error[0] == "StreamError"
    assert got.error[1].startswith("a VFIO section header ('0000:00:06.0/vfio') is hidden inside the body of "
                                   f"{VFIO_IDSTR.decode()}[0] id {VFIO_ID}")
    assert got.error[1].endswith(f"at byte {data.index(b'0000:00:06.0/vfio') - 6}")
    for how, cuts in all_cuts(data, seeds=2):
        assert same_outcome(parse(cuts), got), how
