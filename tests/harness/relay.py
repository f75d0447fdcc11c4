"""Copy one direction of a socket connection to another, as the tests that stand in for the proxy relay QEMU's
migration (tests/multifd/test_multifd_real.py, tests/stream/qemu_now.py); run one thread per direction.  And
the accept loop of the tests' listeners (accept_each)."""
from __future__ import annotations

import socket
import threading
from collections.abc import Callable

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
