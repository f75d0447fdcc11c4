"""Sans-IO parser of one QEMU multifd channel: bytes in, events out.

Theory of operation
-------------------
With multifd (``virsh migrate --parallel``) QEMU opens one *main* channel (the ``QEVM``
stream that :class:`~libvirt_mdev.stream.StreamParser` reads) plus N side channels.
Channels may connect in any order.  A side channel is read by QEMU's
``multifd_recv_thread`` and has this shape (all integers big-endian, layouts in
``docs/multifd.md``)::

    channel init   magic 0x11223344, version 1, the VM's uuid (16 bytes), channel id,
                   40 reserved bytes                                   -> ChannelInit
    ( packet )*    EOF only at a packet boundary                       -> ChannelEnd
    packet         header: magic, version, flags (12 bytes), then
      RAM          pages_alloc, normal_pages, next_packet_size, packet_num, zero_pages,
                   reserved, ramblock[256], offset[pages per packet]  -> RamPacket
                   + page data (normal_pages * page size, or next_packet_size bytes
                   when the channel is compressed)                     -> PacketData*
      device state (flag DEVICE_STATE, QEMU >= 10.0)
                   idstr[256], instance id, next_packet_size           -> DeviceStatePacket
                   + next_packet_size bytes of device state            -> PacketData*

The parser reads exactly the bytes QEMU's loader reads and applies the checks QEMU
applies before it uses them (magic, version, page counts, a terminated idstr, a
non-empty device-state packet, no SYNC on device state, the negotiated compression),
so our framing of a channel can never differ from QEMU's: device state cannot hide in
bytes we pass through as page data.  Page data is handed out as zero-copy pieces of
the fed chunks (constant memory, whatever the packet claims).

A caller may also move payload bytes past the parser (the proxy splices page data
socket to socket): :meth:`MultifdChannelParser.unfed_payload` says how many bytes of
the current packet's payload are due and not yet fed, and
:meth:`~MultifdChannelParser.consume_payload` accounts for bytes moved elsewhere.  The
parser still reads every header itself, so it alone decides where a payload ends.

Errors raise :class:`~libvirt_mdev.errors.StreamError` naming the absolute offset, and
the parser stays failed.
"""
from __future__ import annotations

import enum
import struct
import uuid as uuidlib
from collections.abc import Generator
from dataclasses import dataclass

from ..errors import StreamError, UnsupportedStream
from ._util import need
from .buffer import Input
from .events import NEED_DATA, Event, NeedData

# --------------------------------------------------------------------------- wire facts
#: first four bytes of every side channel and of every packet on it (QEMU MULTIFD_MAGIC)
MULTIFD_MAGIC = 0x11223344
#: MULTIFD_VERSION: the channel-init and packet version QEMU accepts
MULTIFD_VERSION = 1
#: MultiFDInit_t: magic, version, uuid[16], id, unused1[7], unused2[4] (64 bytes)
INIT = struct.Struct(">II16sB7s32s")
#: MultiFDPacketHdr_t: magic, version, flags
PACKET_HEADER = struct.Struct(">III")
#: MultiFDPacket_t after the header, without the offset array: pages_alloc, normal_pages,
#: next_packet_size, packet_num, zero_pages, unused32[1], unused64[3], ramblock[256]
RAM_PACKET = struct.Struct(">IIIQI4s24s256s")
#: MultiFDPacketDeviceState_t after the header: idstr[256], instance_id, next_packet_size
DEVICE_PACKET = struct.Struct(">256sII")
#: MULTIFD_PACKET_SIZE: RAM per packet; the offset array has this / page size entries
MULTIFD_PACKET_SIZE = 512 * 1024
#: x86's target page size (the main channel's CONFIGURATION may say otherwise)
DEFAULT_PAGE_SIZE = 4096
#: the largest device-state packet we pass (QEMU allocates next_packet_size at once;
#: VFIO sends buffers of its data_buffer_size, 1 MiB by default): a claim above this
#: is refused before any of it is read
MAX_DEVICE_PACKET = 256 << 20


class MultifdFlag(enum.IntFlag):
    """Packet flags (QEMU migration/multifd.h)."""

    SYNC = 1 << 0
    ZLIB = 1 << 1
    ZSTD = 2 << 1
    QPL = 4 << 1
    UADK = 8 << 1
    QATZIP = 16 << 1
    DEVICE_STATE = 32 << 1


