"""TLS migrations (``virsh migrate --tls``): terminate the source's TLS, re-originate it to QEMU.

QEMU's TLS migration (``tls-creds-x509``) is standard TLS with x509 certificates from
libvirt's ``migrate_tls_x509_cert_dir`` (default ``/etc/pki/qemu``)::

    ca-cert.pem                   the CA both hosts trust
    server-cert.pem server-key.pem   presented by the *listening* QEMU (the destination)
    client-cert.pem client-key.pem   presented by the *connecting* QEMU (the source)

So the proxy can stand in for each end with the host's own credentials: towards the
source it is the TLS server (server cert; the source's client cert must chain to the
CA, as QEMU's ``verify-peer`` demands), towards the local QEMU it is the TLS client
(client cert; the QEMU's server cert must chain to the CA and name ``hostname``).
In between, the proxy sees the plain stream and filters it as usual.  Tried with
QEMU 7.2 (GnuTLS) on both ends and Python's ``ssl`` (OpenSSL) here: TLS 1.3.

Why a bridge over a socketpair, not an ``SSLSocket`` in the proxy: the proxy reads the
source and relays the return path in two threads, and one OpenSSL connection must not
be used by two threads at once.  Here each TLS connection is an OpenSSL object over
memory BIOs owned by one thread (a ``select`` loop serving both directions), and the
proxy gets the *plain* end of a socketpair: no change on its side.

Three details that made it work with QEMU:

* no TLS 1.3 session tickets (``num_tickets = 0``): the source QEMU never reads them,
  and a socket closed with unread data sends a reset, which makes the kernel drop
  stream bytes still waiting in *our* receive buffer;
* at the end of the stream the TLS side gets a bare FIN, never a ``close_notify``: the
  destination QEMU stops reading once it has loaded the state and would answer the
  alert with a reset; a FIN also tells the next hop (another proxy) the stream ended;
* a reset or a bare EOF from a TLS peer ends the plain stream like a ``close_notify``:
  whether the stream was complete is decided by the proxy's parser, not by TLS.

Fail closed: a failed handshake or any TLS error closes the plain end with a reset,
so the proxy session aborts both sides; a source that goes away early only ends the
plain stream, and the proxy's parser refuses a stream that is not complete.  When the
session aborts, :meth:`Bridge.abort` resets the TCP side too (the source sees a reset,
as with a plain migration).  Which connections reach this module at all (first byte
``0x16``, within the deadlines) is decided by :mod:`.admission`.
"""
from __future__ import annotations

import select
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ConnectError, MdevError, StreamError
from ..io.sizes import CHUNK
from ..log import get_logger

log = get_logger("tls")
HANDSHAKE_TIMEOUT = 30.0


@dataclass(frozen=True)
class TlsCreds:
    """The host's QEMU migration credentials (libvirt's ``migrate_tls_x509_cert_dir``)."""

    dir: Path
    #: name the local QEMU's server certificate must carry (libvirt passes the same
    #: name to the source QEMU as ``tls-hostname``)
    hostname: str

    def _file(self, name: str) -> str:
        p = self.dir / name
        if not p.is_file():
            raise ConfigError(f"TLS migration credentials: {p} is missing (libvirt's "
                              f"migrate_tls_x509_cert_dir must hold ca-cert.pem, server-cert.pem, "
                              f"server-key.pem, client-cert.pem, client-key.pem)")
        return str(p)

    def server_context(self) -> ssl.SSLContext:
        """Towards the source: our server cert; the source's client cert is required."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self._load(ctx, "server")
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.num_tickets = 0
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """Towards the local QEMU: our client cert; its server cert must name *hostname*."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        self._load(ctx, "client")
        return ctx

    def _load(self, ctx: ssl.SSLContext, role: str) -> None:
        cert, key, ca = self._file(f"{role}-cert.pem"), self._file(f"{role}-key.pem"), self._file("ca-cert.pem")
        try:
            ctx.load_cert_chain(cert, key)
            ctx.load_verify_locations(ca)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"TLS migration credentials in {self.dir}: cannot load {role}-cert.pem, "
                              f"{role}-key.pem or ca-cert.pem: {' '.join(str(exc).split())} (PEM files, the key "
                              f"matching the certificate)") from None

    def check(self) -> None:
        """Load both roles now, so a missing or broken file fails the proxy's start, not a migration.

        Raises:
            ConfigError: one line naming the file.
        """
        self.server_context()
        self.client_context()


