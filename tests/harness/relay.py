"""Copy one direction of a socket connection to another, as the tests that stand in for the proxy relay QEMU's
migration (tests/multifd/test_multifd_real.py, tests/stream/qemu_now.py); run one thread per direction."""
from __future__ import annotations

import socket
from collections.abc import Callable

CHUNK = 1 << 20


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
