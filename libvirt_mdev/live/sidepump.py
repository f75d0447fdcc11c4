"""Move one multifd side channel from the source socket to the destination socket.

Theory of operation
-------------------
A side channel (``docs/multifd.md``) is almost all RAM page data: 512 KiB of pages
after every 1344-byte header on x86.  Copying those pages into Python buffers and
back out (``recv`` + ``sendmsg``) costs two copies of every byte in the proxy's
process, on a host where both QEMUs want the same CPUs.  So:

* every byte that is not RAM page data — the channel init, every packet header, every
  device-state payload — is read into user space and fed to the exact codec
  (:class:`~libvirt_mdev.stream.multifd.MultifdChannelParser`), which alone decides
  how many payload bytes follow a header;
* once the codec has validated a RAM packet's header, the page data the codec has not
  been fed yet (:meth:`~libvirt_mdev.stream.multifd.MultifdChannelParser.unfed_payload`)
  moves socket -> pipe -> socket with ``os.splice`` (no copy into the process, the GIL
  released), and the codec is told (``consume_payload``), so its framing stays the one
  QEMU applies.  The header (a write of ~1.3 KiB) goes into the pipe ahead of its page
  data, so the destination gets one send per packet and nothing of a packet moves
  before its header was checked;
* at a packet boundary the pump reads at most one RAM header, so the next payload is
  left in the kernel for the splice; a whole header read there goes to the codec's fast
  path (:meth:`~libvirt_mdev.stream.multifd.MultifdChannelParser.take_ram_header`: the
  same checks, without the event machinery, which cost more Python time per packet than
  everything else the pump does); bytes the codec already holds are forwarded as the
  zero-copy pieces it hands out, as before;
* device-state packets (QEMU 10, flag ``DEVICE_STATE``) are never spliced: their header
  and payload go through user space to a :class:`DevicePacketSink`, and what the sink
  returns from ``end()`` is forwarded in the channel's byte order.  A sink that raises
  stops the pump before anything of that packet (or of the rest of the read that
  carried it) is forwarded.

What splice saves, measured (``bench/bench_sidepump.py``: the proxy's own CPU, 4
channels; ``bench/bench_proxy.py``: whole migrations, both QEMUs and the proxy sharing
2 cores): towards a UNIX socket 0.46 CPU-s per GiB instead of 0.84 with copies, towards
loopback TCP 0.55 instead of 0.93, and a 4-channel migration into TCP took 1.40x the
direct time instead of 1.83x.  So the pump splices whenever both sockets take it.

Where ``os.splice`` is missing or refuses the sockets (a TLS socket object, a kernel
without splice for that socket type) the pump falls back to the user-space path:
chunks of :data:`~libvirt_mdev.io.sizes.CHUNK` bytes forwarded as zero-copy pieces with
one gathered ``sendmsg`` per chunk.  Memory is constant per channel either way: a few
reusable chunk buffers and one pipe of :data:`CHUNK` bytes (kernel memory).
"""
from __future__ import annotations

import errno
import os
import socket
from collections.abc import Callable, Sequence
from typing import Protocol

from ..errors import UnsupportedStream
from ..io.drive import BufferPool, grow_pipe
from ..io.sizes import CHUNK
from ..stream.events import NEED_DATA, Bytes
from ..stream.multifd import DeviceStatePacket, MultifdChannelParser, PacketData, RamPacket
from .relay import send_views

#: errors of ``os.splice`` that mean "not for these file descriptors": use the copy path
_NO_SPLICE = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP})
_SPLICE_F_MORE = getattr(os, "SPLICE_F_MORE", 4)
_SPLICE_F_MOVE = getattr(os, "SPLICE_F_MOVE", 1)
#: at most this much (a RAM header and what precedes it in a read) is written into the
#: empty pipe ahead of the page data: less than a pipe's smallest capacity, so it never blocks
_PIPE_HEAD = 16 << 10
#: ... in at most this many pieces (one writev, well under IOV_MAX)
_PIPE_HEAD_PIECES = 64


class DevicePacketSink(Protocol):
    """Where a side channel's device-state packets go (one sink per channel)."""

    def begin(self, ev: DeviceStatePacket) -> None:
        """A device-state packet starts (its header is *ev*).  May raise: then nothing
        of the packet is forwarded."""

    def data(self, piece: Bytes) -> None:
        """A piece of its payload; only valid during the call (copy to keep)."""

    def end(self) -> Sequence[Bytes]:
        """The packet is complete: what to forward now, in order (normally its header
        ``ev.raw`` and its whole payload).  May raise."""


