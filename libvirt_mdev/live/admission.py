"""The proxy's front door: accept connections and hold them until they have proved to be a
migration stream, in one thread, with bounded cost (see :mod:`.limits`).

Why a separate stage: before this, every accepted connection got a thread that blocked
until it sent something, so idle connections cost a thread each, a flood of them ran the
process out of file descriptors (and the accept loop died on ``EMFILE``), and a peer
dripping one byte per second was "the" connection of the armed migration while the real
source was refused as a second one.  Here:

* one ``selectors`` loop holds every *unarmed* connection (non-blocking, no thread);
* a connection is handed to a session — and so bound to the armed migration — only
  once its first 8 bytes are a QEMU file header (``QEVM``, version 3), or once its first
  byte starts a TLS handshake on a proxy that terminates TLS (the session then reads the
  header behind TLS, within the same deadline);
* deadlines: nothing within ``first_bytes_timeout`` of the accept, or no complete header
  within ``header_timeout``: reset;
* at most ``unarmed_cap()`` unarmed connections: the oldest is reset to make room, so a
  flood costs the flooder, never the next real source (which sends its header at once);
* ``EMFILE``/``ENFILE`` on accept: reset the oldest unarmed connection and accept again;
  with none to shed, pause accepting for a moment (the kernel keeps queueing) and go on.
  The loop never exits on an accept error.

A multifd side channel (``virsh migrate --parallel``: first bytes ``11 22 33 44``) is
held the same way until its whole channel-init message (64 bytes: the VM's uuid and the
channel id) has arrived, then handed to :mod:`.channels` (filtering modes) or
:mod:`.signchannels` (``--mode sign``); a proxy that serves none refuses it here, in a
line naming its mode.  A relay hands every connection on at its first byte; a TLS proxy
at its first byte too (the session finds a side channel behind TLS).

Everything refused here is reset (SO_LINGER 0) and logged in one line.
"""
from __future__ import annotations

import errno
import selectors
import socket
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import MdevError, StreamError, UnsupportedStream
from ..log import get_logger
from ..stream.multifd import INIT as MULTIFD_INIT
from ..stream.wire import QEMU_VM_FILE_MAGIC, QEMU_VM_FILE_VERSION
from .limits import HEADER_LEN, ProxyLimits
from .relay import abort_socket, reset_on_close, tune

log = get_logger("proxy")

#: first byte of a TLS handshake record (a ClientHello opens every TLS connection)
TLS_HANDSHAKE = 0x16
#: magic of QEMU's multifd channel handshake (``MultiFDInit_t``): --parallel
MULTIFD_MAGIC = 0x11223344
#: accepts per wake-up, so a flood cannot starve the deadline checks
ACCEPT_BATCH = 64
#: how long to stop accepting when file descriptors are exhausted and nothing can be shed
EMFILE_PAUSE = 0.1
_FD_EXHAUSTED = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


@dataclass(eq=False)
class Greeting:
    """One accepted connection that is not bound to anything yet."""

    sock: socket.socket
    peer: str
    accepted: float
    buf: bytearray = field(default_factory=bytearray)


#: called with (socket, peer, header bytes already read, accept time, tls) for a connection
#: that passed the admission; it owns the socket from then on
OnAdmitted = Callable[[socket.socket, str, bytes, float, bool], None]
#: called with (peer, why) for a connection refused here (already reset and logged)
OnRefused = Callable[[str, MdevError], None]
#: called with (socket, peer, the 64-byte multifd channel init, accept time) for a multifd
#: side channel; it owns the socket from then on
OnSideChannel = Callable[[socket.socket, str, bytes, float], None]
#: the first 4 bytes of a multifd side channel
MULTIFD_FIRST = struct.pack(">I", MULTIFD_MAGIC)


def header_problem(head: bytes, *, mode: str = "splice", tls: bool = False) -> StreamError | None:
    """Why the 8 bytes *head* are not a QEMU file header (None when they are).  A multifd
    side channel reaches this only on a proxy that does not serve side channels: the line
    names its *mode* (and TLS), the setup that lacks them."""
    magic, version = struct.unpack(">II", head)
    if magic == MULTIFD_MAGIC:
        setup = f"--mode {mode}" + (" with --tls-dir" if tls else "")
        return UnsupportedStream(f"this is a multifd side channel (virsh migrate --parallel) and this proxy "
                                 f"({setup}) does not serve side channels; migrate without --parallel")
    if magic != QEMU_VM_FILE_MAGIC:
        return StreamError(f"not a QEMU migration stream (first bytes {bytes(head[:4]).hex()}, expected 'QEVM')")
    if version != QEMU_VM_FILE_VERSION:
        return UnsupportedStream(f"QEMU file version {version} is not supported (expected {QEMU_VM_FILE_VERSION})")
    return None


