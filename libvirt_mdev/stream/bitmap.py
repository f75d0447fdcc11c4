"""The ``dirty-bitmap`` section payload (migration/block-dirty-bitmap.c), parsed exactly.

Chunks of flags, optional node/bitmap names and a body chosen by the flags, until a
chunk carries EOS.  Emitted as opaque records: we only delimit them.
"""
from __future__ import annotations

from collections.abc import Generator

from ..errors import StreamError
from ._util import need, pieces
from .buffer import Input
from .events import Opaque, SectionKind, Step
from .sections import SectionInfo
from .wire import BE16, BE64, MAX_DIRTY_BITMAP_BUF, DirtyBitmapFlag


def read_dirty_bitmap(inp: Input, info: SectionInfo) -> Generator[Step, None, None]:
    """Chunks until one carries EOS.  Emitted as opaque records (we never look inside)."""
    sec = info.label
    sid = info.section_id

    def make_piece(off: int, view: memoryview) -> Opaque:
        return Opaque(off, view, sid, SectionKind.DIRTY_BITMAP)

    while True:
        start = inp.offset
        parts: list[bytes] = []
        b = yield from need(inp, 1, "dirty-bitmap flags", sec)
        parts.append(bytes(b))
        flags = b[0]
        if flags & DirtyBitmapFlag.EXTRA_FLAGS:
            b = yield from need(inp, 1, "dirty-bitmap flags", sec)
            parts.append(bytes(b))
            flags = (flags << 8) | b[0]
            if flags & DirtyBitmapFlag.EXTRA_FLAGS:
                b = yield from need(inp, 2, "dirty-bitmap flags", sec)
                parts.append(bytes(b))
                flags = (flags << 16) | BE16.unpack(b)[0]
        for name_flag in (DirtyBitmapFlag.DEVICE_NAME, DirtyBitmapFlag.BITMAP_NAME):
            if flags & name_flag:
                n = yield from need(inp, 1, "dirty-bitmap name", sec)
                s = yield from need(inp, n[0], "dirty-bitmap name", sec)
                parts += [bytes(n), bytes(s)]
        buf_len = 0
        if flags & DirtyBitmapFlag.START:
            parts.append(bytes((yield from need(inp, 5, "dirty-bitmap start", sec))))
        elif flags & DirtyBitmapFlag.BITS:
            hdr = yield from need(inp, 12, "dirty-bitmap bits", sec)
            parts.append(bytes(hdr))
            if not flags & DirtyBitmapFlag.ZEROES:
                sz = yield from need(inp, 8, "dirty-bitmap buffer size", sec)
                parts.append(bytes(sz))
                (buf_len,) = BE64.unpack(sz)
                if buf_len > MAX_DIRTY_BITMAP_BUF:
                    raise StreamError(f"dirty-bitmap buffer of {buf_len} bytes", offset=inp.offset, section=sec)
        elif not flags & (DirtyBitmapFlag.COMPLETE | DirtyBitmapFlag.EOS):
            raise StreamError(f"dirty-bitmap chunk with unknown flags 0x{flags:x}", offset=start, section=sec)
        yield Opaque(start, memoryview(b"".join(parts)), info.section_id, SectionKind.DIRTY_BITMAP)
        yield from pieces(inp, buf_len, "a dirty-bitmap buffer", sec, make_piece)
        if flags & DirtyBitmapFlag.EOS:
            return
