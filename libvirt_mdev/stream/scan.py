"""The footer scan: where a body that carries no length (a vmstate FULL section, a VFIO
config section, our own records) ends, and the guard that searches every such body.

Rule used to end a vmstate body (and a VFIO config body), :func:`scan_to_footer`:
the first occurrence of ``[terminator] 7e <be32 section_id>`` that is followed by a
*well-formed next record* (:func:`next_record_ok`): EOF (then nothing, or VMDESCRIPTION
with a sane length and ``{``), a START/FULL header with a printable idstr that does not
contradict an id we already know, a PART/END for an open iterative section, or a
COMMAND with a known number and QEMU's fixed length.  The chance that device data
contains a footer *and* a well-formed record right after it is tiny, and a wrong
split can only make a later check fail (fail closed); it cannot hide VFIO state,
because VFIO state is only accepted inside sections whose idstr says VFIO, and those
are parsed exactly.  An iterative section of a kind we cannot parse is refused.

Why this is safe, and the section-order rules that keep our split and QEMU's equal: the
theory in :mod:`.sections`.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Generator

from ..errors import StreamError
from ._util import printable_ascii
from .buffer import Input
from .events import NEED_DATA, Opaque, SectionKind, Step, StreamEvent
from .sections import SectionInfo, SectionTable
from .wire import (
    BE16,
    BE32,
    BE64,
    MAX_FULL_SECTION,
    MAX_OUR_RECORD,
    MAX_VMDESC_LEN,
    MIG_COMMAND_LEN,
    MigCommand,
    SectionType,
    VfioFlag,
)
from .writer import encode_footer

#: bytes of the next record header needed to judge it (type, id, len, idstr≤255, inst, ver)
_LOOKAHEAD = 1 + 4 + 1 + 255 + 8


def next_record_ok(b: bytes, at_end: bool, table: SectionTable) -> bool | None:
    """Is *b* the start of a well-formed top-level record?  ``None``: need more bytes."""
    if not b:
        return False if at_end else None
    t = b[0]
    if t == SectionType.EOF:
        if len(b) == 1:
            return True if at_end else None
        if b[1] != SectionType.VMDESCRIPTION:
            return False
        if len(b) < 7:
            return False if at_end else None
        (n,) = BE32.unpack_from(b, 2)
        return 0 < n <= MAX_VMDESC_LEN and b[6] == ord("{")
    if t in (SectionType.SECTION_START, SectionType.SECTION_FULL):
        if len(b) < 6:
            return False if at_end else None
        (sid,) = BE32.unpack_from(b, 1)
        n = b[5]
        if n == 0:
            return False
        if len(b) < 6 + n + 8:
            return False if at_end else None
        raw_id = b[6:6 + n]
        if not printable_ascii(raw_id):
            return False
        (inst,) = BE32.unpack_from(b, 6 + n)
        known = table.by_id.get(sid)
        if known is None:
            return True
        return t == SectionType.SECTION_FULL and (known.idstr, known.instance_id) == (raw_id.decode(), inst)
    if t in (SectionType.SECTION_PART, SectionType.SECTION_END):
        if len(b) < 5:
            return False if at_end else None
        (sid,) = BE32.unpack_from(b, 1)
        info = table.by_id.get(sid)
        # structure only: a PART/END out of order is then refused with a precise message
        return info is not None and info.iterative
    if t == SectionType.COMMAND:
        if len(b) < 5:
            return False if at_end else None
        (cmd,) = BE16.unpack_from(b, 1)
        (ln,) = BE16.unpack_from(b, 3)
        try:
            fixed = MIG_COMMAND_LEN[MigCommand(cmd)]
        except (ValueError, KeyError):
            return False
        return fixed < 0 or fixed == ln
    return False


#: a VFIO START/FULL header ends with "...vfio", be32 instance, be32 version (0 or 1)
_HIDDEN_VFIO_HEADER = re.compile(rb"vfio(?=[\x00-\xff]{4}\x00\x00\x00[\x00\x01])")
#: a VFIO PART/END header (type, be32 id) is followed by a VFIO marker: every VfioFlag is
#: one 7-byte prefix and a last byte from a small range
_FLAG_PREFIX = BE64.pack(VfioFlag.END_OF_STATE)[:7]
assert all(BE64.pack(f)[:7] == _FLAG_PREFIX for f in VfioFlag)
_FLAG_LAST = re.escape(bytes([min(f & 0xFF for f in VfioFlag)])), re.escape(bytes([max(f & 0xFF for f in VfioFlag)]))
_HIDDEN_VFIO_PART = re.compile(b"[" + re.escape(bytes([SectionType.SECTION_PART, SectionType.SECTION_END]))
                               + b"](?=[\x00-\xff]{4}" + re.escape(_FLAG_PREFIX)
                               + b"[" + _FLAG_LAST[0] + b"-" + _FLAG_LAST[1] + b"])")
_GUARD_TAIL = 1 + 4 + 1 + 255 + 8


class BodyGuard:
    """Searches a scan-delimited body for a hidden VFIO section (see the theory above).

    Fed the body piece by piece; keeps a short tail so a pattern split between pieces
    is still seen."""

    def __init__(self, info: SectionInfo, table: SectionTable) -> None:
        self._info = info
        self._vfio_ids = set(table.vfio_ids())
        self._tail = b""

    def feed(self, piece: memoryview, offset: int) -> None:
        buf = self._tail + bytes(piece)
        base = offset - len(self._tail)
        # every hit in what we hold, then the earliest one: which refusal is reported
        # must not depend on how the body was cut into pieces (found by fuzzing)
        hits: list[tuple[int, str]] = []
        for m in _HIDDEN_VFIO_HEADER.finditer(buf):
            end = m.end()
            for n in range(4, min(255, end - 6) + 1):
                start = end - n
                if buf[start - 1] == n and buf[start - 6] in (SectionType.SECTION_START, SectionType.SECTION_FULL):
                    name = buf[start:end]
                    if printable_ascii(name) and (name == b"vfio" or name.endswith(b"/vfio")):
                        hits.append((base + start - 6, f"a VFIO section header ({name.decode()!r})"))
        for m in _HIDDEN_VFIO_PART.finditer(buf):
            (sid,) = BE32.unpack_from(buf, m.start() + 1)
            if sid in self._vfio_ids:
                hits.append((base + m.start(), f"a PART/END record of VFIO section id {sid}"))
        if hits:
            offset, what = min(hits)
            self._refuse(what, offset)
        self._tail = buf[-_GUARD_TAIL:]

    def _refuse(self, what: str, offset: int) -> None:
        raise StreamError(f"{what} is hidden inside the body of {self._info.label}; the section "
                          f"boundaries are ambiguous, refusing", offset=offset, section=self._info.label)


def scan_to_footer(inp: Input, info: SectionInfo, table: SectionTable, terminator: bytes,
                   make: Callable[[int, memoryview], StreamEvent],
                   limit: int = MAX_FULL_SECTION) -> Generator[Step, None, None]:
    """Hand out an unframed body as events built by *make* until ``terminator + footer``
    followed by a well-formed record; the terminator and footer are left unconsumed."""
    guard = BodyGuard(info, table)
    start = inp.offset

    def guarded(off: int, view: memoryview) -> StreamEvent:  # every body byte passes the guard
        guard.feed(view, off)
        return make(off, view)

    pattern_bytes = terminator + encode_footer(info.section_id)
    pattern = re.compile(re.escape(pattern_bytes))
    plen = len(pattern_bytes)
    total = 0
    while True:
        idx = inp.search_in_chunk(pattern)
        if idx < 0:
            # no candidate wholly inside this chunk: hand out what cannot start one
            n = inp.chunk_remaining() - (plen - 1)
            if n <= 0:
                if inp.available() >= plen:
                    if inp.peek(plen) == pattern_bytes:
                        idx = 0
                    else:
                        n = 1  # step over one byte at a chunk edge
                elif inp.eof:
                    raise StreamError("stream ends inside a section body (no footer)",
                                      offset=inp.offset, section=info.label)
                else:
                    yield NEED_DATA
                    continue
            if idx < 0:
                total += n
                _check_limit(total, limit, start, info)
                off = inp.offset
                view = inp.take(n) if n == 1 else inp.take_upto(n)
                assert view is not None
                yield guarded(off, view)
                continue
        if idx > 0:
            total += idx
            _check_limit(total, limit, start, info)
            off = inp.offset
            view = inp.take_upto(idx)
            assert view is not None and len(view) == idx
            yield guarded(off, view)
            continue
        # a candidate starts here: judge the record after it
        while True:
            look = inp.peek_upto(plen + _LOOKAHEAD)
            at_end = inp.eof and len(look) == inp.available()
            verdict = next_record_ok(look[plen:], at_end, table)
            if verdict is not None or at_end:
                break
            yield NEED_DATA
        if verdict:
            return
        total += 1
        _check_limit(total, limit, start, info)
        off = inp.offset
        view = inp.take(1)
        assert view is not None
        yield guarded(off, view)


def _check_limit(total: int, limit: int, start: int, info: SectionInfo) -> None:
    """*total* body bytes from offset *start*: past *limit*, refuse at the first byte over it
    (the same offset however the input was cut into chunks)."""
    if total > limit:
        raise StreamError(f"section body longer than {limit} bytes without a footer",
                          offset=start + limit, section=info.label)


_OUR_BODY = re.compile(rb"[\n\x20-\x7e]*")


def read_our_record(inp: Input, info: SectionInfo, table: SectionTable) -> Generator[Step, None, None]:
    """One of our own records: printable ASCII lines up to its footer.

    Being ASCII, the body cannot contain its footer (``7e`` + an id with 0xff bytes) nor
    any binary QEMU record, so its end is exact and nothing can hide in it; it takes no
    part in the section-order rules (our proxies insert it anywhere between records)."""
    sid = info.section_id
    yield from scan_to_footer(inp, info, table, b"", lambda o, v: _our_piece(o, v, sid, info),
                              limit=MAX_OUR_RECORD)


def _our_piece(off: int, view: memoryview, sid: int, info: SectionInfo) -> Opaque:
    m = _OUR_BODY.match(view)  # always matches (maybe empty): it ends at the first bad byte
    assert m is not None
    if m.end() != len(view):
        raise StreamError("a libvirt-mdev record with non-ASCII bytes", offset=off + m.end(), section=info.label)
    return Opaque(off, view, sid, SectionKind.OURS)