#: the compression bits of the flags (MULTIFD_FLAG_COMPRESSION_MASK)
COMPRESSION_MASK = 0x1F << 1
#: the flag bits as plain ints for the per-packet checks (``int & IntFlag`` builds an enum
#: member each time: measurable at thousands of packets per second)
_SYNC = int(MultifdFlag.SYNC)
_DEVICE_STATE = int(MultifdFlag.DEVICE_STATE)


class Compression(enum.Enum):
    """The channel compression negotiated by ``multifd-compression`` (both ends agree)."""

    NONE = 0
    ZLIB = int(MultifdFlag.ZLIB)
    ZSTD = int(MultifdFlag.ZSTD)


# --------------------------------------------------------------------------- events
@dataclass(frozen=True, slots=True)
class ChannelInit(Event):
    """The channel-init message: which VM (QEMU's ``-uuid``, libvirt's domain uuid) and
    which of the N channels this is."""

    uuid: str
    channel_id: int


@dataclass(frozen=True, slots=True)
class RamPacket(Event):
    """A RAM packet header (pages follow as :class:`PacketData`); ``sync`` packets carry
    no pages and make every channel meet the main channel's RAM_SAVE_FLAG_MULTIFD_FLUSH."""

    flags: int
    packet_num: int
    ramblock: str
    normal_pages: int
    zero_pages: int
    data_len: int

    @property
    def sync(self) -> bool:
        return bool(self.flags & MultifdFlag.SYNC)


@dataclass(frozen=True, slots=True)
class DeviceStatePacket(Event):
    """A device-state packet header (QEMU >= 10.0): its buffer follows as
    :class:`PacketData` and is handed to the device named by (idstr, instance id)."""

    flags: int
    idstr: str
    instance_id: int
    data_len: int


@dataclass(frozen=True, slots=True)
class PacketData(Event):
    """A piece of the payload of the packet most recently announced."""


@dataclass(frozen=True, slots=True)
class ChannelEnd(Event):
    """The channel ended cleanly at a packet boundary (``raw`` is empty)."""


ChannelEvent = ChannelInit | RamPacket | DeviceStatePacket | PacketData | ChannelEnd


def is_multifd_channel(first4: bytes) -> bool:
    """Does a connection that starts with these four bytes carry a multifd side channel?
    (QEMU tells channels apart the same way: ``QEVM`` is the main channel.)"""
    return len(first4) >= 4 and struct.unpack(">I", first4[:4])[0] == MULTIFD_MAGIC


