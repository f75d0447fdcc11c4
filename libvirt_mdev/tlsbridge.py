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
plain stream, and the proxy's parser refuses a stream that is not complete.
"""
from __future__ import annotations

import select
import socket
import ssl
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import ConfigError, ConnectError, UnsupportedStream
from .log import get_logger

log = get_logger("tls")
CHUNK = 1 << 20
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
        ctx.load_cert_chain(self._file("server-cert.pem"), self._file("server-key.pem"))
        ctx.load_verify_locations(self._file("ca-cert.pem"))
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.num_tickets = 0
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """Towards the local QEMU: our client cert; its server cert must name *hostname*."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self._file("client-cert.pem"), self._file("client-key.pem"))
        ctx.load_verify_locations(self._file("ca-cert.pem"))
        return ctx


def _reset(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


class _Bridge:
    """One TLS connection (OpenSSL over memory BIOs, driven by one thread) bridged to
    the plain end of a socketpair that the proxy uses like any socket.

    One thread owns the TLS object, so it is never used concurrently; both directions
    are served by one ``select`` loop.  Writes are blocking ``sendall``: both peers (a
    QEMU, the proxy session) always read their sockets, so they cannot stall us.
    """

    def __init__(self, raw: socket.socket, ctx: ssl.SSLContext, server_side: bool,
                 hostname: Optional[str], what: str) -> None:
        self.raw, self.what = raw, what
        self.plain, self._inner = socket.socketpair()
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = ctx.wrap_bio(self._in, self._out, server_side=server_side, server_hostname=hostname)
        self.version: Optional[str] = None
        #: plain bytes received from the TLS peer
        self.received = 0

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
        if not data:
            self._in.write_eof()
            return False
        self._in.write(data)
        return True

    def start(self) -> socket.socket:
        """Run the handshake (in the caller's thread), then bridge in a new thread.

        Raises:
            ConnectError: the handshake failed; one line with OpenSSL's reason.
        """
        self.raw.settimeout(HANDSHAKE_TIMEOUT)
        try:
            while True:
                try:
                    self._tls.do_handshake()
                    self._flush()
                    break
                except ssl.SSLWantReadError:
                    self._flush()
                    if not self._feed():
                        raise ConnectionAbortedError("the peer closed the connection (does it trust "
                                                     "our certificate's CA?)")
        except (ssl.SSLError, OSError) as exc:
            _reset(self.raw)
            self.plain.close()
            self._inner.close()
            raise ConnectError(f"TLS {self.what}: handshake failed: "
                               f"{' '.join(str(exc).split()) or type(exc).__name__}") from None
        self.raw.settimeout(None)
        self.version = self._tls.version()
        threading.Thread(target=self._run, daemon=True, name=f"libvirt-mdev-tls-{self.what}").start()
        return self.plain

    # -- the loop ---------------------------------------------------------------------------------
    def _run(self) -> None:
        tls_open, plain_open = True, True
        try:
            while tls_open or plain_open:
                watch = [s for s, o in ((self.raw, tls_open), (self._inner, plain_open)) if o]
                ready, _, _ = select.select(watch, [], [])
                if self.raw in ready:
                    tls_open = self._from_tls()
                    if not tls_open and not plain_open:
                        break
                if self._inner in ready:
                    plain_open = self._from_plain()
        except (OSError, ssl.SSLError) as exc:
            log.error(f"TLS {self.what}: {' '.join(str(exc).split())}; resetting the connection")
            _reset(self._inner)
            _reset(self.raw)
            return
        self._inner.close()
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
                if self.received == 0:
                    log.error(f"TLS {self.what}: the peer closed the connection right after the "
                              f"handshake without sending anything: it probably rejected our certificate "
                              f"(a name mismatch? see virsh migrate --tls-destination and --tls-hostname)")
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
        if not data:
            self.raw.shutdown(socket.SHUT_WR)
            return False
        self._tls.write(data)
        self._flush()
        return True


#: first byte of a TLS handshake record (a ClientHello opens every TLS connection)
TLS_HANDSHAKE = 0x16


def refuse_tls(first: bytes | memoryview) -> None:
    """Refuse a connection whose first byte starts a TLS handshake.

    Raises:
        UnsupportedStream: it is TLS (``virsh migrate --tls``): we can neither read
            nor filter it (see SECURITY in the README).
    """
    if len(first) and first[0] == TLS_HANDSHAKE:
        raise UnsupportedStream("this migration uses TLS (virsh migrate --tls): libvirt-mdev "
                                "cannot filter or verify encrypted device state; migrate without "
                                "--tls over the proxies (state is signed instead) or disable the proxy")


def tls_in(sock: socket.socket, creds: Optional[TlsCreds], peer: str) -> socket.socket:
    """Look at the source's first byte before anything else: refuse TLS we cannot read
    (no *creds*), refuse plain text when we serve TLS, else terminate TLS.  Returns the
    socket to read the plain stream from."""
    first = sock.recv(1, socket.MSG_PEEK)
    if creds is None:
        refuse_tls(first)
        return sock
    if first != bytes([TLS_HANDSHAKE]):
        raise UnsupportedStream("the source did not start TLS, but this proxy serves TLS migrations "
                                "(--tls-dir): use virsh migrate --tls")
    return accept_tls(sock, creds, peer)


def accept_tls(conn: socket.socket, creds: TlsCreds, peer: str) -> socket.socket:
    """Terminate the TLS of an accepted source connection; returns the plain end.

    Raises:
        ConnectError: the handshake failed (no or an untrusted client certificate...).
    """
    return _Bridge(conn, creds.server_context(), True, None, f"from {peer}").start()


def connect_tls(raw: socket.socket, creds: TlsCreds) -> socket.socket:
    """Re-originate TLS to the local QEMU over the connected *raw* socket; returns the plain end.

    Raises:
        ConnectError: the handshake failed (QEMU's certificate does not name the host...).
    """
    return _Bridge(raw, creds.client_context(), False, creds.hostname, "to the local QEMU").start()


__all__ = ["TLS_HANDSHAKE", "TlsCreds", "accept_tls", "connect_tls", "refuse_tls", "tls_in"]