def tls_refusal(serving_tls: bool) -> UnsupportedStream:
    """The refusal of a TLS stream by a proxy without credentials, or of a plain one by a
    proxy that serves TLS: each names the option that fixes it."""
    if serving_tls:
        return UnsupportedStream("the source did not start TLS, but this proxy serves TLS migrations "
                                 "(--tls-dir): use virsh migrate --tls, or run the proxy without --tls-dir")
    return UnsupportedStream("this migration uses TLS (virsh migrate --tls) and this proxy does not terminate "
                             "TLS: start it with --tls-dir DIR (libvirt's migrate_tls_x509_cert_dir, normally "
                             "/etc/pki/qemu), or migrate without --tls")


class Admission:
    """The accept loop and the unarmed connections (one thread: :meth:`run`)."""

    def __init__(self, listener: socket.socket, limits: ProxyLimits, on_admitted: OnAdmitted,
                 on_refused: OnRefused, *, relay: bool, tls: bool, stop: threading.Event,
                 on_side_channel: OnSideChannel | None = None, mode: str = "splice") -> None:
        """*on_side_channel*: where multifd side channels go (None: they are refused here,
        in a line naming *mode*)."""
        self.listener, self.limits = listener, limits
        self.on_side_channel = on_side_channel
        self.on_admitted, self.on_refused = on_admitted, on_refused
        self.relay, self.tls, self.stop = relay, tls, stop
        self.mode = mode
        self.cap = limits.unarmed_cap()
        #: unarmed connections, oldest first
        self.unarmed: OrderedDict[int, Greeting] = OrderedDict()
        self._sel = selectors.DefaultSelector()
        self._paused_until = 0.0
        self._listening = False
        #: counters (tests, the final log line)
        self.shed = 0
        self.expired = 0
        self.fd_exhausted = 0
        self._last_warning: dict[str, float] = {}

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> None:
        self.listener.setblocking(False)
        self._listen(True)
        try:
            while not self.stop.is_set():
                now = time.monotonic()
                if not self._listening and now >= self._paused_until:
                    self._listen(True)
                for key, _ in self._sel.select(self._timeout(now)):
                    if key.data is None:
                        self._accept_batch()
                    elif (g := self.unarmed.get(key.fd)) is not None and g is key.data:  # not shed meanwhile
                        self._readable(g)
                self._expire(time.monotonic())
        finally:
            for g in list(self.unarmed.values()):
                self._drop(g)
            self._listen(False)
            self._sel.close()

    def _listen(self, on: bool) -> None:
        if on and not self._listening:
            self._sel.register(self.listener, selectors.EVENT_READ, None)
        elif not on and self._listening:
            self._sel.unregister(self.listener)
        self._listening = on

    def _timeout(self, now: float) -> float:
        t = 0.2  # also how soon a stop request is noticed
        if self.unarmed:
            oldest = next(iter(self.unarmed.values()))
            t = min(t, max(0.0, oldest.accepted + self.limits.first_bytes_timeout - now))
        if not self._listening:
            t = min(t, max(0.0, self._paused_until - now))
        return t

    # -- accepting ------------------------------------------------------------------------------
    def _accept_batch(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _FD_EXHAUSTED:
                    self.fd_exhausted += 1
                    if not self._shed(f"out of file descriptors ({exc.strerror})", "fds"):
                        self._pause(exc)
                        return
                    continue
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue  # the peer gave up between SYN and accept: nothing to do
                if self.stop.is_set():
                    return
                self._warn(f"accept failed: {exc.strerror or exc}; still accepting")
                return
            self._admit(conn, _peer(addr))

    def _admit(self, conn: socket.socket, peer: str) -> None:
        conn.setblocking(False)
        reset_on_close(conn)
        tune(conn)
        if len(self.unarmed) >= self.cap:
            self._shed(f"{len(self.unarmed)} connections without a QEMU header (the cap)", "cap")
        g = Greeting(conn, peer, time.monotonic())
        self.unarmed[conn.fileno()] = g
        self._sel.register(conn, selectors.EVENT_READ, g)
        self._readable(g)  # the header is often already here: bind before anything can shed it

    def _shed(self, why: str, kind: str) -> bool:
        """Reset the oldest unarmed connection.  False when there is none."""
        if not self.unarmed:
            return False
        g = next(iter(self.unarmed.values()))
        self.shed += 1
        self._warn(f"{why}: resetting the oldest one ({g.peer}, {time.monotonic() - g.accepted:.1f}s old, "
                   f"{len(g.buf)} header bytes)", kind)
        self._drop(g)
        return True

    def _pause(self, exc: OSError) -> None:
        self._warn(f"accept: {exc.strerror}, and no unarmed connection to shed; pausing accepts for "
                   f"{EMFILE_PAUSE:g}s (raise LimitNOFILE)", "pause")
        self._paused_until = time.monotonic() + EMFILE_PAUSE
        self._listen(False)

    def _warn(self, text: str, kind: str = "") -> None:
        """Warnings about floods, at most one per second and *kind* (a flood must not
        flood the log)."""
        now = time.monotonic()
        kind = kind or text.split(":", 1)[0]
        if now - self._last_warning.get(kind, 0.0) >= 1.0:
            self._last_warning[kind] = now
            log.warning(text)

    # -- reading the header ----------------------------------------------------------------------
    def _readable(self, g: Greeting) -> None:
        try:
            if not g.buf:
                first = g.sock.recv(1, socket.MSG_PEEK)
                if not first:
                    self._drop(g)  # connected and closed: a port probe
                    return
                if self.relay:  # relay mode carries anything (even TLS) verbatim
                    self._hand_off(g, tls=False)
                    return
                if (first[0] == TLS_HANDSHAKE) != self.tls:
                    self._refuse(g, tls_refusal(self.tls))
                    return
                if self.tls:
                    self._hand_off(g, tls=True)
                    return
            data = g.sock.recv(self._want(g) - len(g.buf))
        except BlockingIOError:
            return
        except OSError as exc:
            log.info(f"{g.peer}: connection ended before its QEMU header: {exc.strerror or exc}")
            self._drop(g)
            return
        if not data:
            self._refuse(g, StreamError(f"the connection closed after {len(g.buf)} bytes, inside the "
                                        f"{self._what(g)}"))
            return
        g.buf += data
        want = self._want(g)
        if len(g.buf) < want:
            if len(g.buf) == HEADER_LEN:  # a side channel: its init is usually here already
                self._readable(g)
            return
        if want > HEADER_LEN:
            assert self.on_side_channel is not None
            self._forget(g)
            g.sock.setblocking(True)
            self.on_side_channel(g.sock, g.peer, bytes(g.buf), g.accepted)
            return
        problem = header_problem(bytes(g.buf), mode=self.mode, tls=self.tls)
        if problem:
            self._refuse(g, problem)
        else:
            self._hand_off(g, tls=False)

    def _want(self, g: Greeting) -> int:
        """How many first bytes bind *g*: the QEMU file header, or a side channel's init."""
        if self.on_side_channel is not None and g.buf[:4] == MULTIFD_FIRST:
            return MULTIFD_INIT.size
        return HEADER_LEN

    def _what(self, g: Greeting) -> str:
        return "multifd channel init" if self._want(g) > HEADER_LEN else "QEMU file header"

    def _hand_off(self, g: Greeting, tls: bool) -> None:
        self._forget(g)
        g.sock.setblocking(True)
        self.on_admitted(g.sock, g.peer, bytes(g.buf), g.accepted, tls)

    # -- deadlines and endings --------------------------------------------------------------------
    def _expire(self, now: float) -> None:
        lim = self.limits
        for g in list(self.unarmed.values()):
            age = now - g.accepted
            if not g.buf and age >= lim.first_bytes_timeout:
                why = f"sent nothing within {lim.first_bytes_timeout:g}s of connecting (the first-bytes deadline)"
            elif age >= lim.header_timeout:
                why = (f"sent {len(g.buf)} of the {self._want(g)} bytes of the {self._what(g)} within "
                       f"{lim.header_timeout:g}s (the header deadline)")
            else:
                continue
            self.expired += 1
            self._warn(f"{g.peer}: connection cut, reset: {why}", "deadline")
            self._drop(g)

    def _refuse(self, g: Greeting, why: MdevError) -> None:
        log.error(f"{g.peer}: connection REFUSED, reset: {why.message}")
        self._drop(g)
        self.on_refused(g.peer, why)

    def _forget(self, g: Greeting) -> None:
        self.unarmed.pop(g.sock.fileno(), None)
        try:
            self._sel.unregister(g.sock)
        except (KeyError, ValueError):
            pass

    def _drop(self, g: Greeting) -> None:
        self._forget(g)
        abort_socket(g.sock)


def _peer(addr: object) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"{addr[0]}:{addr[1]}"
    return f"unix:{addr or '?'}"


__all__ = ["MULTIFD_FIRST", "MULTIFD_MAGIC", "TLS_HANDSHAKE", "Admission", "Greeting", "header_problem"]
