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
* A FULL section with no config (``END_OF_STATE`` alone): QEMU 10 multifd
  device-state transfer, where the device's stop-copy state and config travel on the
  multifd side channels (:func:`read_state_packet`, ``docs/multifd.md``).  Accepted in a
  live stream only: a proxy either filters every side channel or refuses them all, so
  the state is still seen.  A save image cannot carry multifd device state (QEMU has no
  device-state transfer with mapped-ram), so there the shape means state that is
  missing: refused.
* ``DEV_CONFIG_LOAD_READY`` (QEMU's "load config after the iterables", not on x86):
  refused.

Both framings are one grammar here.  "v1" (QEMU 5.2–7.2) sends a data block in every
PART (size 0 once the device has nothing pending); "v2" (QEMU ≥ 8.0) sends PART
sections only for pre-copy devices and never a size-0 block.  :class:`FramingGuess`
records the evidence so ``inspect`` can say which one a stream used.
"""
from __future__ import annotations

import struct
from collections.abc import Callable, Generator
from dataclasses import dataclass

from ..errors import StreamError, UnsupportedStream
from ._util import need, pieces
from .buffer import Input
from .events import Bytes, Step, VfioBlockData, VfioBlockEnd, VfioBlockStart, VfioConfigData, VfioMarker
from .scan import scan_to_footer
from .sections import SectionInfo, SectionTable
from .wire import (
    BE64,
    MAX_VFIO_BLOCK,
    VFIO_STATE_PACKET,
    VFIO_STATE_PACKET_BAD_IDX,
    VFIO_STATE_PACKET_VERSION,
    SectionType,
    VfioFlag,
    VfioFraming,
    VfioPacketFlag,
)

_END = BE64.pack(VfioFlag.END_OF_STATE)
_KNOWN = {int(f): f for f in VfioFlag}


@dataclass
class FramingGuess:
    """Evidence for the VFIO migration protocol version of one device."""

    v1_evidence: bool = False  # a size-0 data block in a PART (only v1 writes those)
    v2_evidence: bool = False  # INIT_DATA_SENT (only v2 has switchover-ack)
    #: the FULL section had no config: stop-copy state and config travel on multifd channels
    multifd_transfer: bool = False

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
              framing: FramingGuess, *, live: bool = True) -> Generator[Step, None, None]:
    """One VFIO payload (the footer is left for the caller).  *live*: a migration stream
    (not a save image), which may send a device's state on multifd channels."""
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
                if not live:
                    raise UnsupportedStream(
                        "a VFIO device's config section is empty, as with multifd device-state transfer "
                        "(QEMU 10), which a save image cannot carry: its state is missing",
                        offset=off, section=sec)
                framing.multifd_transfer = framing.v2_evidence = True  # only QEMU >= 10.0 does this
            return
        if flag == VfioFlag.DEV_INIT_DATA_SENT:
            framing.v2_evidence = True
            return
        if flag == VfioFlag.DEV_CONFIG_LOAD_READY:
            raise UnsupportedStream(
                "VFIO config is loaded after the iterables (DEV_CONFIG_LOAD_READY, QEMU's multifd "
                "transfer on non-x86 hosts): not supported", offset=off, section=sec)
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


# --------------------------------------------------------------------------- multifd packets
@dataclass(frozen=True, slots=True)
class VfioStatePacket:
    """The VFIODeviceStatePacket header of one multifd device-state buffer."""

    #: the buffer's place in the device's state (QEMU's loader writes them in idx order)
    idx: int
    #: the device's config (its last buffer), not vendor-driver state
    config: bool
    #: bytes of state (or config) after the 12-byte header
    data_len: int


_CONFIG_HEAD = BE64.pack(VfioFlag.DEV_CONFIG_STATE)


def read_state_packet(buf: Bytes, where: str) -> VfioStatePacket:
    """Check one whole multifd device-state buffer the way QEMU's VFIO loader
    (``vfio_multifd_load_state_buffer``) and its config loader read it, plus what QEMU's
    sender always writes: a non-empty data buffer, a config buffer framed as
    ``DEV_CONFIG_STATE <vmstate> END_OF_STATE``, no unknown flag.  *where* names the
    device in errors."""
    n = len(buf)
    if n < VFIO_STATE_PACKET.size:
        raise StreamError(f"VFIO device-state packet of {n} bytes, shorter than its {VFIO_STATE_PACKET.size}-byte "
                          f"header", section=where)
    version, idx, flags = VFIO_STATE_PACKET.unpack_from(buf)
    if version != VFIO_STATE_PACKET_VERSION:
        raise UnsupportedStream(f"VFIO device-state packet version {version} (QEMU's loader reads version "
                                f"{VFIO_STATE_PACKET_VERSION})", section=where)
    if idx == VFIO_STATE_PACKET_BAD_IDX:
        raise StreamError(f"VFIO device-state packet index {idx:#x} is invalid", section=where)
    if flags & ~int(VfioPacketFlag.CONFIG_STATE):
        raise StreamError(f"VFIO device-state packet {idx} has unknown flags {flags:#x}", section=where)
    data_len = n - VFIO_STATE_PACKET.size
    config = bool(flags & VfioPacketFlag.CONFIG_STATE)
    if config:
        body = bytes(buf[VFIO_STATE_PACKET.size:])
        if data_len < 2 * BE64.size or not body.startswith(_CONFIG_HEAD) or not body.endswith(_END):
            raise StreamError(f"VFIO config packet {idx} is not DEV_CONFIG_STATE <config> END_OF_STATE",
                              section=where)
    elif data_len == 0:
        raise StreamError(f"VFIO device-state packet {idx} carries no data (QEMU never sends one)",
                          section=where)
    return VfioStatePacket(idx, config, data_len)


#: one stored multifd device-state packet's headers: the multifd packet header and device
#: header (stream/multifd.py: PACKET_HEADER + DEVICE_PACKET, 276 bytes), then the
#: VFIODeviceStatePacket (12 bytes)
_STORED_HEAD = struct.Struct(">III256sII")


def multifd_state_order(pread: Callable[[int, int], bytes], size: int) -> list[tuple[int, int]]:
    """Where the vendor-driver state of a stored multifd state lies, in the order QEMU's
    loader writes it: [(offset, length)] of each data buffer by index (the config packet,
    which is not the driver's, is left out).  *pread(offset, n)* reads the stored file.

    The file is what ``live/devstate.py`` stored: whole device-state packets in arrival
    order.  It was checked packet by packet when it was stored; this re-checks what the
    order depends on (each index once, the config packet last, nothing left over)."""
    head = _STORED_HEAD.size + VFIO_STATE_PACKET.size
    found: dict[int, tuple[int, int]] = {}
    last: int | None = None
    pos = 0
    while pos < size:
        raw = pread(pos, head)
        if len(raw) != head:
            raise StreamError("stored multifd state ends inside a packet header", offset=pos)
        _magic, _ver, _flags, _idstr, _inst, n = _STORED_HEAD.unpack_from(raw)
        version, idx, flags = VFIO_STATE_PACKET.unpack_from(raw, _STORED_HEAD.size)
        if n < VFIO_STATE_PACKET.size or version != VFIO_STATE_PACKET_VERSION or flags & ~1:
            raise StreamError("stored multifd state has a packet QEMU would not load", offset=pos)
        pkt = VfioStatePacket(idx, bool(flags & VfioPacketFlag.CONFIG_STATE), n - VFIO_STATE_PACKET.size)
        if pkt.idx in found or (last is not None and pkt.idx == last):
            raise StreamError(f"stored multifd state has packet {pkt.idx} twice", offset=pos)
        if pkt.config:
            last = pkt.idx
        else:
            found[pkt.idx] = (pos + head, pkt.data_len)
        pos += _STORED_HEAD.size + n
    if pos != size or last is None or len(found) != last or not all(i in found for i in range(last)):
        raise StreamError("stored multifd state is not one whole set of packets", offset=pos)
    return [found[i] for i in range(last)]