class RefuseDeviceState:
    """The sink of a proxy that cannot take device state on side channels (the signing
    proxy: such packets carry no signature): any device-state packet fails the migration
    before any of it is forwarded, with *reason* and the way out."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def begin(self, ev: DeviceStatePacket) -> None:
        raise UnsupportedStream(
            f"device state of {ev.idstr} instance {ev.instance_id} on a multifd channel (QEMU 10 vfio-pci "
            f"x-migration-multifd-transfer) {self.reason}: turn that vfio-pci property off "
            f"(x-migration-multifd-transfer=off) or migrate without --parallel", offset=ev.offset)

    def data(self, piece: Bytes) -> None:
        raise AssertionError("device-state data after a refused begin")

    def end(self) -> Sequence[Bytes]:
        raise AssertionError("device-state end after a refused begin")


def _spliceable(sock: socket.socket) -> bool:
    """A plain stream socket: its fd carries the channel's bytes as they are (an
    ``ssl.SSLSocket`` subclass would not: splicing its fd would bypass TLS)."""
    return type(sock) is socket.socket and sock.type == socket.SOCK_STREAM and \
        sock.family in (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX)


class _Pipe:
    """The pipe the page data crosses between two sockets.  Empty between packets: it
    holds at most the bytes of one packet (its header, written in, then its page data)."""

    def __init__(self) -> None:
        self.r, self.w = os.pipe()
        grow_pipe(self.w, CHUNK)
        #: bytes written into the pipe ahead of the page data (the packet's header)
        self.head = 0

    def put_head(self, pieces: Sequence[Bytes]) -> None:
        """Write what goes ahead of a packet's page data (its header) into the empty pipe:
        less than a pipe's smallest capacity, so the write never blocks."""
        size = sum(len(v) for v in pieces)
        self.head = os.writev(self.w, pieces)
        if self.head != size:
            raise OSError(errno.EIO, f"a pipe took {self.head} of {size} bytes")

    def close(self) -> None:
        for fd in (self.r, self.w):
            try:
                os.close(fd)
            except OSError:
                pass


