"""Synthetic VFIO devices, framed exactly as QEMU frames them, and their injection into
real streams.  For tests, examples and benchmarks: this machine has no mdev hardware,
so device state is made up, but every byte around it is QEMU's framing
(hw/vfio/migration.c; libvirt_mdev/stream/vfio.py):

========  ===============================================================================
START     ``DEV_SETUP_STATE END_OF_STATE``
PART      v1 (QEMU ≤ 7.2): ``DEV_DATA_STATE be64 n <n bytes> END_OF_STATE`` (n = 0 once
          nothing is pending); v2 (≥ 8.1): an optional data block, then ``END_OF_STATE`` —
          or, with switchover-ack, ``DEV_INIT_DATA_SENT`` instead in the first PART
          (``vfio_save_iterate`` once the initial precopy bytes are out)
END       data blocks, then ``END_OF_STATE``
FULL      ``DEV_CONFIG_STATE <VFIOPCIDevice vmstate> END_OF_STATE``
========  ===============================================================================

With ``multifd=True`` (QEMU 10's vfio-pci ``x-migration-multifd-transfer``) the END and
FULL sections carry a bare ``END_OF_STATE`` and the stop-copy state and config travel
as multifd device-state packets (:meth:`SyntheticVfioDevice.multifd_packets`,
hw/vfio/migration-multifd.c's framing: ``be32 version 0, be32 idx, be32 flags`` then a
buffer of at most 1 MiB; the last packet has flag CONFIG_STATE and carries
``DEV_CONFIG_STATE <config> END_OF_STATE``).

:func:`inject` places them where QEMU would: the START after RAM's START (setup), one
PART after each RAM PART (iterations), the END after RAM's END (completion), the FULL
before EOF (the non-iterable phase); and it adds the device to the vmdesc JSON as QEMU
does for an old-style ``save_state`` handler.
"""
from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from libvirt_mdev.io.compress import ImageReader
from libvirt_mdev.io.drive import ByteSource, iter_events
from libvirt_mdev.stream.events import Eof, SectionFooter, SectionHeader, SectionKind, VMDescription
from libvirt_mdev.stream.wire import (
    VFIO_STATE_PACKET,
    VFIO_STATE_PACKET_VERSION,
    VFIO_VERSION,
    SectionType,
    VfioFlag,
    VfioPacketFlag,
)
from libvirt_mdev.stream.writer import (
    StreamWriter,
    encode_footer,
    encode_section_part,
    encode_section_start,
    encode_vfio_block,
    encode_vfio_block_header,
    encode_vfio_marker,
    encode_vmdesc,
)

#: QEMU ≥ 8.0's VFIO_MIG_DEFAULT_DATA_BUFFER_SIZE
V2_BLOCK = 1 << 20
#: synthetic state is made in blocks of this size, each seeded by (seed, index)
_STATE_BLOCK = 1 << 16


