"""One side channel through the pump (libvirt_mdev/live/sidepump.py), on socketpairs and loopback TCP.

Synthetic channels in QEMU's exact framing (testkit.multifd).  Checked: the channel comes out byte-identical
whether the page data is spliced or copied, whatever the read boundaries and whatever the codec already holds
when a payload starts; device-state packets go to the sink (never spliced) and what the sink returns is forwarded
in the channel's order; a refusal (sink or codec) forwards nothing of the refused packet; memory stays constant.
"""
from __future__ import annotations

import errno
import os
import random
import socket
import threading
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import pytest

from libvirt_mdev.errors import StreamError, UnsupportedStream
from libvirt_mdev.live import sidepump
from libvirt_mdev.live.sidepump import RefuseDeviceState, SidePump
from libvirt_mdev.stream.events import Bytes
from libvirt_mdev.stream.multifd import DeviceStatePacket, MultifdChannelParser
from testkit import multifd as mk

VM = "7d3b1b86-4a4f-4c8e-9a57-3f0d6c9e2a11"
PAGE = 4096
HDR = MultifdChannelParser().ram_header_size

WHY = "cannot be taken by this test proxy"


def ram(npages: int, seed: int, *, zero: int = 0, num: int = 0) -> bytes:
    rnd = random.Random(seed)
    pages = [rnd.randbytes(PAGE) for _ in range(npages)]
    offs = [i * PAGE for i in range(npages)]
    return mk.ram_packet("pc.ram", offs, pages, zero=[(npages + i) * PAGE for i in range(zero)], packet_num=num)


def dev(size: int, seed: int, name: str = "0000:00:05.0/vfio") -> bytes:
    return mk.device_packet(name, 0, random.Random(seed).randbytes(size))


def channel(*packets: bytes) -> bytes:
    return mk.channel_init(VM, 2) + b"".join(packets)


#: RAM packets of many sizes (no pages, one page, a full 128-page packet...), SYNC, zero pages only
MANY = channel(*(ram(n, n, num=i) for i, n in enumerate((1, 2, 3, 7, 31, 64, 127, 128, 128))),
               mk.sync_packet(9), ram(0, 0, zero=5), ram(128, 77), mk.sync_packet(10), ram(1, 5))


def boundaries(packets: Sequence[bytes], start: int) -> list[int]:
    out, pos = [start], start
    for p in packets:
        pos += len(p)
        out.append(pos)
    return out


# ----------------------------------------------------------------------------------------- harness
def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        a = socket.create_connection(srv.getsockname())
        b, _ = srv.accept()
    return a, b


PAIRS: dict[str, Callable[[], tuple[socket.socket, socket.socket]]] = {
    "unix": socket.socketpair, "tcp": tcp_pair}


@dataclass
class Run:
    out: bytes
    pump: SidePump
    error: BaseException | None
    counted_in: int
    counted_out: int


def write_all(sock: socket.socket, data: bytes | Iterator[bytes], drip: random.Random | None) -> None:
    """The source QEMU: send *data* (in random small pieces with *drip*), then FIN."""
    try:
        parts: Iterator[bytes] = iter([data]) if isinstance(data, bytes) else data
        for part in parts:
            if drip is None:
                sock.sendall(part)
                continue
            view, i = memoryview(part), 0
            while i < len(view):
                n = drip.choice((1, 3, 11, 12, 13, 100, 1343, 1344, 1345, 4095, 4097, 70000))
                sock.sendall(view[i:i + n])
                i += n
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the pump refused and reset: the source sees a broken connection


def read_all(sock: socket.socket, into: bytearray, keep: bool = True) -> None:
    """The destination QEMU: read to EOF (keeping what came only when asked: a large channel is not kept)."""
    buf = bytearray(1 << 20)
    try:
        while n := sock.recv_into(buf):
            if keep:
                into += buf[:n]
    except OSError:
        pass


