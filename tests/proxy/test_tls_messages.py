"""Issue 15 (TLS through the proxy): one line per refusal, naming the real cause and the fix.

Python's ``ssl`` stands in for both QEMUs here (the real-QEMU runs are in
tests/sign/test_tls_e2e.py): a source with the host's client certificate, a destination
that demands one.  Loopback only.
"""
from __future__ import annotations

import socket
import ssl
import threading
import time
from pathlib import Path

import pytest

from libvirt_mdev.live.limits import ProxyLimits
from libvirt_mdev.live.relay import Endpoint
from libvirt_mdev.live.tlsbridge import TlsCreds

from .conftest import ProxyEnv, wait_results

pytest.importorskip("tests.sign.pki")  # the pki fixture (conftest.py) needs cryptography
TINY = b"QEVM\x00\x00\x00\x03\x00"


class TlsSink:
    """The destination QEMU: a TLS server with B's server certificate that demands a client certificate."""

    def __init__(self, d: Path) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(d / "server-cert.pem", d / "server-key.pem")
        self.ctx.load_verify_locations(d / "ca-cert.pem")
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(2)
        self.data = b""
        self.done = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint("127.0.0.1", self.sock.getsockname()[1])

    def _serve(self) -> None:
        try:
            raw, _ = self.sock.accept()
            with self.ctx.wrap_socket(raw, server_side=True) as c:
                while chunk := c.recv(65536):
                    self.data += chunk
        except (OSError, ssl.SSLError):
            pass
        self.done.set()


def source(port: int, d: Path | None, server_name: str = "B", *, send: bytes = TINY,
           close_after_handshake: bool = False) -> None:
    """The source QEMU: TLS client, optionally with a client certificate from *d*."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False  # like QEMU, the name is checked by the caller after the handshake
    ctx.verify_mode = ssl.CERT_NONE
    if d is not None:
        ctx.load_cert_chain(d / "client-cert.pem", d / "client-key.pem")
    raw = socket.create_connection(("127.0.0.1", port))
    try:
        with ctx.wrap_socket(raw, server_hostname=server_name) as c:
            if close_after_handshake:
                return
            c.sendall(send)
            c.shutdown(socket.SHUT_WR)
            c.recv(1)
    except (OSError, ssl.SSLError):
        pass


def refused_lines(env: ProxyEnv) -> list[str]:
    return [ln for ln in env.config.log_file.read_text().splitlines() if "REFUSED" in ln or "FAILED" in ln]


def test_a_served_tls_connection_says_it_was_tls(proxy_env: ProxyEnv, pki: dict[str, Path]) -> None:
    proxy_env.arm([])
    sink = TlsSink(pki["B"])
    px = proxy_env.proxy(sink.endpoint, tls=TlsCreds(pki["B"], "B"))
    source(px.address.port, pki["A"])
    wait_results(px)
    res = px.results[0]
    assert res.ok, res.error
    assert res.tls is not None and res.tls.startswith("TLS 1.")
    assert sink.done.wait(10) and sink.data == TINY
    log = proxy_env.config.log_file.read_text()
    assert f"mode splice, {res.tls} (client certificate verified)" in log


@pytest.mark.parametrize("client", ["other-ca", "no-certificate"])
def test_a_rejected_client_certificate_is_refused_in_one_line(proxy_env: ProxyEnv, pki: dict[str, Path],
                                                              client: str) -> None:
    proxy_env.arm([])
    sink = TlsSink(pki["B"])
    px = proxy_env.proxy(sink.endpoint, tls=TlsCreds(pki["B"], "B"))
    source(px.address.port, pki["other"] if client == "other-ca" else None)
    wait_results(px)
    res = px.results[0]
    assert not res.ok and "handshake failed: the source's client certificate was refused" in res.error
    assert f"must be signed by {pki['B']}/ca-cert.pem" in res.error and res.exit_code == 1
    lines = refused_lines(proxy_env)
    assert len(lines) == 1 and "REFUSED" in lines[0], lines
    assert sink.data == b""


def test_a_source_that_rejects_our_certificate_name_gets_one_line_naming_it(proxy_env: ProxyEnv,
                                                                           pki: dict[str, Path]) -> None:
    """QEMU checks the destination's name after the handshake, then hangs up.  Before:
    three lines, and a REFUSED line blaming 'stream ends inside QEMU file header'."""
    proxy_env.arm([])
    sink = TlsSink(pki["B"])
    px = proxy_env.proxy(sink.endpoint, tls=TlsCreds(pki["B"], "B"))
    source(px.address.port, pki["A"], close_after_handshake=True)
    wait_results(px)
    res = px.results[0]
    assert not res.ok and "probably rejected our certificate" in res.error
    assert "--tls-destination" in res.error and "subjectAltName" in res.error
    assert "QEMU file header" not in res.error
    lines = refused_lines(proxy_env)
    assert len(lines) == 1 and "probably rejected our certificate" in lines[0], lines
    assert not [ln for ln in proxy_env.config.log_file.read_text().splitlines() if "libvirt-mdev.tls" in ln]


def test_a_stalled_tls_handshake_is_cut_at_the_header_deadline(proxy_env: ProxyEnv, pki: dict[str, Path]) -> None:
    proxy_env.arm([])
    sink = TlsSink(pki["B"])
    px = proxy_env.proxy(sink.endpoint, tls=TlsCreds(pki["B"], "B"), limits=ProxyLimits(header_timeout=1))
    c = socket.create_connection(("127.0.0.1", px.address.port))
    c.sendall(b"\x16\x03\x01")  # the start of a ClientHello, then nothing
    t0 = time.monotonic()
    wait_results(px, timeout=10)
    res = px.results[0]
    assert not res.ok and "did not complete within" in res.error and "header deadline" in res.error
    assert time.monotonic() - t0 < 3
    c.close()


def test_tls_into_a_proxy_without_certificates_names_tls_dir(proxy_env: ProxyEnv, pki: dict[str, Path]) -> None:
    proxy_env.arm([])
    sink = TlsSink(pki["B"])
    px = proxy_env.proxy(sink.endpoint)
    source(px.address.port, pki["A"])
    wait_results(px)
    err = px.results[0].error
    assert "uses TLS (virsh migrate --tls)" in err and "--tls-dir" in err and "disable the proxy" not in err


def test_stalled_tls_handshakes_cannot_crowd_out_the_real_source(proxy_env: ProxyEnv, pki: dict[str, Path]) -> None:
    """A TLS handshake needs a thread: stalled ones are capped apart (max-handshakes, the
    oldest reset) and never fill max-sessions, so the real source still gets through."""
    proxy_env.arm([])
    sink = TlsSink(pki["B"])
    px = proxy_env.proxy(sink.endpoint, tls=TlsCreds(pki["B"], "B"),
                         limits=ProxyLimits(max_handshakes=2, max_sessions=2, header_timeout=30))
    stallers = []
    for _ in range(4):
        c = socket.create_connection(("127.0.0.1", px.address.port))
        c.sendall(b"\x16\x03\x01")
        stallers.append(c)
        time.sleep(0.1)
    t0 = time.monotonic()
    source(px.address.port, pki["A"])
    deadline = time.monotonic() + 15
    while not any(r.ok for r in px.results):
        assert time.monotonic() < deadline, [r.error for r in px.results]
        time.sleep(0.05)
    assert time.monotonic() - t0 < 5
    assert sink.done.wait(10) and sink.data == TINY
    evicted = [r for r in px.results if r.error and "max-handshakes" in r.error]
    assert len(evicted) == 3, [r.error for r in px.results]  # 4 stallers + the source through a cap of 2
    for c in stallers:
        c.close()
