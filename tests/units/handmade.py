"""Migration-stream records written out byte by byte, and a parser driver that is blind to chunking.

The bytes are spelled out here from QEMU's format (docs/stream-format.md) instead of taken from the library's
writer, so a unit test does not check the parser against the parser's own idea of the format.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

from libvirt_mdev.errors import MdevError
from libvirt_mdev.stream import Event, StreamParser

from .splits import Cuts

EOF_ = b"\x00"
FILE_HEADER = b"QEVM" + struct.pack(">I", 3)
MACHINE = b"pc-i440fx-7.2"
CONFIGURATION = b"\x07" + struct.pack(">I", len(MACHINE)) + MACHINE
HEAD = FILE_HEADER + CONFIGURATION
#: VFIO_MIG_FLAG_* markers (be64)
END_OF_STATE = struct.pack(">Q", 0xFFFFFFFFEF100001)
DEV_CONFIG_STATE = struct.pack(">Q", 0xFFFFFFFFEF100002)
DEV_SETUP_STATE = struct.pack(">Q", 0xFFFFFFFFEF100003)
DEV_DATA_STATE = struct.pack(">Q", 0xFFFFFFFFEF100004)
#: our signed-statement records: FULL sections with this idstr and id
SIG_IDSTR = b"libvirt-mdev/signed-statement"
SIG_ID = 0xFFFFFFF0


def be16(n: int) -> bytes:
    return struct.pack(">H", n)


def be32(n: int) -> bytes:
    return struct.pack(">I", n)


def be64(n: int) -> bytes:
    return struct.pack(">Q", n)


def header(rtype: int, sid: int, idstr: bytes, instance: int = 0, version: int = 1) -> bytes:
    """A START (1) or FULL (4) section header."""
    return bytes([rtype]) + be32(sid) + bytes([len(idstr)]) + idstr + be32(instance) + be32(version)


def footer(sid: int) -> bytes:
    return b"\x7e" + be32(sid)


def full(sid: int, idstr: bytes, body: bytes, instance: int = 0, version: int = 1) -> bytes:
    return header(4, sid, idstr, instance, version) + body + footer(sid)


def part(sid: int, body: bytes, end: bool = False) -> bytes:
    return bytes([3 if end else 2]) + be32(sid) + body + footer(sid)


def command(number: int, data: bytes) -> bytes:
    return b"\x08" + be16(number) + be16(len(data)) + data


def vmdesc(json_text: bytes) -> bytes:
    return b"\x06" + be32(len(json_text)) + json_text


def vfio_start(sid: int, idstr: bytes = b"0000:00:05.0/vfio") -> bytes:
    return header(1, sid, idstr) + DEV_SETUP_STATE + END_OF_STATE + footer(sid)


def vfio_end(sid: int, state: bytes) -> bytes:
    return part(sid, DEV_DATA_STATE + be64(len(state)) + state + END_OF_STATE, end=True)


def signed_record(text: bytes) -> bytes:
    return full(SIG_ID, SIG_IDSTR, text)


# -- driving the parser ---------------------------------------------------------------------------------------

#: events that carry one piece of a body; pieces depend on the cutting, their concatenation does not
_PIECES = ("Opaque", "VfioBlockData", "VfioConfigData", "RamRecords")


@dataclass(frozen=True)
class Seen:
    """One event, or one run of body pieces merged: what must not depend on the cutting."""

    name: str
    offset: int
    section_id: int | None
    raw: bytes


@dataclass(frozen=True)
class Outcome:
    events: tuple[Seen, ...]
    error: tuple[str, str] | None = None  # (class name, message)


def parse(cuts: Cuts) -> Outcome:
    """Feed *cuts* then the end of input; every event, body pieces merged, and the error if one was raised."""
    p = StreamParser()
    seen: list[Seen] = []
    try:
        for piece in [*cuts, b""]:
            p.feed(piece)
            for ev in p.events():
                _add(seen, ev)
    except MdevError as exc:
        return Outcome(tuple(seen), (type(exc).__name__, str(exc)))
    return Outcome(tuple(seen))


def _add(seen: list[Seen], ev: object) -> None:
    assert isinstance(ev, Event)
    name = type(ev).__name__
    raw = bytes(ev.raw)  # a view into the feed: copy before the next one
    sid = getattr(ev, "section_id", None)
    last = seen[-1] if seen else None
    if name in _PIECES and last is not None and last.name == name and last.section_id == sid:
        seen[-1] = Seen(name, last.offset, sid, last.raw + raw)
        return
    seen.append(Seen(name, ev.offset, sid, raw))


def same_outcome(a: Outcome, b: Outcome) -> bool:
    """Equal results of one input fed two ways.  A refused input must be refused with the same error (class,
    message, offset); the events handed out before the refusal may differ (a streaming parser hands out what it
    has), so for those only the error is compared."""
    if a.error is not None or b.error is not None:
        return a.error == b.error
    return a == b


def bodies(outcome: Outcome, name: str = "Opaque") -> dict[int | None, bytes]:
    """Section id -> the body bytes handed out as *name* events."""
    out: dict[int | None, bytes] = {}
    for s in outcome.events:
        if s.name == name:
            out[s.section_id] = out.get(s.section_id, b"") + s.raw
    return out