def pump(data: bytes | Iterator[bytes], *, prefix: bytes = b"", sink: sidepump.DevicePacketSink | None = None,
         kind: str = "unix", zero_copy: bool = True, drip: random.Random | None = None,
         keep: bool = True) -> Run:
    """Forward *data* (after *prefix*, what admission already read) through a SidePump."""
    src_w, src_r = PAIRS[kind]()
    dst_w, dst_r = PAIRS[kind]()
    got = bytearray()
    writer = threading.Thread(target=write_all, args=(src_w, data, drip), daemon=True)
    reader = threading.Thread(target=read_all, args=(dst_r, got, keep), daemon=True)
    writer.start()
    reader.start()
    counts = [0, 0]

    def add_in(n: int) -> None:
        counts[0] += n

    def add_out(n: int) -> None:
        counts[1] += n

    p = SidePump(src_r, dst_w, sink or RefuseDeviceState(WHY), prefix=prefix, on_input=add_in, on_output=add_out,
                 zero_copy=zero_copy)
    error: BaseException | None = None
    try:
        p.run()
        dst_w.shutdown(socket.SHUT_WR)
    except (StreamError, OSError) as exc:
        error = exc
    finally:
        src_r.close()
        dst_w.close()
    reader.join(20)
    writer.join(20)
    assert not reader.is_alive() and not writer.is_alive()
    src_w.close()
    dst_r.close()
    return Run(bytes(got), p, error, counts[0], counts[1])


@dataclass
class RecordingSink:
    """A sink that sees every device-state packet and forwards its header and a marked payload."""

    begun: list[DeviceStatePacket] = field(default_factory=list)
    payloads: list[bytes] = field(default_factory=list)
    refuse_begin: bool = False
    refuse_end: bool = False
    _header: bytes = b""
    _data: bytearray = field(default_factory=bytearray)

    def begin(self, ev: DeviceStatePacket) -> None:
        if self.refuse_begin:
            raise UnsupportedStream("refused at begin", offset=ev.offset)
        self.begun.append(ev)
        self._header = bytes(ev.raw)
        self._data = bytearray()

    def data(self, piece: Bytes) -> None:
        self._data += piece

    def end(self) -> Sequence[Bytes]:
        if self.refuse_end:
            raise UnsupportedStream("refused at end")
        self.payloads.append(bytes(self._data))
        return [self._header, marked(bytes(self._data))]


def marked(payload: bytes) -> bytes:
    """What the recording sink forwards for a payload (proves it went through the sink, not a splice)."""
    return bytes(b ^ 0xFF for b in payload)


def through_sink(packets: Sequence[bytes]) -> bytes:
    """The expected output of a channel whose device packets pass the recording sink."""
    out = bytearray(mk.channel_init(VM, 2))
    for p in packets:
        if int.from_bytes(p[8:12], "big") & 0x40:
            out += p[:276] + marked(p[276:])
        else:
            out += p
    return bytes(out)


# ----------------------------------------------------------------------------------------- byte-identical
@pytest.mark.parametrize("kind", ["unix", "tcp"])
@pytest.mark.parametrize("zero_copy", [True, False])
def test_many_packet_sizes_pass_byte_identical(kind: str, zero_copy: bool) -> None:
    r = pump(MANY, kind=kind, zero_copy=zero_copy)
    assert r.error is None
    assert r.out == MANY
    assert r.counted_in == r.pump.bytes_in == len(MANY) and r.counted_out == r.pump.bytes_out == len(MANY)
    if zero_copy:
        assert r.pump.zero_copy and r.pump.spliced > len(MANY) // 2
    else:
        assert r.pump.spliced == 0


def test_payload_partly_held_by_the_codec_at_every_awkward_boundary() -> None:
    """Admission's prefix is fed to the codec first: cut it everywhere near a header or a payload edge,
    so a payload starts with 0, 1, ... its length already buffered (the rest is spliced)."""
    packets = [ram(2, 1), mk.sync_packet(1), ram(1, 2), ram(3, 3)]
    data = channel(*packets)
    cuts: set[int] = set(range(0, len(data), 257))
    for b in boundaries(packets, 64):
        for d in (-1, 0, 1, 11, 12, 13, HDR - 1, HDR, HDR + 1, HDR + PAGE - 1, HDR + PAGE, HDR + PAGE + 1):
            if 0 <= b + d <= len(data):
                cuts.add(b + d)
    for cut in sorted(cuts):
        r = pump(data[cut:], prefix=data[:cut])
        assert r.error is None, (cut, r.error)
        assert r.out == data, cut
        assert r.pump.bytes_in == len(data)


