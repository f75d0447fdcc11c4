"""VFIO device sections (hw/vfio/migration.c), parsed the way QEMU's loader reads them.

Theory of operation
-------------------
``vfio_load_state`` reads be64 markers in a loop, whatever the record type:

* ``DEV_DATA_STATE``: ``be64 size`` then *size* bytes of opaque device state, handed
  to the vendor driver.  This is the dangerous part; we hand it out as
  VfioBlockStart / VfioBlockData... / VfioBlockEnd so the filter can store, hash and
  check every byte.  Blocks are streamed, never joined in memory.
* ``DEV_CONFIG_STATE``: the VFIOPCIDevice vmstate (PCI config space, MSI-X), which is
  not self-delimiting; it ends at ``END_OF_STATE 7e <be32 id>`` followed by a
  well-formed record (see sections.scan_to_footer).  QEMU 6.0+ sends it only in the
  FULL section; QEMU 5.2 sent it inside END, which we refuse.
* ``DEV_SETUP_STATE``: must be followed by ``END_OF_STATE`` (the START payload).
* ``DEV_INIT_DATA_SENT`` (v2, switchover-ack) or ``END_OF_STATE``: end of this payload.
* ``DEV_CONFIG_LOAD_READY`` or a FULL section with no config: QEMU 10 multifd
  device-state transfer, where the state travels on side channels we cannot see:
  refused.

Both framings are one grammar here.  "v1" (QEMU 5.2–7.2) sends a data block in every
PART (size 0 once the device has nothing pending); "v2" (QEMU ≥ 8.0) sends PART
sections only for pre-copy devices and never a size-0 block.  :class:`FramingGuess`
records the evidence so ``inspect`` can say which one a stream used.
"""
from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass

from ..errors import StreamError, UnsupportedStream
from ._util import need, pieces
from .buffer import Input
from .events import Step, VfioBlockData, VfioBlockEnd, VfioBlockStart, VfioConfigData, VfioMarker
from .scan import scan_to_footer
from .sections import SectionInfo, SectionTable
from .wire import BE64, MAX_VFIO_BLOCK, SectionType, VfioFlag, VfioFraming

_END = BE64.pack(VfioFlag.END_OF_STATE)
_KNOWN = {int(f): f for f in VfioFlag}


@dataclass
class FramingGuess:
    """Evidence for the VFIO migration protocol version of one device."""

    v1_evidence: bool = False  # a size-0 data block in a PART (only v1 writes those)
    v2_evidence: bool = False  # INIT_DATA_SENT (only v2 has switchover-ack)

    def framing(self, machine_type: str = "") -> VfioFraming | None:
        """The framing the evidence shows, or ``None`` when it does not decide."""
        if self.v2_evidence and not self.v1_evidence:
            return VfioFraming.V2
        if self.v1_evidence and not self.v2_evidence:
            return VfioFraming.V1
        # no decisive evidence: QEMU ≤ 7.2 only spoke v1, ≥ 8.0 only v2
        ver = _machine_version(machine_type)
        if ver is not None:
            return VfioFraming.V1 if ver < (8, 0) else VfioFraming.V2
        return None

    def name(self, machine_type: str = "") -> str:
        """The framing's name, ``"unknown"`` when the evidence does not decide (for reports)."""
        return self.framing(machine_type) or "unknown"


def _machine_version(machine_type: str) -> tuple[int, int] | None:
    tail = machine_type.rsplit("-", 1)[-1]
    try:
        major, minor = tail.split(".")[:2]
        return int(major), int(minor)
    except ValueError:
        return None


def read_vfio(inp: Input, info: SectionInfo, table: SectionTable, rtype: SectionType,
              framing: FramingGuess) -> Generator[Step, None, None]:
    """One VFIO payload (the footer is left for the caller)."""
    sec = info.label
    sid = info.section_id
    saw_config = False
    while True:
        off = inp.offset
        raw = yield from need(inp, 8, "VFIO marker", sec)
        (value,) = BE64.unpack(raw)
        flag = _KNOWN.get(value)
        if flag is None:
            raise StreamError(f"unknown VFIO tag 0x{value:016x}", offset=off, section=sec)
        if flag == VfioFlag.DEV_DATA_STATE:
            if rtype == SectionType.SECTION_FULL:
                # QEMU's save_state never writes device data here; a loader would accept it
                raise StreamError("VFIO device data inside the config (FULL) section", offset=off,
                                  section=sec)
            yield from _data_block(inp, info, off, raw, rtype, framing)
            continue
        yield VfioMarker(off, raw, sid, flag)
        if flag == VfioFlag.END_OF_STATE:
            if rtype == SectionType.SECTION_FULL and not saw_config:
                raise UnsupportedStream(
                    "VFIO device state travels on multifd channels (QEMU 10 device-state transfer); "
                    "it cannot be checked on the main channel — migrate without --parallel",
                    offset=off, section=sec)
            return
        if flag == VfioFlag.DEV_INIT_DATA_SENT:
            framing.v2_evidence = True
            return
        if flag == VfioFlag.DEV_CONFIG_LOAD_READY:
            raise UnsupportedStream(
                "VFIO config is loaded after multifd device state (QEMU 10 multifd transfer); "
                "the device state cannot be checked on the main channel", offset=off, section=sec)
        if flag == VfioFlag.DEV_SETUP_STATE:
            eoff = inp.offset
            end = yield from need(inp, 8, "VFIO END_OF_STATE after SETUP", sec)
            if bytes(end) != _END:
                raise StreamError("VFIO SETUP_STATE not followed by END_OF_STATE", offset=eoff, section=sec)
            yield VfioMarker(eoff, end, sid, VfioFlag.END_OF_STATE)
            return
        if flag == VfioFlag.DEV_CONFIG_STATE:
            if rtype != SectionType.SECTION_FULL:
                raise UnsupportedStream("VFIO config state inside an iterative section (QEMU 5.2 "
                                        "framing) is not supported", offset=off, section=sec)
            saw_config = True
            yield from scan_to_footer(inp, info, table, _END,
                                      lambda o, v: VfioConfigData(o, v, sid))
            eoff = inp.offset
            end = yield from need(inp, 8, "VFIO END_OF_STATE after config", sec)
            yield VfioMarker(eoff, end, sid, VfioFlag.END_OF_STATE)
            return


def _data_block(inp: Input, info: SectionInfo, off: int, marker: memoryview,
                rtype: SectionType, framing: FramingGuess) -> Generator[Step, None, None]:
    sec = info.label
    sid = info.section_id
    sz = yield from need(inp, 8, "VFIO data block size", sec)
    (size,) = BE64.unpack(sz)
    if size > MAX_VFIO_BLOCK:
        raise StreamError(f"VFIO data block claims {size} bytes (limit {MAX_VFIO_BLOCK})",
                          offset=off, section=sec)
    if size == 0 and rtype == SectionType.SECTION_PART:
        framing.v1_evidence = True
    yield VfioBlockStart(off, memoryview(bytes(marker) + bytes(sz)), sid, size)
    yield from pieces(inp, size, "a VFIO data block", sec, lambda o, v: VfioBlockData(o, v, sid))
    yield VfioBlockEnd(inp.offset, b"", sid, size)
