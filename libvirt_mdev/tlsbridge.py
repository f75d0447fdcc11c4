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
be used by two threads at once.  Here each TLS connection lives in its own asyncio
loop (one thread, memory-BIO based), and the proxy gets the *plain* end of a
socketpair, unchanged code on its side.

Two details that made it work with QEMU:

* no TLS 1.3 session tickets (``num_tickets = 0``): QEMU never reads them, and a
  socket closed with unread data sends a reset that destroys data still in flight;
* towards the local QEMU no ``close_notify`` is sent when the stream ends: the
  destination QEMU closes the connection itself once it has loaded the state (it
  does not read an alert, and would answer it with a reset).

Fail closed: a failed handshake or any TLS error closes the plain end with a reset,
so the proxy session aborts both sides; a source that goes away early only ends the
plain stream, and the proxy's parser refuses a stream that is not complete.
"""
from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .errors import ConfigError, ConnectError
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


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
                half_close: bool) -> None:
    while True:
        data = await reader.read(CHUNK)
        if not data:
            break
        writer.write(data)
        await writer.drain()
    if half_close:
        writer.write_eof()


class _Bridge:
    """One TLS connection bridged to the plain end of a socketpair, in its own thread."""

    def __init__(self, tls_sock: socket.socket, ctx: ssl.SSLContext, server_side: bool,
                 hostname: Optional[str], what: str) -> None:
        self.plain, self._inner = socket.socketpair()
        self._tls_sock, self._ctx = tls_sock, ctx
        self._server_side, self._hostname, self.what = server_side, hostname, what
        self.handshake = threading.Event()
        self.error: Optional[str] = None
        self.version: Optional[str] = None
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True,
                                       name=f"libvirt-mdev-tls-{what}")

    def start(self) -> socket.socket:
        """Run the handshake; return the plain end, or raise with the reason it failed."""
        self.thread.start()
        self.handshake.wait(HANDSHAKE_TIMEOUT + 5)
        if self.error is not None or self.version is None:
            _reset(self.plain)
            raise ConnectError(f"TLS {self.what}: {self.error or 'handshake did not finish'}")
        return self.plain

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        loop = asyncio.get_running_loop()
        self._tls_sock.setblocking(False)
        if self._server_side:
            tr = asyncio.StreamReader(limit=CHUNK)
            transport, proto = await loop.connect_accepted_socket(
                lambda: asyncio.StreamReaderProtocol(tr), sock=self._tls_sock, ssl=self._ctx,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
            return tr, asyncio.StreamWriter(transport, proto, tr, loop)
        return await asyncio.open_connection(sock=self._tls_sock, ssl=self._ctx,
                                             server_hostname=self._hostname,
                                             ssl_handshake_timeout=HANDSHAKE_TIMEOUT)

    async def _run(self) -> None:
        try:
            tr, tw = await asyncio.wait_for(self._open(), HANDSHAKE_TIMEOUT)
            self.version = tw.get_extra_info("ssl_object").version()
        except (OSError, ssl.SSLError, asyncio.TimeoutError) as exc:
            self.error = f"handshake failed: {' '.join(str(exc).split()) or type(exc).__name__}"
            self._tls_sock.close()
            self._inner.close()
            return
        finally:
            self.handshake.set()
        pr, pw = await asyncio.open_connection(sock=self._inner, limit=CHUNK)
        # inbound: TLS peer -> plain (the stream from the source, or QEMU's return path)
        tasks = [asyncio.ensure_future(_pipe(tr, pw, half_close=True)),
                 asyncio.ensure_future(_pipe(pr, tw, half_close=False))]
        done, _pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        failed = [t for t in done if t.exception() is not None]
        if failed:
            why = failed[0].exception()
            if tasks[0] in failed and isinstance(why, (ConnectionResetError, ssl.SSLError)):
                # the TLS peer went away (QEMU closes with a reset): end the plain stream;
                # the proxy's parser decides whether what came was complete
                try:
                    pw.write_eof()
                except OSError:
                    pass
                await asyncio.wait([tasks[1]])
            else:
                log.error(f"TLS {self.what}: {why}; resetting the connection")
                for t in tasks:
                    t.cancel()
                _reset(self._inner)
                tw.transport.abort()
                return
        else:
            await asyncio.wait(tasks)
        tw.transport.abort()  # never a close_notify: the peer would answer it with a reset
        pw.close()


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


__all__ = ["TlsCreds", "accept_tls", "connect_tls"]