@pytest.mark.parametrize("kind", ["unix", "tcp"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_dripping_source_with_device_packets_in_between(kind: str, seed: int) -> None:
    packets = [ram(5, 1), dev(3000, 2), ram(128, 3), mk.sync_packet(4), dev(1, 5), dev(200_000, 6), ram(1, 7)]
    sink = RecordingSink()
    r = pump(channel(*packets), sink=sink, kind=kind, drip=random.Random(seed))
    assert r.error is None
    assert r.out == through_sink(packets)
    assert [len(p) for p in sink.payloads] == [3000, 1, 200_000]
    assert sink.payloads[2] == packets[5][276:]


# ----------------------------------------------------------------------------------------- device state
@pytest.mark.parametrize("zero_copy", [True, False])
def test_the_sink_gets_exactly_the_device_packets_and_its_bytes_go_out_in_order(zero_copy: bool) -> None:
    packets = [ram(128, 1), dev(4 << 20, 2, "a/vfio"), ram(3, 3), dev(1000, 4, "b/vfio"), dev(5, 5, "c/vfio"),
               mk.sync_packet(6), ram(128, 7)]
    sink = RecordingSink()
    r = pump(channel(*packets), sink=sink, zero_copy=zero_copy)
    assert r.error is None
    assert [e.idstr for e in sink.begun] == ["a/vfio", "b/vfio", "c/vfio"]
    assert sink.payloads == [packets[1][276:], packets[3][276:], packets[4][276:]]
    assert r.out == through_sink(packets)   # a spliced device payload would come out unmarked


def test_device_payload_held_by_the_codec_from_the_prefix_goes_to_the_sink() -> None:
    packets = [dev(50_000, 1), ram(2, 2)]
    data = channel(*packets)
    for cut in (64 + 12, 64 + 276, 64 + 277, 64 + 30_000, 64 + len(packets[0]) + 5):
        sink = RecordingSink()
        r = pump(data[cut:], prefix=data[:cut], sink=sink)
        assert r.error is None and r.out == through_sink(packets), cut


def test_refuse_device_state_refuses_with_its_reason_and_forwards_nothing_of_the_packet() -> None:
    packets = [ram(128, 1), ram(2, 2), dev(10_000, 3), ram(4, 4)]
    data = channel(*packets)
    at = boundaries(packets, 64)[2]
    r = pump(data)
    assert isinstance(r.error, UnsupportedStream)
    assert "device state of 0000:00:05.0/vfio instance 0 on a multifd channel" in str(r.error)
    assert WHY in str(r.error) and "without --parallel" in str(r.error)
    assert len(r.out) <= at and data.startswith(r.out)


@pytest.mark.parametrize("where", ["begin", "end"])
@pytest.mark.parametrize("zero_copy", [True, False])
def test_a_sink_refusal_forwards_nothing_of_that_packet(where: str, zero_copy: bool) -> None:
    packets = [ram(128, 1), dev(300_000, 2), ram(4, 4)]
    data = channel(*packets)
    at = boundaries(packets, 64)[1]
    sink = RecordingSink(refuse_begin=where == "begin", refuse_end=where == "end")
    r = pump(data, sink=sink, zero_copy=zero_copy)
    assert isinstance(r.error, UnsupportedStream) and f"refused at {where}" in str(r.error)
    assert len(r.out) <= at and data.startswith(r.out)


# ----------------------------------------------------------------------------------------- lying headers
@pytest.mark.parametrize("liar, match", [
    (mk.ram_packet("pc.ram", [0, PAGE], [b"\x01" * PAGE] * 2, pages_alloc=1), "non-zero pages"),
    (mk.ram_packet("pc.ram", [0], [b"\x01" * PAGE], pages_alloc=129), "129 pages"),
    (mk.ram_packet("pc.ram", [0], [b"\x01" * PAGE], flags=0x4), "compression"),
    (mk.ram_packet("", [0], [b"\x01" * PAGE]), "without a RAM block"),
    (mk.ram_packet("pc.ram", [0], [b"\x01" * PAGE], magic=0x51455646), "magic"),
])
@pytest.mark.parametrize("zero_copy", [True, False])
def test_a_lying_header_is_refused_before_any_of_its_payload_moves(liar: bytes, match: str,
                                                                   zero_copy: bool) -> None:
    packets = [ram(128, 1), liar, ram(2, 2)]
    data = channel(*packets)
    at = boundaries(packets, 64)[1]
    r = pump(data, zero_copy=zero_copy)
    assert isinstance(r.error, StreamError) and match in str(r.error)
    assert len(r.out) <= at and data.startswith(r.out)
    assert r.pump.spliced <= 128 * PAGE


@pytest.mark.parametrize("cut", [64 + HDR + 1, 64 + HDR + 100_000, 64 + HDR + 128 * PAGE - 1])
def test_an_end_inside_spliced_page_data_is_an_error(cut: int) -> None:
    data = channel(ram(128, 1), ram(1, 2))
    r = pump(data[:cut])
    assert isinstance(r.error, StreamError) and "ends inside multifd page data" in str(r.error)
    # what went on is a prefix of what came, with every packet before the cut one: the destination sees no
    # complete packet that was not sent
    assert data[:cut].startswith(r.out) and len(r.out) >= 64


# ----------------------------------------------------------------------------------------- fallback
def test_falls_back_to_copying_when_the_source_takes_no_splice(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_splice(*args: object, **kw: object) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(sidepump.os, "splice", no_splice)
    r = pump(MANY)
    assert r.error is None and r.out == MANY and r.pump.spliced == 0


def test_falls_back_to_copying_when_the_destination_takes_no_splice(monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.splice
    pipes: set[int] = set()

    def half_splice(src: int, dst: int, count: int, offset_src: int | None = None, offset_dst: int | None = None,
                    flags: int = 0) -> int:
        if src in pipes:   # pipe -> destination socket
            raise OSError(errno.EINVAL, "Invalid argument")
        pipes.add(dst)
        return real(src, dst, count, flags=flags)

    monkeypatch.setattr(sidepump.os, "splice", half_splice)
    r = pump(MANY)
    assert r.error is None and r.out == MANY


def test_by_default_page_data_is_spliced_into_unix_and_tcp_sockets() -> None:
    """Splice is the default towards either socket family (cheaper for the host in both,
    module docstring); the copy path only when asked or when a socket takes no splice."""
    u1, u2 = socket.socketpair()
    t1, t2 = tcp_pair()
    try:
        assert SidePump(t2, u1, RefuseDeviceState(WHY)).zero_copy          # TCP source, UNIX destination
        assert SidePump(u2, t1, RefuseDeviceState(WHY)).zero_copy          # UNIX source, TCP destination
        assert not SidePump(t2, u1, RefuseDeviceState(WHY), zero_copy=False).zero_copy
        assert not SidePump(u2, t1, RefuseDeviceState(WHY), zero_copy=False).zero_copy
    finally:
        for s in (u1, u2, t1, t2):
            s.close()


def test_no_splice_for_socket_subclasses() -> None:
    """An ssl.SSLSocket is a socket.socket subclass: splicing its fd would bypass TLS."""

    class Wrapped(socket.socket):
        pass

    a, b = socket.socketpair()
    w = Wrapped(fileno=os.dup(a.fileno()))
    try:
        assert SidePump(b, a, RefuseDeviceState(WHY)).zero_copy
        assert not SidePump(w, a, RefuseDeviceState(WHY)).zero_copy
        assert not SidePump(b, w, RefuseDeviceState(WHY)).zero_copy
    finally:
        for s in (a, b, w):
            s.close()


# ----------------------------------------------------------------------------------------- memory
class CountingSink:
    """Keeps nothing: counts the payload and forwards only the header."""

    def __init__(self) -> None:
        self.n = 0
        self._hdr = b""

    def begin(self, ev: DeviceStatePacket) -> None:
        self._hdr = bytes(ev.raw)

    def data(self, piece: Bytes) -> None:
        self.n += len(piece)

    def end(self) -> Sequence[Bytes]:
        return [self._hdr]


def big_channel(packets: int, full: bytes, devp: bytes) -> Iterator[bytes]:
    yield mk.channel_init(VM, 1)
    for i in range(packets):
        yield full
        if i % 64 == 0:
            yield devp


@pytest.mark.parametrize("zero_copy", [True, False])
def test_memory_stays_constant_over_a_large_channel(zero_copy: bool) -> None:
    packets = 512   # 256 MiB of page data plus 8 device packets of 3 MiB
    full, devp = ram(128, 9), dev(3 << 20, 1)
    tracemalloc.start()
    try:
        sink = CountingSink()
        r = pump(big_channel(packets, full, devp), sink=sink, zero_copy=zero_copy, keep=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert r.error is None
    assert sink.n == 8 * (3 << 20)
    assert r.pump.bytes_in == 64 + packets * len(full) + 8 * len(devp)
    # the reader's chunk, a few of the pump's 1 MiB buffers, the codec's small blocks: not the 280 MiB
    assert peak < 12 << 20, peak
