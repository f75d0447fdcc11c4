"""The ``ram`` section payload (migration/ram.c), parsed exactly and fast.

Theory of operation
-------------------
A RAM payload is a sequence of records, each starting with ``be64 v`` where the low
TARGET_PAGE_BITS of ``v`` are ``RAM_SAVE_FLAG_*`` and the rest is the page offset in
its RAMBlock.  It ends with a record whose flags are EOS.  Nearly every record of a
real stream is a page of the same block as the previous one (CONTINUE), either a zero
page (9 bytes) or a full page (8 + page size bytes).  Those two shapes are matched in
runs by precompiled regular expressions (C speed, no per-record Python work, no copies),
so multi-GB streams parse at memory speed.  Everything else (a block switch with its
idstr, MEM_SIZE, EOS, XBZRLE, zlib pages, a record split across two chunks) goes
through the exact slow path below, one record at a time.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Generator
from dataclasses import dataclass, field
from re import Pattern

from ..errors import StreamError, UnsupportedStream
from ._util import need, pieces
from .buffer import Input
from .events import Opaque, RamEos, RamMemSize, RamRecords, Step
from .sections import SectionInfo
from .wire import (
    BE16,
    BE32,
    BE64,
    MAPPED_RAM_FILE_OFFSET_ALIGNMENT,
    MAPPED_RAM_HDR_VERSION,
    MAPPED_RAM_HEADER,
    MAX_MAPPED_RAM_REGION,
    MAX_RAM_BLOCKS,
    XBZRLE_ENCODING_FLAG,
    RamFlag,
)

_TYPE_FLAGS = {int(RamFlag.ZERO), int(RamFlag.PAGE), int(RamFlag.XBZRLE), int(RamFlag.COMPRESS_PAGE)}
# plain ints for the per-record path (IntFlag arithmetic builds enum members: slow)
_CONTINUE = int(RamFlag.CONTINUE)
_EOS = int(RamFlag.EOS)
_MEM_SIZE = int(RamFlag.MEM_SIZE)
_MULTIFD_FLUSH = int(RamFlag.MULTIFD_FLUSH)
_HOOK = int(RamFlag.HOOK)
_ZERO = int(RamFlag.ZERO)
_PAGE = int(RamFlag.PAGE)
_XBZRLE = int(RamFlag.XBZRLE)


@dataclass
class RamContext:
    """What the RAM reader must know from earlier in the stream."""

    page_bits: int = 12
    ignore_shared: bool = False
    blocks: dict[str, int] = field(default_factory=dict)
    #: the mapped-ram capability: pages live at fixed file offsets, not in records
    mapped_ram: bool = False
    #: RAMBlock of the previous page record (for CONTINUE)
    last_block: str | None = None

    @property
    def page_size(self) -> int:
        return 1 << self.page_bits


def _header_class(page_bits: int, flags: int) -> bytes:
    """Regex for a be64 record header whose low *page_bits* bits equal *flags*."""
    out = []
    for byte_index in range(8):
        lo = (7 - byte_index) * 8  # bit number of this byte's lowest bit
        mask = 0
        for bit in range(8):
            if lo + bit < page_bits:
                mask |= 1 << bit
        want = (flags >> lo) & mask
        if mask == 0:
            out.append(b".")
            continue
        allowed = [x for x in range(256) if x & mask == want]
        out.append(b"[" + b"".join(re.escape(bytes([x])) for x in allowed) + b"]")
    return b"".join(out)


@functools.lru_cache(maxsize=8)
def _run_patterns(page_bits: int) -> tuple[Pattern[bytes], Pattern[bytes]]:
    """(zero-page run, full-page run) for CONTINUE records of this page size."""
    zero = _header_class(page_bits, RamFlag.ZERO | RamFlag.CONTINUE) + b"."
    page = _header_class(page_bits, RamFlag.PAGE | RamFlag.CONTINUE) + b".{%d}" % (1 << page_bits)
    return (re.compile(b"(?:" + zero + b")++", re.S), re.compile(b"(?:" + page + b")++", re.S))


def read_ram(inp: Input, info: SectionInfo, ctx: RamContext,
             setup: bool) -> Generator[Step, None, None]:
    """Records until EOS.  *setup* is true for the START payload (MEM_SIZE allowed)."""
    sec = info.label
    sid = info.section_id
    zero_run, page_run = _run_patterns(ctx.page_bits)
    zero_len = 9
    page_len = 8 + ctx.page_size
    mask = ctx.page_size - 1
    while True:
        # fast path: runs of CONTINUE zero/full pages inside the current chunk
        seg, start_pos = inp.seg, inp.pos
        if ctx.last_block is not None and start_pos < len(seg):
            zeros = pages = 0
            while inp.seg is seg and inp.pos < len(seg):
                v = inp.match(zero_run)
                if v is not None:
                    zeros += len(v) // zero_len
                    continue
                v = inp.match(page_run)
                if v is not None:
                    pages += len(v) // page_len
                    continue
                break
            if zeros or pages:
                yield RamRecords(inp.base + start_pos, seg[start_pos:inp.pos], sid,
                                 zeros + pages, pages, zeros)
        # slow path: exactly one record
        off = inp.offset
        hdr = yield from need(inp, 8, "RAM record header", sec)
        (v,) = BE64.unpack(hdr)
        flags, addr = v & mask, v & ~mask
        kind = flags & ~_CONTINUE
        if kind == _EOS:
            if flags != _EOS:
                raise StreamError(f"RAM EOS with extra flags 0x{flags:x}", offset=off, section=sec)
            yield RamEos(off, hdr, sid)
            return
        if kind == _MEM_SIZE:
            yield from _mem_size(inp, info, ctx, off, hdr, addr, setup)
            continue
        if kind == _MULTIFD_FLUSH:
            yield RamRecords(off, hdr, sid, 1, 0, 0)
            continue
        if kind == _HOOK:
            raise UnsupportedStream("RAM hook record (RDMA migration) in a byte stream", offset=off, section=sec)
        if kind not in _TYPE_FLAGS:
            raise StreamError(f"unknown RAM record flags 0x{flags:x}", offset=off, section=sec)
        yield from _page_record(inp, info, ctx, off, hdr, flags, kind)


def _page_record(inp: Input, info: SectionInfo, ctx: RamContext, off: int, hdr: memoryview,
                 flags: int, kind: int) -> Generator[Step, None, None]:
    sec = info.label
    parts = [bytes(hdr)]
    if flags & _CONTINUE:
        if ctx.last_block is None:
            raise StreamError("RAM page CONTINUEs with no previous block", offset=off, section=sec)
    else:
        n = yield from need(inp, 1, "RAMBlock name length", sec)
        name = yield from need(inp, n[0], "RAMBlock name", sec)
        block = bytes(name).decode("latin-1")
        if block not in ctx.blocks:
            raise StreamError(f"page for unknown RAMBlock {block!r}", offset=off, section=sec)
        ctx.last_block = block
        parts += [bytes(n), bytes(name)]
    body = 0
    if kind == _ZERO:
        parts.append(bytes((yield from need(inp, 1, "zero-page fill byte", sec))))
    elif kind == _PAGE:
        body = ctx.page_size
    elif kind == _XBZRLE:
        x = yield from need(inp, 3, "XBZRLE header", sec)
        if x[0] != XBZRLE_ENCODING_FLAG:
            raise StreamError(f"XBZRLE encoding flag 0x{x[0]:x}", offset=off, section=sec)
        (body,) = BE16.unpack(x[1:3])
        if body > ctx.page_size:
            raise StreamError(f"XBZRLE page of {body} bytes", offset=off, section=sec)
        parts.append(bytes(x))
    else:  # COMPRESS_PAGE
        x = yield from need(inp, 4, "compressed page length", sec)
        (body,) = BE32.unpack(x)
        if body > 2 * ctx.page_size + 64:
            raise StreamError(f"compressed page of {body} bytes", offset=off, section=sec)
        parts.append(bytes(x))
    is_page = kind != _ZERO
    yield RamRecords(off, memoryview(b"".join(parts)), info.section_id, 1,
                     int(is_page), int(not is_page))
    sid = info.section_id
    yield from pieces(inp, body, "a RAM page", sec, lambda o, v: RamRecords(o, v, sid, 0, 0, 0))


def _mem_size(inp: Input, info: SectionInfo, ctx: RamContext, off: int, hdr: memoryview,
              total: int, setup: bool) -> Generator[Step, None, None]:
    """The RAMBlock list: (idstr, used_length[, mr_addr][, mapped-ram header]) until the
    lengths add up.  Without mapped-ram it is one RamMemSize event; with it, each block's
    entry is followed in the file by that block's bitmap and pages (skipped exactly as
    QEMU's loader seeks over them), so the entries go out as they are read and a final
    empty RamMemSize carries the list."""
    sec = info.label
    if not setup:
        raise StreamError("RAM MEM_SIZE record outside the setup section", offset=off, section=sec)
    parts = [bytes(hdr)]
    part_off = off
    blocks: list[tuple[str, int]] = []
    seen = 0
    while seen < total:
        if len(blocks) >= MAX_RAM_BLOCKS:
            raise StreamError(f"more than {MAX_RAM_BLOCKS} RAMBlocks", offset=inp.offset, section=sec)
        n = yield from need(inp, 1, "RAMBlock name length", sec)
        name = yield from need(inp, n[0], "RAMBlock name", sec)
        ln = yield from need(inp, 8, "RAMBlock length", sec)
        parts += [bytes(n), bytes(name), bytes(ln)]
        if ctx.ignore_shared:
            parts.append(bytes((yield from need(inp, 8, "RAMBlock mr_addr", sec))))
        (used,) = BE64.unpack(ln)
        block = bytes(name).decode("latin-1")
        if used == 0 or block in ctx.blocks:
            raise StreamError(f"bad RAMBlock entry {block!r} (length {used})", offset=inp.offset, section=sec)
        ctx.blocks[block] = used
        blocks.append((block, used))
        seen += used
        if ctx.mapped_ram:
            moff = inp.offset
            mh = bytes((yield from need(inp, MAPPED_RAM_HEADER.size, "mapped-ram header", sec)))
            parts.append(mh)
            yield RamRecords(part_off, memoryview(b"".join(parts)), info.section_id, 0, 0, 0)
            parts = []
            region = _mapped_ram_region(ctx, block, used, mh, moff, sec)
            yield from pieces(inp, region, f"the mapped-ram pages of RAMBlock {block!r}", sec,
                              lambda o, v: Opaque(o, v, info.section_id, "mapped-ram"))
            part_off = inp.offset
    if seen != total:
        raise StreamError(f"RAMBlock lengths add up to {seen}, MEM_SIZE says {total}", offset=off, section=sec)
    yield RamMemSize(part_off, memoryview(b"".join(parts)), info.section_id, total, tuple(blocks))


def _mapped_ram_region(ctx: RamContext, block: str, used: int, mh: bytes, moff: int, sec: str) -> int:
    """Bytes from the end of a mapped-ram header to the end of its block's pages.

    Only the layout QEMU writes is accepted (bitmap right after the header, pages at
    the next 1 MiB boundary after the bitmap): the loader seeks to
    ``pages_offset + used_length``, so any other offsets would make it read its next
    record somewhere we did not."""
    version, page_size, bitmap_offset, pages_offset = MAPPED_RAM_HEADER.unpack(mh)
    here = moff + MAPPED_RAM_HEADER.size
    if version != MAPPED_RAM_HDR_VERSION or page_size != ctx.page_size:
        raise StreamError(f"mapped-ram header version {version}, page size {page_size} "
                          f"(expected {MAPPED_RAM_HDR_VERSION}, {ctx.page_size})", offset=moff, section=sec)
    if used % page_size:
        raise StreamError(f"RAMBlock {block!r} length {used} is not a whole number of pages", offset=moff,
                          section=sec)
    bitmap_len = -(-(used // page_size) // 64) * 8
    align = MAPPED_RAM_FILE_OFFSET_ALIGNMENT
    want_pages = -(-(here + bitmap_len) // align) * align
    if bitmap_offset != here or pages_offset != want_pages:
        raise StreamError(f"mapped-ram offsets of RAMBlock {block!r} (bitmap {bitmap_offset}, pages "
                          f"{pages_offset}) are not where QEMU puts them ({here}, {want_pages})",
                          offset=moff, section=sec)
    region = int(pages_offset) + used - here
    if region > MAX_MAPPED_RAM_REGION:
        raise StreamError(f"mapped-ram region of {region} bytes (limit {MAX_MAPPED_RAM_REGION})",
                          offset=moff, section=sec)
    return region
