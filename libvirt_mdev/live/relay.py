"""Socket plumbing for the migration proxy: addresses, big-buffer reads, gathered sends.

Why a module of its own: :mod:`libvirt_mdev.live.proxy` decides *what* may pass (which
domain, which device, when to stop); this module only moves bytes, and moves them
cheaply, because a live migration is GBs of RAM pages and every extra copy or
syscall per page shows up in QEMU's ``total-time``:

* reads go into a small pool of reusable 1 MiB buffers (``recv_into``), the way
  :class:`libvirt_mdev.io.drive.ChunkReader` does for files: the parser keeps
  zero-copy views into a chunk until it has consumed it, so a buffer is reused only
  when nobody holds a view of it any more;
* everything the filter emits for one chunk is collected as views and sent with one
  ``sendmsg`` (scatter/gather): one syscall per chunk, no joining, no copies;
* socket buffers are raised (``SO_RCVBUF``/``SO_SNDBUF``) so the kernel keeps both
  QEMUs busy while Python parses;
* the destination→source direction (QEMU's return path: a few bytes) is relayed
  verbatim by a plain thread.
"""
from __future__ import annotations

import errno
import os
import select
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..errors import ConnectError, MdevError, UsageError
from ..io.drive import BufferPool
from ..io.sizes import CHUNK
from ..stream.events import Bytes

#: requested socket buffer size (the kernel caps it at net.core.{r,w}mem_max)
SOCK_BUF = 4 << 20
#: sendmsg takes at most IOV_MAX (1024 on Linux) buffers per call
IOV_MAX = 1024



@dataclass(frozen=True)
class Endpoint:
    """``HOST:PORT`` (TCP; ``[v6]:PORT`` for IPv6) or ``unix:PATH``."""

    host: str | None = None
    port: int | None = None
    path: str | None = None

    @classmethod
    def parse(cls, text: str, what: str = "address") -> Endpoint:
        """Parse an address given on the command line or in the configuration.

        Raises:
            UsageError: not ``HOST:PORT`` or ``unix:PATH``.
        """
        t = text.strip()
        if t.startswith("unix:"):
            path = t[5:]
            if path.startswith("//"):  # libvirt's URI form unix:///run/x.sock
                path = path[2:]
            if not path.startswith("/"):
                raise UsageError(f"{what} {text!r}: a unix socket path must be absolute (unix:/run/...)")
            return cls(path=path)
        host, sep, port = t.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise UsageError(f"{what} {text!r} is not HOST:PORT or unix:PATH")
        if host.startswith("[") and host.endswith("]"):
            host = host[1:-1]
        return cls(host=host, port=int(port))

    @property
    def is_unix(self) -> bool:
        return self.path is not None

    def family(self) -> int:
        if self.is_unix:
            return socket.AF_UNIX
        return socket.AF_INET6 if self.host and ":" in self.host else socket.AF_INET

    def sockaddr(self) -> str | tuple[str, int]:
        if self.is_unix:
            assert self.path is not None
            return self.path
        assert self.host is not None and self.port is not None
        return (self.host, self.port)

    def __str__(self) -> str:
        if self.is_unix:
            return f"unix:{self.path}"
        return f"[{self.host}]:{self.port}" if self.host and ":" in self.host else f"{self.host}:{self.port}"


def tune(sock: socket.socket) -> None:
    """Large kernel buffers; no Nagle delay for the small return-path messages."""
    for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, SOCK_BUF)
        except OSError:
            pass
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


#: listen backlog: connections the kernel queues while the accept loop is busy; a flood
#: of connects must not make the real source's SYN wait for a retransmission (1 s, 3 s...)
BACKLOG = 1024


def listen(ep: Endpoint, backlog: int = BACKLOG) -> socket.socket:
    """A listening socket on *ep*.  A stale unix socket file is replaced (only a
    socket: any other file at that path is refused), and the new one is 0600."""
    sock = socket.socket(ep.family(), socket.SOCK_STREAM)
    try:
        if ep.is_unix:
            assert ep.path is not None
            _remove_stale_socket(ep.path)
            old = os.umask(0o177)
            try:
                sock.bind(ep.path)
            finally:
                os.umask(old)
        else:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(ep.sockaddr())
        tune(sock)  # inherited by accepted sockets, so the window is large from the SYN
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise ConnectError(f"cannot listen on {ep}: {exc.strerror or exc}") from None
    return sock