def _reset(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


#: OpenSSL's reasons for a client certificate the server side did not accept
_CLIENT_CERT_REASONS = frozenset({"PEER_DID_NOT_RETURN_A_CERTIFICATE", "CERTIFICATE_VERIFY_FAILED",
                                  "TLSV13_ALERT_CERTIFICATE_REQUIRED", "NO_CERTIFICATE_RETURNED"})


class PlainEnd(socket.socket):
    """The proxy's end of a bridge: a UNIX socket that stands for the TLS peer's TCP socket.

    Why: code that owns a connection (a session, :mod:`.channels`) fails it closed with
    :func:`~.relay.abort_socket` — SO_LINGER 0, then close — which on a TCP socket sends a
    reset.  A UNIX socket has no reset: its peer (the bridge) would read a plain EOF and
    end the TLS side with a FIN, which looks like a stream that merely ended.  So here a
    close after SO_LINGER 0 (or a read shutdown after it) resets the bridge's TCP side
    too (:meth:`Bridge.abort`), whoever holds the socket.  A close without it (a normal
    end) stays a FIN.
    """

    def __init__(self, sock: socket.socket, bridge: Bridge) -> None:
        super().__init__(sock.family, sock.type, sock.proto, sock.detach())
        self._bridge = bridge
        self._reset_on_close = False

    def setsockopt(self, *args: Any) -> None:
        level, opt = args[0], args[1]
        if level == socket.SOL_SOCKET and opt == socket.SO_LINGER and isinstance(args[2], bytes):
            on, linger = struct.unpack("ii", args[2])
            self._reset_on_close = bool(on) and linger == 0
        super().setsockopt(*args)

    def shutdown(self, how: int) -> None:
        if self._reset_on_close and how in (socket.SHUT_RD, socket.SHUT_RDWR):
            self._bridge.abort()
        super().shutdown(how)

    def close(self) -> None:
        if self._reset_on_close:
            self._bridge.abort()
        super().close()


class _Aborted(Exception):
    """The session reset the connection: leave the loop through the reset path, quietly."""


class Bridge:
    """One TLS connection (OpenSSL over memory BIOs, driven by one thread) bridged to
    the plain end of a socketpair (:attr:`plain`) that the proxy uses like any socket.

    One thread owns the TLS object, so it is never used concurrently; both directions
    are served by one ``select`` loop.  Writes are blocking ``sendall``: both peers (a
    QEMU, the proxy session) always read their sockets, so they cannot stall us.
    Errors are not logged here: :attr:`error` keeps the one line, and the session
    reports it (one line per refusal).
    """

    def __init__(self, raw: socket.socket, ctx: ssl.SSLContext, server_side: bool,
                 hostname: str | None, what: str, creds: TlsCreds) -> None:
        self.raw, self.what, self.creds, self.server_side = raw, what, creds, server_side
        plain, self._inner = socket.socketpair()
        #: the proxy's end (see :class:`PlainEnd`: a reset-close of it resets the TLS peer)
        self.plain: socket.socket = PlainEnd(plain, self)
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = ctx.wrap_bio(self._in, self._out, server_side=server_side, server_hostname=hostname)
        self.version: str | None = None
        #: plain bytes received from the TLS peer
        self.received = 0
        #: why the bridge reset its connection (one line), if it did
        self.error: str | None = None
        self._aborted = False

    # -- plumbing ---------------------------------------------------------------------------
    def _flush(self) -> None:
        data = self._out.read()
        if data:
            self.raw.sendall(data)

    def _feed(self) -> bool:
        """Move what the TLS peer sent into the incoming BIO; False at its EOF."""
        try:
            data = self.raw.recv(CHUNK)
        except ConnectionResetError:
            data = b""  # QEMU closes with a reset when it leaves bytes unread
        if self._aborted:
            raise _Aborted()
        if not data:
            self._in.write_eof()
            return False
        self._in.write(data)
        return True

    def start(self, timeout: float = HANDSHAKE_TIMEOUT) -> Bridge:
        """Run the handshake (in the caller's thread, within *timeout*), then bridge in a new thread.

        Raises:
            MdevError: the source's client certificate was refused (a refusal);
            ConfigError: the local QEMU's certificate does not carry ``--tls-hostname``;
            ConnectError: the peer went away or the handshake failed otherwise.
        """
        self.raw.settimeout(timeout)
        try:
            while True:
                try:
                    self._tls.do_handshake()
                    self._flush()
                    break
                except ssl.SSLWantReadError:
                    self._flush()
                    if not self._feed():
                        raise ConnectionAbortedError("the peer closed the connection during the handshake "
                                                     "(does it trust the CA of our certificate?)") from None
        except (ssl.SSLError, OSError, _Aborted) as exc:
            _reset(self.raw)
            self.plain.close()
            self._inner.close()
            raise self._handshake_error(exc, timeout) from None
        self.raw.settimeout(None)
        self.version = self._tls.version()
        threading.Thread(target=self._run, daemon=True, name=f"libvirt-mdev-tls-{self.what}").start()
        return self

    def _handshake_error(self, exc: BaseException, timeout: float) -> MdevError:
        text = " ".join(str(exc).split()) or type(exc).__name__
        d = self.creds.dir
        if isinstance(exc, socket.timeout):
            return MdevError(f"TLS {self.what}: the handshake did not complete within {timeout:.3g}s "
                             f"(the proxy's header deadline)")
        if self.server_side and isinstance(exc, ssl.SSLError) and (
                isinstance(exc, ssl.SSLCertVerificationError) or exc.reason in _CLIENT_CERT_REASONS):
            why = getattr(exc, "verify_message", None) or exc.reason or text
            return MdevError(f"TLS {self.what}: handshake failed: the source's client certificate was refused "
                             f"({why}); it must be signed by {d}/ca-cert.pem (libvirt's "
                             f"migrate_tls_x509_cert_dir on the source holds client-cert.pem)")
        if not self.server_side and isinstance(exc, ssl.SSLCertVerificationError):
            return ConfigError(f"TLS {self.what}: handshake failed: the local QEMU's server certificate was "
                               f"refused ({exc.verify_message}); with --tls-hostname {self.creds.hostname}, "
                               f"{d}/server-cert.pem must name {self.creds.hostname} and be signed by "
                               f"{d}/ca-cert.pem (pass the name it carries with --tls-hostname)")
        return ConnectError(f"TLS {self.what}: handshake failed: {text}")

    # -- ending, from the session's thread --------------------------------------------------------
    def abort(self) -> None:
        """Reset the TLS peer's TCP connection too (the session failed).  Wakes the loop
        with ``SHUT_RD`` (sends nothing); the loop then closes with a reset."""
        self._aborted = True
        try:
            self.raw.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    # -- the loop ---------------------------------------------------------------------------------
    def _run(self) -> None:
        tls_open, plain_open = True, True
        try:
            while tls_open or plain_open:
                watch = [s for s, o in ((self.raw, tls_open), (self._inner, plain_open)) if o]
                ready, _, _ = select.select(watch, [], [])
                if self._aborted:
                    raise _Aborted()
                if self.raw in ready:
                    tls_open = self._from_tls()
                    if not tls_open and not plain_open:
                        break
                if self._inner in ready:
                    plain_open = self._from_plain()
        except (OSError, ssl.SSLError, _Aborted) as exc:
            if not isinstance(exc, _Aborted) and not self._aborted:
                self.error = f"TLS {self.what}: {' '.join(str(exc).split()) or type(exc).__name__}"
            _reset(self._inner)
            _reset(self.raw)
            return
        self._inner.close()
        # a normal end: a FIN, not the reset a kill -9 would send (SO_LINGER 0 from accept/connect)
        try:
            self.raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 0, 0))
        except OSError:
            pass
        self.raw.close()

    def _from_tls(self) -> bool:
        """TLS peer → plain.  False once the TLS peer has ended (then so does the plain side)."""
        more = self._feed()
        while True:
            try:
                data = self._tls.read(CHUNK)
            except ssl.SSLWantReadError:
                self._flush()  # a key update or alert may need an answer
                if more:
                    return True
                data = b""
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                data = b""  # close_notify, or a bare EOF: the proxy's parser judges completeness
            if not data:
                try:
                    self._inner.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return False
            self.received += len(data)
            self._inner.sendall(data)

    def _from_plain(self) -> bool:
        """plain → TLS peer.  At the proxy's EOF: a bare FIN, never a close_notify (QEMU
        would not read the alert and would answer it with a reset)."""
        data = self._inner.recv(CHUNK)
        if self._aborted:
            raise _Aborted()
        if not data:
            self.raw.shutdown(socket.SHUT_WR)
            return False
        self._tls.write(data)
        self._flush()
        return True


