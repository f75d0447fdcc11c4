"""Early-setup FULL sections (QEMU >= 8.0), parsed field by field.

Theory of operation
-------------------
A vmstate with ``early_setup`` is saved during the setup phase, as a FULL section
among the iterative START sections (QEMU's ``qemu_savevm_state_setup``), and not again
in the non-iterable phase.  A FULL body carries no length, so our general rule for
FULL bodies (sections.scan_to_footer plus the phase rule "no FULL while an iterative
section is open") cannot delimit it there: a crafted body could end early at a fake
footer while QEMU goes on reading, and the bytes in between would be records we never
looked at.  So early-setup sections are accepted only for vmstates whose layout we know
completely and read exactly like QEMU's loader does, leaving no opaque byte whose
meaning depends on guessing.  Every other early-setup section keeps the precise refusal
(sections.SectionTable).

virtio-mem-device-early (hw/virtio/virtio-mem.c, version 1, no subsections)::

    be64 addr  be64 region_size  be64 block_size  be32 node   (sanity checks, a tmp struct)
    be64 size
    bitmap: one bit per block, region_size / block_size bits, as be64 words

and the section footer immediately after.  The bitmap length comes from the body
itself.  QEMU's loader sizes the bitmap from its own device, but it first runs the
sanity-check post_load, which fails the migration unless the stream's region_size and
block_size equal the destination device's; so whenever QEMU reads the bitmap at all,
it reads exactly as many bytes as we do.  After the bitmap QEMU peeks for a subsection
byte (0x05) and then checks the footer; we require the footer at once, so both parsers
end the body at the same byte.
"""
from __future__ import annotations

from collections.abc import Generator

from ..errors import StreamError
from ._util import need, pieces
from .buffer import Input
from .events import Opaque, SectionKind, Step
from .sections import SectionInfo
from .wire import MAX_VIRTIO_MEM_BITMAP, VIRTIO_MEM_EARLY_FIXED, VIRTIO_MEM_EARLY_VERSION

KIND_WHAT = SectionKind.VIRTIO_MEM_EARLY


def virtio_mem_bitmap_len(region_size: int, block_size: int) -> int:
    """Bytes of the block bitmap QEMU writes (be64 words, BITS_TO_U64S)."""
    blocks = region_size // block_size
    return -(-blocks // 64) * 8


def read_virtio_mem_early(inp: Input, info: SectionInfo) -> Generator[Step, None, None]:
    """The whole body of one virtio-mem-device-early section (the footer is left)."""
    sec = info.label
    sid = info.section_id
    if info.version_id != VIRTIO_MEM_EARLY_VERSION:
        raise StreamError(f"virtio-mem early-setup section version {info.version_id} "
                          f"(QEMU accepts only {VIRTIO_MEM_EARLY_VERSION})", offset=inp.offset, section=sec)
    off = inp.offset
    raw = yield from need(inp, VIRTIO_MEM_EARLY_FIXED.size, "virtio-mem early-setup fields", sec)
    _addr, region_size, block_size, _node, _size = VIRTIO_MEM_EARLY_FIXED.unpack(raw)
    if block_size == 0 or block_size & (block_size - 1) or region_size == 0 or region_size % block_size:
        raise StreamError(f"virtio-mem early-setup region size {region_size:#x} / block size "
                          f"{block_size:#x} is not a whole number of power-of-two blocks", offset=off, section=sec)
    nbytes = virtio_mem_bitmap_len(region_size, block_size)
    if nbytes > MAX_VIRTIO_MEM_BITMAP:
        raise StreamError(f"virtio-mem bitmap of {nbytes} bytes (limit {MAX_VIRTIO_MEM_BITMAP})",
                          offset=off, section=sec)
    yield Opaque(off, raw, sid, KIND_WHAT)
    yield from pieces(inp, nbytes, "the virtio-mem bitmap", sec, lambda o, v: Opaque(o, v, sid, KIND_WHAT))