def _remove_stale_socket(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConnectError(f"cannot listen on unix:{path}: a file that is not a socket is in the way")
    os.unlink(path)


def listening_from_systemd() -> socket.socket | None:
    """The socket systemd passed us (``LISTEN_FDS``/``LISTEN_PID``, fd 3), if any."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    if int(os.environ.get("LISTEN_FDS", "0") or 0) < 1:
        return None
    sock = socket.socket(fileno=3)
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    return sock


def connect(ep: Endpoint, timeout: float, stop: threading.Event | None = None) -> socket.socket:
    """Connect to the local QEMU, retrying while it does not listen yet (libvirt issues
    ``migrate-incoming`` a moment after the source may already have dialled us).

    Raises:
        ConnectError: still refused (or the path still missing) after *timeout* seconds.
    """
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        sock = socket.socket(ep.family(), socket.SOCK_STREAM)
        tune(sock)
        try:
            sock.connect(ep.sockaddr())
            reset_on_close(sock)
            return sock
        except OSError as exc:
            sock.close()
            retry = exc.errno in (errno.ECONNREFUSED, errno.ENOENT, errno.EAGAIN)
            if not retry or time.monotonic() + delay > deadline or (stop is not None and stop.is_set()):
                raise ConnectError(f"cannot connect to the local QEMU at {ep}: {exc.strerror or exc} "
                                   f"(waited {timeout:g}s); is the incoming migration started "
                                   f"(--listen-address 127.0.0.1)?") from None
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


@dataclass(frozen=True)
class Progress:
    """The progress deadline: at least *min_bytes* in every window of *window* seconds.

    Why a rate and not an idle timeout (nginx's ``client_body_timeout``): a peer that
    sends one byte per second is never idle, yet holds the armed migration for ever.
    """

    window: float
    min_bytes: int


class ProgressTimeout(MdevError):
    """The source sent too little for too long (a slow-loris peer, or a stalled QEMU):
    a refusal (the connection is cut), not a transport failure."""


class SocketReader:
    """``recv_into`` reusable chunk buffers (see the module docstring).

    *prefix* is what the admission stage already consumed (the QEMU file header): it is
    returned first.  With *progress*, a read that would break the progress deadline
    raises :class:`ProgressTimeout` instead of waiting longer.
    """

    def __init__(self, sock: socket.socket, size: int = CHUNK, *, prefix: bytes = b"",
                 progress: Progress | None = None) -> None:
        self._sock = sock
        self._pool = BufferPool(size)
        self._prefix = prefix
        self._progress = progress
        self._window_start = time.monotonic()
        self._window_bytes = 0
        self._poll = select.poll() if progress is not None else None
        if self._poll is not None:
            self._poll.register(sock.fileno(), select.POLLIN)

    def read(self) -> memoryview:
        """What the peer has sent so far (at least one byte), or empty at its EOF."""
        if self._prefix:
            data, self._prefix = self._prefix, b""
            return memoryview(data)
        if self._progress is not None:
            self._wait(self._progress)
        buf = self._pool.get()
        with memoryview(buf) as view:
            n = self._sock.recv_into(view)
        self._window_bytes += n
        return memoryview(buf)[:n]

    def credit(self, n: int) -> None:
        """Count *n* bytes that arrived on another connection of the same migration as
        progress (multifd: RAM travels on the side channels while the main one idles).
        Any thread; read at the next window check."""
        self._window_bytes += n

    def _wait(self, p: Progress) -> None:
        """Block until readable, but not past the end of a window that is short of bytes."""
        assert self._poll is not None
        while True:
            now = time.monotonic()
            if self._window_bytes >= p.min_bytes:  # enough in this window: start the next one
                self._window_start, self._window_bytes = now, 0
            left = self._window_start + p.window - now
            if left <= 0:
                raise ProgressTimeout(f"the source sent {self._window_bytes} bytes in the last {p.window:g}s "
                                      f"(the progress deadline asks for {p.min_bytes} bytes per {p.window:g}s): "
                                      f"cut as a stalled or slow-loris connection (proxy --progress-timeout)")
            if self._poll.poll(max(1, int(left * 1000))):
                return


def send_views(sock: socket.socket, views: Sequence[Bytes], flags: int = 0) -> int:
    """Send every byte of *views*, in order, with as few ``sendmsg`` calls as the
    kernel allows (*flags*: e.g. ``MSG_MORE`` when more bytes follow at once by another
    route, so the kernel need not push a short segment).  Returns the number of bytes sent."""
    pending = [v for v in views if len(v)]
    total = 0
    while pending:
        batch = pending[:IOV_MAX]
        n = sock.sendmsg(batch, [], flags)
        total += n
        # drop what went out; keep the unsent tail of a partly sent buffer
        i = 0
        while i < len(batch) and n >= len(batch[i]):
            n -= len(batch[i])
            i += 1
        rest = pending[i:]
        if n:
            rest[0] = memoryview(rest[0])[n:]
        pending = rest
    return total


_LINGER_RESET = struct.pack("ii", 1, 0)
_LINGER_OFF = struct.pack("ii", 0, 0)


def reset_on_close(sock: socket.socket, on: bool = True) -> None:
    """Make any close of *sock* — ours, or the kernel's when this process is killed
    (``kill -9``) — send a reset (SO_LINGER 0) instead of a FIN.

    A TCP connection that ends with a FIN looks like a stream that merely ended; only a
    reset tells the destination QEMU for certain that the migration failed.  A session
    that completes turns it off (``on=False``) before it closes normally.  No-op on
    UNIX sockets (they have no reset: a killed peer's end reads EOF)."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET if on else _LINGER_OFF)
    except OSError:
        pass


def abort_socket(sock: socket.socket | None) -> None:
    """Close *sock* at once with a reset (SO_LINGER 0), waking a thread blocked reading it.

    A reset rather than a FIN: the peer must see a failed connection, never a stream
    that merely ended."""
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        # SHUT_RD wakes a thread blocked in recv on it without sending a FIN; the close
        # then sends the reset
        sock.shutdown(socket.SHUT_RD)
    except OSError:
        pass
    try:
        sock.close()
    except OSError:
        pass


class ReturnPath(threading.Thread):
    """Relays destination→source bytes verbatim until the destination closes.

    On the destination's EOF it half-closes the source (``SHUT_WR``) so QEMU sees the
    return path end; on any socket error it calls *on_error* (the session aborts).

    It waits in ``poll`` for POLLIN, not in a blocking ``recv``: the kernel wakes a
    blocked reader of a socket each time the socket's send buffer drains (the wait queue
    is shared), and the forwarding thread keeps that buffer draining, so a reader
    blocked in ``recv`` was woken for nothing about once per 512 KiB multifd packet
    (measured: ~2300 wake-ups and 0.12-0.16 CPU-s per GiB, bench/bench_proxy.py); a
    poll for POLLIN sleeps through those wake-ups.  ``abort_socket``'s SHUT_RD still
    wakes it (the socket reads as ended).
    """

    def __init__(self, dst: socket.socket, src: socket.socket, on_error: Callable[[str], None]) -> None:
        super().__init__(name="libvirt-mdev-return-path", daemon=True)
        self._dst, self._src = dst, src
        self._on_error = on_error
        self.bytes = 0
        self.eof = False

    def run(self) -> None:
        buf = bytearray(1 << 16)
        view = memoryview(buf)
        try:
            waiter = select.poll()
            waiter.register(self._dst, select.POLLIN)
            # a TLS socket (ssl.SSLSocket) may hold decrypted bytes the kernel no longer shows
            pending: Callable[[], int] = getattr(self._dst, "pending", lambda: 0)
            while True:
                if not pending():
                    waiter.poll()  # readable, ended, reset or closed: recv says which
                n = self._dst.recv_into(view)
                if n == 0:
                    self.eof = True
                    try:
                        self._src.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    return
                self._src.sendall(view[:n])
                self.bytes += n
        except OSError as exc:
            self._on_error(f"return path (destination to source): {exc.strerror or exc}")