#: first byte of a TLS handshake record (a ClientHello opens every TLS connection)
TLS_HANDSHAKE = 0x16


def read_header(bridge: Bridge, deadline: float, header_timeout: float, *, side_channel_len: int = 0,
                mode: str = "splice") -> bytes:
    """The first bytes behind a terminated TLS, by *deadline* (monotonic): the 8-byte QEMU
    file header, or — when the proxy serves multifd side channels (*side_channel_len*, the
    channel init's size) and the first 4 bytes are the multifd magic — the whole channel
    init, under the same deadline (QEMU runs TLS on each multifd channel separately).

    Raises:
        MdevError: the deadline passed, the source closed right after the handshake (it
            rejected our certificate: the one line says which name it needs), or the
            bytes are no QEMU file header (nor a channel init this proxy serves; the
            line names *mode*).
    """
    from .admission import MULTIFD_FIRST, header_problem
    from .limits import HEADER_LEN

    buf = _read_behind_tls(bridge, HEADER_LEN, deadline, header_timeout, b"")
    if side_channel_len and buf[:4] == MULTIFD_FIRST:
        return _read_behind_tls(bridge, side_channel_len, deadline, header_timeout, buf)
    problem = header_problem(buf, mode=mode, tls=True)
    if problem is not None:
        raise problem
    return buf