@dataclass
class SyntheticVfioDevice:
    """A made-up VFIO device: its identity, how much state it has, and where.

    The state is a deterministic pseudo-random byte string (seeded), optionally starting
    with *marker* so tests can prove the bytes left a stream.
    """

    idstr: str = "0000:00:05.0/vfio"
    instance_id: int = 0
    precopy_size: int = 0
    stopcopy_size: int = 64 << 10
    framing: str = "v1"
    block_size: int = V2_BLOCK
    config_size: int = 256 + 20
    seed: int = 1
    marker: bytes = b""
    #: v2 with the switchover-ack capability: the first PART ends with DEV_INIT_DATA_SENT
    switchover_ack: bool = False
    #: QEMU 10 multifd device-state transfer: stop-copy state and config on side channels
    multifd: bool = False
    section_id: int = -1
    _rng: random.Random = field(default=None, repr=False)  # type: ignore[assignment]
    _made: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        if self.framing not in ("v1", "v2"):
            raise ValueError(f"framing must be v1 or v2, not {self.framing!r}")
        if self.framing == "v2":
            self.block_size = min(self.block_size, V2_BLOCK)
        elif self.switchover_ack or self.multifd:
            raise ValueError("switchover-ack and multifd transfer exist only with v2 framing")
        self.reset()

    @property
    def state_bytes(self) -> int:
        return self.precopy_size + self.stopcopy_size

    def reset(self) -> None:
        self._made = 0
        self._init_sent = False

    def _block(self, index: int) -> bytes:
        """Block *index* of the pseudo-random state (independent of how it is read)."""
        if self._rng is None or getattr(self, "_block_index", None) != index:
            self._block_index = index
            self._block_data = random.Random(f"{self.seed}:{index}").randbytes(_STATE_BLOCK)
            self._rng = random.Random(0)  # marks the cache as filled
        return self._block_data

    def take_state(self, n: int) -> bytes:
        """The next *n* bytes of this device's state (same bytes however it is split)."""
        out = bytearray()
        pos = self._made
        end = pos + n
        while pos < end:
            if pos < len(self.marker):
                piece = self.marker[pos:min(end, len(self.marker))]
            else:
                block = self._block(pos // _STATE_BLOCK)
                k = pos % _STATE_BLOCK
                piece = block[k:k + (end - pos)]
            out += piece
            pos += len(piece)
        self._made = end
        return bytes(out)

    def expected_sha256(self) -> str:
        """SHA-256 of the whole state (regenerated, constant memory)."""
        twin = SyntheticVfioDevice(idstr=self.idstr, precopy_size=self.precopy_size,
                                   stopcopy_size=self.stopcopy_size, seed=self.seed, marker=self.marker)
        h = hashlib.sha256()
        left = self.state_bytes
        while left:
            n = min(left, 1 << 20)
            h.update(twin.take_state(n))
            left -= n
        return h.hexdigest()

    def config_bytes(self) -> bytes:
        """Stand-in for the VFIOPCIDevice vmstate: a PCI config space header + MSI-X."""
        rng = random.Random(self.seed ^ 0x5A5A)
        head = bytes.fromhex("de10") + bytes.fromhex("b21e")  # vendor/device ids (LE, as in config space)
        return (head + rng.randbytes(self.config_size))[: self.config_size]

    # -- records ---------------------------------------------------------------------------

    def start_record(self) -> bytes:
        return (encode_section_start(self.section_id, self.idstr, self.instance_id, VFIO_VERSION)
                + encode_vfio_marker(VfioFlag.DEV_SETUP_STATE) + encode_vfio_marker(VfioFlag.END_OF_STATE)
                + encode_footer(self.section_id))

    def part_record(self, n: int) -> bytes:
        body = b""
        if n or self.framing == "v1":
            body = encode_vfio_block(self.take_state(n))
        end = VfioFlag.END_OF_STATE
        if self.switchover_ack and not self._init_sent:
            end, self._init_sent = VfioFlag.DEV_INIT_DATA_SENT, True
        return (encode_section_part(self.section_id) + body
                + encode_vfio_marker(end) + encode_footer(self.section_id))

    def end_chunks(self, n: int) -> Iterator[bytes]:
        """The END record in pieces (its blocks may add up to hundreds of MiB).  With
        multifd transfer it is a bare END_OF_STATE: the state goes as packets."""
        yield encode_section_part(self.section_id, end=True)
        while n and not self.multifd:
            k = min(n, self.block_size)
            yield encode_vfio_block_header(k)
            yield self.take_state(k)
            n -= k
        yield encode_vfio_marker(VfioFlag.END_OF_STATE) + encode_footer(self.section_id)

    def full_record(self) -> bytes:
        head = encode_section_start(self.section_id, self.idstr, self.instance_id, VFIO_VERSION, full=True)
        if self.multifd:
            return head + encode_vfio_marker(VfioFlag.END_OF_STATE) + encode_footer(self.section_id)
        return (head + encode_vfio_marker(VfioFlag.DEV_CONFIG_STATE) + self.config_bytes()
                + encode_vfio_marker(VfioFlag.END_OF_STATE) + encode_footer(self.section_id))

    def config_buffer(self) -> bytes:
        """What QEMU's config packet carries after its packet header."""
        return (encode_vfio_marker(VfioFlag.DEV_CONFIG_STATE) + self.config_bytes()
                + encode_vfio_marker(VfioFlag.END_OF_STATE))

    def multifd_packets(self, n: int | None = None) -> list[bytes]:
        """The stop-copy state (*n* bytes, default all not yet taken) as whole multifd
        device-state packets, indexes 0.., then the config packet."""
        from testkit.multifd import device_packet
        left = self.state_bytes - self._made if n is None else n
        out, idx = [], 0
        while left:
            k = min(left, self.block_size)   # QEMU: up to its data buffer size, 1 MiB
            out.append(device_packet(self.idstr, self.instance_id, vfio_state_packet(idx, self.take_state(k))))
            idx, left = idx + 1, left - k
        out.append(device_packet(self.idstr, self.instance_id,
                                 vfio_state_packet(idx, self.config_buffer(), config=True)))
        return out

    def vmdesc_entry(self) -> dict[str, object]:
        size = 16 + self.config_size
        return {"name": self.idstr, "instance_id": self.instance_id, "size": size,
                "fields": [{"name": "data", "size": size, "type": "buffer"}]}


def vfio_state_packet(idx: int, data: bytes, *, config: bool = False, version: int = VFIO_STATE_PACKET_VERSION,
                      flags: int | None = None) -> bytes:
    """A VFIODeviceStatePacket: the payload of one multifd device-state packet."""
    f = int(VfioPacketFlag.CONFIG_STATE) if config else 0
    return VFIO_STATE_PACKET.pack(version, idx, f if flags is None else flags) + data


def _open(path: str) -> ImageReader:
    """*path* for reading; a compressed save image decompressed as libvirt would."""
    from libvirt_mdev.io.compress import open_image
    return open_image(open(path, "rb"))


def _scan(src: ByteSource) -> tuple[int, int]:
    """(largest section id, number of RAM PART records) of a stream."""
    top, parts = -1, 0
    for ev in iter_events(src):
        if isinstance(ev, SectionHeader):
            top = max(top, ev.section_id)
            parts += ev.kind == SectionKind.RAM and ev.type == SectionType.SECTION_PART
    return top, parts


def inject(src_path: str, dst: BinaryIO, devices: list[SyntheticVfioDevice],
           first_id: int | None = None) -> None:
    """Copy the stream (or save image) at *src_path* to *dst* with *devices* added.  A
    compressed save image is written back in its own format (libvirt_mdev.io.compress)."""
    from libvirt_mdev.io.compress import ImageSink
    with _open(src_path) as fh:
        top, ram_parts = _scan(fh)
    next_id = top + 1 if first_id is None else first_id
    for dev in devices:
        dev.section_id, next_id = next_id, next_id + 1
        dev.reset()
    sent = {id(d): 0 for d in devices}
    per_part = {id(d): -(-d.precopy_size // ram_parts) if ram_parts else 0 for d in devices}
    last: SectionHeader | None = None
    sink = ImageSink(dst.write)
    with _open(src_path) as fh, StreamWriter(sink) as w:  # type: ignore[arg-type]
        for ev in iter_events(fh):
            if isinstance(ev, Eof):
                for d in devices:
                    w.write_bytes(d.full_record())
            if isinstance(ev, VMDescription):
                desc = json.loads(bytes(ev.json))
                desc.setdefault("devices", []).extend(d.vmdesc_entry() for d in devices)
                w.write_bytes(encode_vmdesc(json.dumps(desc, separators=(",", ":")).encode()))
                continue
            w.write(ev)
            if isinstance(ev, SectionHeader):
                last = ev
            if not (isinstance(ev, SectionFooter) and last is not None and last.kind == SectionKind.RAM):
                continue
            for d in devices:
                if last.type == SectionType.SECTION_START:
                    w.write_bytes(d.start_record())
                elif last.type == SectionType.SECTION_PART:
                    n = min(per_part[id(d)], d.precopy_size - sent[id(d)])
                    sent[id(d)] += n
                    w.write_bytes(d.part_record(n))
                elif last.type == SectionType.SECTION_END:
                    for piece in d.end_chunks(d.state_bytes - sent[id(d)]):
                        w.write_bytes(piece)
                    sent[id(d)] = d.state_bytes
    sink.close()


def write_minimal_stream(dst: BinaryIO, ram_pages: int = 256, seed: int = 1) -> None:
    """A small stream with QEMU 7.2's shape and framing and made-up contents: header,
    configuration, a RAM section (setup, one iteration, completion) with zero and
    non-zero pages, a few device FULL sections, EOF and vmdesc.  For examples and
    demos where no QEMU is at hand; :func:`inject` adds VFIO devices to it."""
    from libvirt_mdev.stream.wire import BE64, RamFlag
    from libvirt_mdev.stream.writer import encode_configuration, encode_eof, encode_file_header
    page = 4096
    rng = random.Random(seed)
    ram = b""
    for i in range(ram_pages):
        zero = rng.random() < 0.6
        flags = (RamFlag.ZERO if zero else RamFlag.PAGE) | (RamFlag.CONTINUE if i else 0)
        ram += BE64.pack(i * page | flags) + (b"" if i else b"\x06pc.ram")
        ram += b"\x00" if zero else rng.randbytes(page)
    setup = (BE64.pack(ram_pages * page | RamFlag.MEM_SIZE) + b"\x06pc.ram" + BE64.pack(ram_pages * page)
             + BE64.pack(RamFlag.EOS))
    eos = BE64.pack(RamFlag.EOS)
    out = [encode_file_header(), encode_configuration("pc-i440fx-7.2"),
           encode_section_start(2, "ram", 0, 4) + setup + encode_footer(2),
           encode_section_part(2) + ram + eos + encode_footer(2),
           encode_section_part(2, end=True) + eos + encode_footer(2)]
    devices = [("timer", 0, 2, 24), ("cpu", 0, 12, 1900), ("0000:00:02.0/virtio-net", 0, 11, 300),
               ("serial", 0, 3, 40)]
    desc = []
    for sid, (name, inst, ver, size) in enumerate(devices, start=3):
        body = rng.randbytes(size)
        out.append(encode_section_start(sid, name, inst, ver, full=True) + body + encode_footer(sid))
        desc.append({"name": name, "instance_id": inst, "size": size,
                     "fields": [{"name": "data", "size": size, "type": "buffer"}]})
    out.append(encode_eof())
    out.append(encode_vmdesc(json.dumps({"page_size": page, "devices": desc}, separators=(",", ":")).encode()))
    dst.write(b"".join(out))