# --------------------------------------------------------------------------- parser
class MultifdChannelParser:
    """Parse one side channel.  ``feed(b"")`` marks the end of input.

    *page_size* is the guest's target page size (4096 on x86: the main channel's
    CONFIGURATION section carries it when it differs); *compression* the negotiated
    ``multifd-compression``.  Both shape what QEMU reads, so both must be right.

    ``compression=None`` (a proxy, which does not see the negotiation): the channel's
    compression is the one its first packet with pages names, and every later packet
    must name the same.  That cannot make our framing differ from QEMU's: QEMU's
    destination checks a packet's compression flags against the negotiated ones before
    it reads any payload, so a packet whose flags we take is one QEMU takes or refuses.
    """

    def __init__(self, *, page_size: int = DEFAULT_PAGE_SIZE,
                 compression: Compression | None = Compression.NONE) -> None:
        if page_size <= 0 or page_size & (page_size - 1) or MULTIFD_PACKET_SIZE % page_size:
            raise ValueError(f"page size {page_size} is not a power of two dividing {MULTIFD_PACKET_SIZE}")
        self.page_size = page_size
        self.pages_per_packet = MULTIFD_PACKET_SIZE // page_size
        self.compression = compression
        self._offsets = struct.Struct(f">{self.pages_per_packet}Q")
        self._inp = Input()
        self._gen: Generator[ChannelEvent | NeedData, None, None] = self._run()
        self._error: StreamError | None = None
        self._done = False
        self.channel_id: int | None = None
        self.uuid: str | None = None
        #: payload bytes of the current packet not yet handed out or consumed (0 between packets)
        self._payload_left = 0
        #: the header of the packet whose payload is being read (None between packets)
        self._current: RamPacket | DeviceStatePacket | None = None
        #: the grammar waits for the next packet's first byte (what :meth:`take_ram_header` needs)
        self._parked = False

    @property
    def ram_header_size(self) -> int:
        """Bytes of a RAM packet before its page data (1344 on x86): the most a reader
        at a packet boundary needs to hand us so that the header is complete."""
        return PACKET_HEADER.size + RAM_PACKET.size + self._offsets.size

    @property
    def current_packet(self) -> RamPacket | DeviceStatePacket | None:
        """The header of the packet whose payload is being read, None between packets."""
        return self._current

    def unfed_payload(self) -> int:
        """Payload bytes of the current packet that are due but neither fed nor buffered.

        0 between packets, and while what was fed still holds payload not yet handed
        out: drain :meth:`next_event` to :data:`NEED_DATA` first.  Up to this many bytes
        may then be moved past the parser and reported with :meth:`consume_payload`."""
        if self._error is not None or self._done or not self._payload_left:
            return 0
        return max(0, self._payload_left - self._inp.available())

    def consume_payload(self, n: int) -> None:
        """*n* payload bytes of the current packet went past the parser (they were never
        fed), in stream order right after everything fed so far.

        Raises ValueError (a caller bug) when anything fed is still unread or *n* is more
        than :meth:`unfed_payload`: bytes moved out of order would change the framing."""
        if self._inp.available():
            raise ValueError("consume_payload with fed bytes still unread: drain next_event() first")
        if not 0 < n <= self.unfed_payload():
            raise ValueError(f"consume_payload({n}): {self.unfed_payload()} payload bytes are due")
        self._payload_left -= n
        self._inp.base += n  # nothing is buffered: the next fed byte sits n bytes further on
        if not self._payload_left:
            self._current = None

    def take_ram_header(self, raw: bytes | bytearray | memoryview) -> RamPacket | None:
        """Take a whole RAM packet header without feeding it: the fast path of a reader
        that moves page data past the parser (:meth:`consume_payload`).

        *raw* must be the next :attr:`ram_header_size` bytes of the channel, read at a
        packet boundary with nothing fed and unread (else None: feed them instead).
        When they start a RAM packet, they get exactly the checks they would get fed,
        the packet's payload becomes due, and its event is returned; when they start
        a device-state packet, None, and nothing is taken (feed them).  Per packet this
        saves the generator's hand-offs, which were most of the proxy's Python time
        per 512 KiB of pages (docs/multifd.md, "Speed")."""
        if self._inp.available() or self._inp.eof or self._payload_left or self._error is not None \
                or self._done or len(raw) != self.ram_header_size:
            return None
        if not self._parked and self.next_event() is not NEED_DATA:  # let the grammar reach the boundary
            raise AssertionError("the multifd grammar made an event out of no input")  # pragma: no cover
        if not self._parked:  # not at a packet boundary (the channel init is due)
            return None
        magic, version, flags = PACKET_HEADER.unpack_from(raw)
        if flags & _DEVICE_STATE and magic == MULTIFD_MAGIC:
            return None
        at = self._inp.offset
        try:
            self._check_magic(magic, version, at, "packet")
            ev = self._ram_event(at, bytes(raw), flags)
        except StreamError as exc:
            self._error = exc
            raise
        self._inp.base += len(raw)  # nothing is buffered: the next fed byte sits after the header
        self._payload_left = ev.data_len
        self._current = ev if ev.data_len else None
        return ev

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._inp.feed(data)

    def next_event(self) -> ChannelEvent | NeedData:
        """The next :data:`ChannelEvent`, or :data:`NEED_DATA`; raises the sticky error."""
        if self._error is not None:
            raise self._error
        if self._done:
            return NEED_DATA
        try:
            return next(self._gen)
        except StopIteration:
            self._done = True
            return NEED_DATA
        except StreamError as exc:
            self._error = exc
            raise

    # ------------------------------------------------------------------ grammar
    def _run(self) -> Generator[ChannelEvent | NeedData, None, None]:
        inp = self._inp
        start = inp.offset
        raw = yield from need(inp, INIT.size, "multifd channel init")
        magic, version, uuid_raw, channel_id, _u1, _u2 = INIT.unpack(raw)
        self._check_magic(magic, version, start, "channel init")
        self.uuid = str(uuidlib.UUID(bytes=bytes(uuid_raw)))
        self.channel_id = channel_id
        yield ChannelInit(start, raw, uuid=self.uuid, channel_id=channel_id)
        while True:
            while inp.available() == 0 and not inp.eof:
                self._parked = True
                yield NEED_DATA
                self._parked = False
            if self._current is not None:
                # a header taken by take_ram_header, whose page data was fed after all
                yield from self._payload_data(self._current, "multifd page data", self._current_section())
                continue
            if inp.available() == 0:
                yield ChannelEnd(inp.offset, b"")
                return
            yield from self._packet()

    def _check_magic(self, magic: int, version: int, at: int, what: str) -> None:
        if magic != MULTIFD_MAGIC:
            raise StreamError(f"multifd {what}: magic {magic:#x}, expected {MULTIFD_MAGIC:#x}", offset=at)
        if version != MULTIFD_VERSION:
            raise UnsupportedStream(f"multifd {what}: version {version}, this build reads version "
                                    f"{MULTIFD_VERSION}", offset=at)

    def _packet(self) -> Generator[ChannelEvent | NeedData, None, None]:
        inp = self._inp
        at = inp.offset
        hdr = yield from need(inp, PACKET_HEADER.size, "multifd packet header")
        magic, version, flags = PACKET_HEADER.unpack(hdr)
        self._check_magic(magic, version, at, "packet")
        if flags & _DEVICE_STATE:
            yield from self._device_packet(at, bytes(hdr), flags)
        else:
            yield from self._ram_packet(at, bytes(hdr), flags)

    def _device_packet(self, at: int, hdr: bytes, flags: int) -> Generator[ChannelEvent | NeedData, None, None]:
        inp = self._inp
        body = yield from need(inp, DEVICE_PACKET.size, "multifd device-state packet", None)
        idstr_raw, instance_id, size = DEVICE_PACKET.unpack(body)
        if idstr_raw[-1] != 0:
            raise StreamError("unterminated multifd device state idstr", offset=at)
        name = idstr_raw.split(b"\0", 1)[0]
        if not name or any(b < 0x20 or b > 0x7E for b in name):
            raise StreamError("multifd device-state idstr is empty or not printable ASCII", offset=at)
        idstr = name.decode("ascii")
        where = f"{idstr} instance {instance_id}"
        if flags & _SYNC:
            raise StreamError("multifd: received SYNC device state packet", offset=at, section=where)
        if size == 0:
            raise StreamError("multifd: received empty device state packet", offset=at, section=where)
        if size > MAX_DEVICE_PACKET:
            raise StreamError(f"multifd device-state packet of {size} bytes is larger than the limit "
                              f"of {MAX_DEVICE_PACKET}", offset=at, section=where)
        ev = DeviceStatePacket(at, memoryview(hdr + bytes(body)), flags=flags, idstr=idstr,
                               instance_id=instance_id, data_len=size)
        yield from self._payload(ev, "multifd device state", where)

    def _ram_packet(self, at: int, hdr: bytes, flags: int) -> Generator[ChannelEvent | NeedData, None, None]:
        inp = self._inp
        # the fixed part and the offset array in one take (QEMU reads them as one struct)
        body = yield from need(inp, RAM_PACKET.size + self._offsets.size, "multifd RAM packet")
        ev = self._ram_event(at, hdr + bytes(body), flags)
        yield from self._payload(ev, "multifd page data", ev.ramblock)

    def _ram_event(self, at: int, raw: bytes, flags: int) -> RamPacket:
        """Check a whole RAM packet header (*raw*: from its magic to its last offset)
        the way QEMU does before it reads the pages, and say how many payload bytes follow."""
        pages_alloc, normal, next_size, packet_num, zero, _u32, _u64, block_raw = \
            RAM_PACKET.unpack_from(raw, PACKET_HEADER.size)
        ppp = self.pages_per_packet
        if pages_alloc > ppp:
            raise StreamError(f"multifd: received packet with {pages_alloc} pages, expected at most {ppp}",
                              offset=at)
        # QEMU bounds the page counts by the packet's own pages_alloc (multifd_ram_unfill_packet)
        if normal > pages_alloc:
            raise StreamError(f"multifd: received packet with {normal} non-zero pages, more than its "
                              f"{pages_alloc}", offset=at)
        if zero > pages_alloc - normal:
            raise StreamError(f"multifd: received packet with {zero} zero pages, expected at most "
                              f"{pages_alloc - normal}", offset=at)
        block = block_raw[:255].split(b"\0", 1)[0]   # QEMU terminates ramblock[255] itself
        if (normal or zero) and not block:
            raise StreamError("multifd RAM packet without a RAM block name", offset=at)
        comp = flags & COMPRESSION_MASK
        if normal or zero:
            self._check_compression(comp, at)
        data_len = self._data_len(normal, zero, next_size)
        try:
            ramblock = block.decode("ascii")
        except UnicodeDecodeError:
            raise StreamError("multifd RAM block name is not ASCII", offset=at) from None
        return RamPacket(at, memoryview(raw), flags=flags, packet_num=packet_num, ramblock=ramblock,
                         normal_pages=normal, zero_pages=zero, data_len=data_len)

    def _payload(self, ev: RamPacket | DeviceStatePacket, what: str,
                 section: str) -> Generator[ChannelEvent | NeedData, None, None]:
        """Announce a validated header, then hand out its payload as zero-copy pieces
        (one per fed chunk).  The count lives on the parser, not in this frame, so that
        :meth:`consume_payload` can take bytes that were moved past us."""
        self._payload_left = ev.data_len
        self._current = ev if ev.data_len else None
        yield ev
        yield from self._payload_data(ev, what, section)

    def _payload_data(self, ev: RamPacket | DeviceStatePacket, what: str,
                      section: str) -> Generator[ChannelEvent | NeedData, None, None]:
        """Hand out the rest of *ev*'s payload as it is fed."""
        inp = self._inp
        while self._payload_left:
            view = inp.take_upto(self._payload_left)
            if view is None:
                if inp.eof:
                    raise StreamError(f"stream ends inside {what} ({self._payload_left} of {ev.data_len} "
                                      f"bytes missing)", offset=inp.offset, section=section)
                yield NEED_DATA
                continue
            self._payload_left -= len(view)
            yield PacketData(inp.offset - len(view), view)
        self._current = None

    def _current_section(self) -> str:
        cur = self._current
        if isinstance(cur, DeviceStatePacket):
            return f"{cur.idstr} instance {cur.instance_id}"
        return cur.ramblock if cur is not None else ""

    def _check_compression(self, comp: int, at: int) -> None:
        if self.compression is None:  # learn it from the first packet with pages
            try:
                self.compression = Compression(comp)
            except ValueError:
                raise UnsupportedStream(f"multifd compression flags {comp:#x} (qpl, uadk or qatzip): this build "
                                        f"reads uncompressed, zlib and zstd channels", offset=at) from None
        if comp != self.compression.value:
            raise UnsupportedStream(f"multifd RAM packet compression flags {comp:#x} do not match the "
                                    f"channel's ({self.compression.name.lower()})", offset=at)

    def _data_len(self, normal: int, zero: int, next_size: int) -> int:
        """How many payload bytes QEMU's recv method reads after this header."""
        if not normal:
            # nothing to read: zero pages are only listed, SYNC has none.  next_packet_size is not
            # looked at (QEMU 7.2 leaves the previous packet's value in it; its loader reads nothing)
            return 0
        if self.compression is Compression.NONE:
            return normal * self.page_size
        if next_size > MULTIFD_PACKET_SIZE * 2:
            raise StreamError(f"multifd compressed packet of {next_size} bytes is larger than the limit "
                              f"of {MULTIFD_PACKET_SIZE * 2}")
        return next_size


def read_channel_init(first: bytes) -> tuple[str, int]:
    """Decode a complete channel-init message (64 bytes): (uuid, channel id).

    For the proxy, which must tie a side channel to the armed migration before it
    forwards a byte of it."""
    if len(first) < INIT.size:
        raise StreamError(f"multifd channel init is {INIT.size} bytes, got {len(first)}", offset=0)
    magic, version, uuid_raw, channel_id, _u1, _u2 = INIT.unpack(first[:INIT.size])
    if magic != MULTIFD_MAGIC:
        raise StreamError(f"multifd channel init: magic {magic:#x}, expected {MULTIFD_MAGIC:#x}", offset=0)
    if version != MULTIFD_VERSION:
        raise UnsupportedStream(f"multifd channel init: version {version}, this build reads version "
                                f"{MULTIFD_VERSION}", offset=0)
    return str(uuidlib.UUID(bytes=bytes(uuid_raw))), channel_id