def _read_behind_tls(bridge: Bridge, want: int, deadline: float, header_timeout: float, buf: bytes) -> bytes:
    """*want* bytes of the plain stream (*buf*: those read already), by *deadline*."""
    plain = bridge.plain
    what = "QEMU file header" if not buf else "complete multifd channel init"
    try:
        while len(buf) < want:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError()
            plain.settimeout(left)
            chunk = plain.recv(want - len(buf))
            if not chunk:
                break
            buf += chunk
    except TimeoutError:
        got = f" ({len(buf)} of its {want} bytes)" if buf else ""
        raise MdevError(f"TLS {bridge.what}: no {what} within {header_timeout:g}s of connecting{got} "
                        f"(the proxy's header deadline)") from None
    finally:
        plain.settimeout(None)
    if len(buf) < want:
        if bridge.error:
            raise MdevError(bridge.error)
        if bridge.received == 0:
            raise MdevError(f"TLS {bridge.what}: the source closed the connection right after the TLS handshake "
                            f"without sending anything: it probably rejected our certificate because "
                            f"{bridge.creds.dir}/server-cert.pem does not carry the name it checks (libvirt "
                            f"checks the host of --migrateuri, or the name given with virsh migrate "
                            f"--tls-destination NAME; an IP address in --migrateuri needs that IP address in "
                            f"the certificate's subjectAltName)")
        raise StreamError(f"the source closed the connection after {len(buf)} bytes, inside the "
                          f"{what.removeprefix('complete ')} (TLS)")
    return buf


def accept_tls(conn: socket.socket, creds: TlsCreds, peer: str, timeout: float = HANDSHAKE_TIMEOUT) -> Bridge:
    """Terminate the TLS of an accepted source connection; read the plain stream from
    the returned bridge's :attr:`~Bridge.plain`.

    Raises:
        MdevError / ConnectError: the handshake failed (see :meth:`Bridge.start`).
    """
    return Bridge(conn, creds.server_context(), True, None, f"from {peer}", creds).start(timeout)


def connect_tls(raw: socket.socket, creds: TlsCreds) -> Bridge:
    """Re-originate TLS to the local QEMU over the connected *raw* socket.

    Raises:
        ConfigError / ConnectError: the handshake failed (see :meth:`Bridge.start`).
    """
    return Bridge(raw, creds.client_context(), False, creds.hostname, "to the local QEMU", creds).start()


__all__ = ["TLS_HANDSHAKE", "Bridge", "PlainEnd", "TlsCreds", "accept_tls", "connect_tls", "read_header"]
