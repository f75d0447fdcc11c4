"""Reaching the local QEMU: the proxy retries while it does not listen yet, within a bound.
A minimal valid stream (header + EOF) is enough here; no QEMU needed."""
from __future__ import annotations

import socket
import threading
import time

from libvirt_mdev.live.relay import Endpoint

from .conftest import ProxyEnv, Sink, replay, wait_results

TINY = b"QEVM\x00\x00\x00\x03\x00"  # file header, no configuration, QEMU_VM_EOF


def reserved_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_waits_for_a_destination_that_listens_late(proxy_env: ProxyEnv) -> None:
    proxy_env.arm([])
    port = reserved_port()
    px = proxy_env.proxy(Endpoint("127.0.0.1", port), connect_timeout=5)
    got: list[bytes] = []

    def late_destination() -> None:
        time.sleep(0.6)
        with socket.socket() as srv:
            srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            srv.bind(("127.0.0.1", port))
            srv.listen(1)
            conn, _ = srv.accept()
            data = b""
            while chunk := conn.recv(4096):
                data += chunk
            got.append(data)
            conn.close()

    t = threading.Thread(target=late_destination)
    t.start()
    started = time.monotonic()
    replay(px.address.port, TINY)
    wait_results(px)
    t.join(10)
    assert px.results[0].ok, px.results[0].error
    assert got == [TINY] and time.monotonic() - started >= 0.5


def test_gives_up_on_a_destination_that_never_listens(proxy_env: ProxyEnv) -> None:
    proxy_env.arm([])
    px = proxy_env.proxy(Endpoint("127.0.0.1", reserved_port()), connect_timeout=0.5)
    started = time.monotonic()
    replay(px.address.port, TINY)
    wait_results(px)
    res = px.results[0]
    assert not res.ok and res.error_kind == "connect" and "cannot connect to the local QEMU" in res.error
    assert time.monotonic() - started < 5


def test_unix_socket_listen_and_forward(proxy_env: ProxyEnv, tmp_path) -> None:
    """Both ends of the UNIX-socket layout: listen on a path, forward to a path."""
    proxy_env.arm([])
    dst_path = tmp_path / "qemu.sock"
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(dst_path))
    srv.listen(1)
    from libvirt_mdev.live.proxy import MigrationProxy, ProxyOptions

    px = MigrationProxy(proxy_env.config, ProxyOptions(forward=Endpoint(path=str(dst_path))))
    listen_path = tmp_path / "src.sock"
    px.bind(Endpoint(path=str(listen_path)))
    assert (listen_path.stat().st_mode & 0o777) == 0o600
    px.start()
    try:
        c = socket.socket(socket.AF_UNIX)
        c.connect(str(listen_path))
        c.sendall(TINY)
        c.shutdown(socket.SHUT_WR)
        conn, _ = srv.accept()
        data = b""
        while chunk := conn.recv(4096):
            data += chunk
        conn.close()
        assert c.recv(10) == b""
        c.close()
        wait_results(px)
        assert px.results[0].ok and data == TINY
    finally:
        px.stop()
        srv.close()
    assert not listen_path.exists()


def test_relay_mode_needs_no_armed_migration(proxy_env: ProxyEnv) -> None:
    sink = Sink(reply=b"ok")
    px = proxy_env.proxy(sink.endpoint, mode="relay")
    got = replay(px.address.port, b"anything at all: relay mode does not parse")
    wait_results(px)
    assert px.results[0].ok and got.back == b"ok"
    assert sink.wait() and sink.data == b"anything at all: relay mode does not parse"
