"""Copy one direction of a socket connection to another, as the tests that stand in for the proxy relay QEMU's
migration (tests/multifd/test_multifd_real.py, tests/stream/qemu_now.py); run one thread per direction.  And
the accept loop of the tests' listeners (accept_each), and SideChannelInjector, the network path that puts a
device-state packet on a real QEMU's first multifd side channel."""
from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from pathlib import Path

from libvirt_mdev.stream.multifd import INIT, is_multifd_channel

CHUNK = 1 << 20


def accept_each(sock: socket.socket, handle: Callable[[socket.socket], object]) -> None:
    """From a daemon thread, hand every connection accepted on the listening *sock* to *handle* (called in that
    thread), until *sock* is closed."""
    def run() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            handle(conn)

    threading.Thread(target=run, daemon=True).start()


def pump(src: socket.socket, dst: socket.socket, keep: Callable[[bytes], object] | None = None) -> None:
    """Send everything *src* receives on to *dst* (handing each piece to *keep* first), then shut *dst*'s
    sending side so the peer sees the end; a connection error simply ends the copy."""
    try:
        while data := src.recv(CHUNK):
            if keep is not None:
                keep(data)
            dst.sendall(data)
    except OSError:
        pass
    finally:
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass


class SideChannelInjector:
    """The path from a source QEMU to what it migrates to: relays every connection both ways and, right after
    the 64-byte init of the first multifd side channel, inserts *packet* (a packet boundary, QEMU's exact
    framing).  Listens on loopback TCP (``port``) or, with *listen*, on that UNIX socket; *forward* is a TCP
    port or a UNIX socket path.  *cut_both*: when either direction ends, both connections are shut (as TCP to
    a dead peer ends, so the source sees its migration fail); else only the receiving side's sending half.
    Every connection comes from this process: a proxy that looks at its peer (SO_PEERCRED) sees one process,
    as it would see the one QEMU."""

    def __init__(self, forward: int | Path, packet: bytes, *, listen: Path | None = None,
                 cut_both: bool = False) -> None:
        self.forward, self.packet, self.cut_both = forward, packet, cut_both
        self.injected = threading.Event()
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        if listen is None:
            self.sock = socket.create_server(("127.0.0.1", 0))
        else:
            self.sock = socket.socket(socket.AF_UNIX)
            self.sock.bind(str(listen))
            self.sock.listen(8)
        self.port = self.sock.getsockname()[1] if listen is None else 0
        accept_each(self.sock, self._relay)

    def _connect(self) -> socket.socket:
        if isinstance(self.forward, int):
            return socket.create_connection(("127.0.0.1", self.forward))
        up = socket.socket(socket.AF_UNIX)
        up.connect(str(self.forward))
        return up

    def _relay(self, conn: socket.socket) -> None:
        try:
            up = self._connect()
        except OSError:
            conn.close()
            return
        if self.cut_both:  # else a connection lives as long as its copying threads (then it is closed)
            with self._lock:
                self._conns += [conn, up]
        threading.Thread(target=self._copy, args=(conn, up, True), daemon=True).start()
        threading.Thread(target=self._copy, args=(up, conn, False), daemon=True).start()

    def _copy(self, src: socket.socket, dst: socket.socket, from_source: bool) -> None:
        try:
            if from_source:
                head = b""
                while len(head) < INIT.size and (data := src.recv(INIT.size - len(head))):
                    head += data
                dst.sendall(head)
                with self._lock:
                    first = is_multifd_channel(head[:4]) and not self.injected.is_set()
                    if first:
                        self.injected.set()
                if first:
                    dst.sendall(self.packet)
            if not self.cut_both:
                pump(src, dst)
                return
            while data := src.recv(CHUNK):
                dst.sendall(data)
        except OSError:
            if not self.cut_both:
                return
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.sock.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            c.close()