class SidePump:
    """Forward one side channel, *src* to *dst*, through the codec (see the module docstring).

    *prefix*: what admission already read (the 64-byte channel init).  *on_input(n)* is
    called for every *n* bytes taken from *src* (read or spliced), *on_output(n)* for
    every *n* bytes written to *dst*.  *zero_copy*: splice page data (True, the
    default, wherever both sockets take it) or never (False, tests of the copy path);
    *parser*: a codec set up for the channel (page size, compression), else the default.
    """

    def __init__(self, src: socket.socket, dst: socket.socket, sink: DevicePacketSink, *,
                 prefix: bytes = b"", on_input: Callable[[int], None] | None = None,
                 on_output: Callable[[int], None] | None = None, zero_copy: bool = True,
                 parser: MultifdChannelParser | None = None) -> None:
        self.src, self.dst, self.sink = src, dst, sink
        # the channel's compression is learnt from its first packet with pages (the proxy does not see
        # the migration parameters; stream/multifd.py says why that is exact)
        self.parser = parser or MultifdChannelParser(compression=None)
        self._prefix = prefix
        self._on_input = on_input
        self._on_output = on_output
        self.zero_copy = zero_copy and hasattr(os, "splice") and _spliceable(src) and _spliceable(dst)
        self._pool = BufferPool(CHUNK)
        self._pipe: _Pipe | None = None
        #: payload bytes of the open device-state packet still due to the sink (0: none open)
        self._device_left = 0
        self.bytes_in = 0
        self.bytes_out = 0
        #: page-data bytes moved by splice (never through this process's memory)
        self.spliced = 0
        #: bytes the destination took by splice (once it took any, a refusal is an error)
        self.bytes_out_spliced = 0

    # ------------------------------------------------------------------ the loop
    def run(self) -> None:
        """Forward until the source's EOF at a packet boundary.  Raises on any refusal
        (codec, sink, socket): the caller fails the migration closed."""
        self._pipe = _Pipe() if self.zero_copy else None
        try:
            if self._prefix:
                self._take(memoryview(self._prefix))
            while True:
                if self._pipe is not None and self._ram_payload_due():
                    self._splice(self._pipe)
                    continue
                data = self._read()
                if self._pipe is not None and self._take_ram_header(self._pipe, data):
                    continue
                self._take(data)
                if not data:
                    return
        finally:
            if self._pipe is not None:
                self._pipe.close()
                self._pipe = None

    def _ram_payload_due(self) -> bool:
        """RAM page data is due that the codec has not been fed (never device state)."""
        p = self.parser
        return not self._device_left and type(p.current_packet) is RamPacket and p.unfed_payload() > 0

    def _read(self) -> memoryview:
        """Read what is there, up to: a chunk on the copy path; with splice, at a packet
        boundary one RAM header (the page data behind it stays in the kernel), inside a
        device-state payload up to its end."""
        size = CHUNK
        if self._pipe is not None:
            due = self.parser.unfed_payload()
            size = min(CHUNK, due) if due else self.parser.ram_header_size
        buf = self._pool.get()
        with memoryview(buf) as view:
            n = self.src.recv_into(view, size)
        return memoryview(buf)[:n]

    def _take_ram_header(self, pipe: _Pipe, data: memoryview) -> bool:
        """The fast path at a packet boundary: when *data* is a whole RAM header, the codec
        checks it without the event machinery (``take_ram_header``) and it goes into the
        empty pipe ahead of its page data.  False (nothing done): feed *data* instead."""
        if len(data) != self.parser.ram_header_size:
            return False
        ev = self.parser.take_ram_header(data)
        if ev is None:
            return False
        self._count_in(len(data))
        if not ev.data_len:  # a SYNC or zero-page packet: no page data follows
            self._send([ev.raw])
            return True
        pipe.put_head([ev.raw])
        return True

    def _take(self, data: memoryview) -> None:
        """Feed what was read (empty: the EOF), then forward what the codec hands out.

        When page data follows by splice, what goes before it (a RAM header, small) is
        written into the pipe ahead of it: one send to the destination per packet."""
        self._count_in(len(data))
        self.parser.feed(data)
        out = self._events()
        del data
        if not out:
            return
        pipe = self._pipe
        if pipe is not None and not pipe.head and self._ram_payload_due() and len(out) <= _PIPE_HEAD_PIECES \
                and sum(len(v) for v in out) <= _PIPE_HEAD:
            pipe.put_head(out)
            return
        self._send(out)

    def _events(self) -> list[Bytes]:
        """Drain the codec: what to forward for the bytes fed so far, in order."""
        out: list[Bytes] = []
        parser, sink = self.parser, self.sink
        while (ev := parser.next_event()) is not NEED_DATA:
            if self._device_left:
                assert type(ev) is PacketData
                sink.data(ev.raw)
                self._device_left -= len(ev.raw)
                if not self._device_left:
                    out.extend(sink.end())
            elif type(ev) is DeviceStatePacket:
                sink.begin(ev)
                self._device_left = ev.data_len
            elif len(ev.raw):
                out.append(ev.raw)
        return out

    # ------------------------------------------------------------------ splice
    def _splice(self, pipe: _Pipe) -> None:
        """Move the page data due socket -> pipe -> socket (after the header written into
        the pipe, if any).  Falls back to the copy path for good when these sockets
        take no splice."""
        parser = self.parser
        due = parser.unfed_payload()
        while due:
            try:
                n = os.splice(self.src.fileno(), pipe.w, due, flags=_SPLICE_F_MOVE)
            except OSError as exc:
                if exc.errno not in _NO_SPLICE or self.spliced:
                    raise
                self._copy_path(pipe, pipe.head)
                return
            if n == 0:  # the source ended inside the page data: the codec says so
                self._take(memoryview(b""))
                raise AssertionError("the codec accepted an end inside a RAM packet")  # pragma: no cover
            self._count_in(n)
            due -= n
            self.spliced += n
            parser.consume_payload(n)
            if not self._drain(pipe, pipe.head + n, more=due > 0):
                self._copy_path(pipe, pipe.head + n)
                return
            pipe.head = 0

    def _drain(self, pipe: _Pipe, n: int, *, more: bool) -> bool:
        """Send the *n* bytes in the pipe to the destination.  False when the destination
        takes no splice (before it took any): the bytes are still in the pipe."""
        flags = _SPLICE_F_MOVE | (_SPLICE_F_MORE if more else 0)
        dst = self.dst.fileno()
        while n:
            try:
                k = os.splice(pipe.r, dst, n, flags=flags)
            except OSError as exc:
                if exc.errno not in _NO_SPLICE or self.bytes_out_spliced:
                    raise
                return False
            if k <= 0:
                raise OSError(errno.EPIPE, "the destination took no bytes")
            n -= k
            self.bytes_out_spliced += k
            self._count_out(k)
        return True

    def _copy_path(self, pipe: _Pipe, pending: int) -> None:
        """Splice is not possible for these sockets: send the *pending* bytes the pipe
        holds by copying them out, and read the rest of the channel into user space."""
        while pending:
            chunk = os.read(pipe.r, pending)
            pending -= len(chunk)
            self._send([chunk])
        pipe.close()
        self._pipe = None

    # ------------------------------------------------------------------ counting
    def _send(self, views: Sequence[Bytes]) -> None:
        self._count_out(send_views(self.dst, views))

    def _count_in(self, n: int) -> None:
        self.bytes_in += n
        if self._on_input is not None and n:
            self._on_input(n)

    def _count_out(self, n: int) -> None:
        self.bytes_out += n
        if self._on_output is not None and n:
            self._on_output(n)


__all__ = ["DevicePacketSink", "RefuseDeviceState", "SidePump"]
