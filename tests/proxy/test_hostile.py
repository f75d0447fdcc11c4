"""Issue 12: the proxy against peers that do not cooperate.

Each test is an attack that held the proxy (or took the armed migration from its real
source) before the admission stage (:mod:`libvirt_mdev.live.admission`): idle floods,
file-descriptor exhaustion, a 1 byte/s peer, bogus first bytes, and ``kill -9`` of the
proxy itself.  Loopback only; every wait is bounded.
"""
from __future__ import annotations

import json
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from libvirt_mdev.live.limits import ProxyLimits
from libvirt_mdev.live.relay import Endpoint

from .conftest import ProxyEnv, Sink, replay, wait_results

REPO = Path(__file__).resolve().parents[2]
TINY = b"QEVM\x00\x00\x00\x03\x00"  # file header, no configuration, QEMU_VM_EOF
#: a longer valid stream: a few NOP-free but well-formed records are not needed; the
#: header + EOF is a complete migration for the proxy (no devices armed)


# --------------------------------------------------------------------------- helpers
class CliProxy:
    """``libvirt-mdev proxy --json-log`` in a child process (its own threads, fds, RSS)."""

    def __init__(self, env: ProxyEnv, forward: Endpoint, *args: str, nofile: int | None = None) -> None:
        def limit() -> None:
            if nofile is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

        self.proc = subprocess.Popen([sys.executable, "-m", "libvirt_mdev.cli", "--config", str(env.conf_file()),
                                      "proxy", "--listen", "127.0.0.1:0", "--forward", str(forward), "--json-log",
                                      *args], cwd=REPO, stdout=subprocess.PIPE, text=True,
                                     preexec_fn=limit)
        assert self.proc.stdout is not None
        hello = json.loads(self.proc.stdout.readline())
        self.port = int(hello["listen"].rsplit(":", 1)[1])
        self.sessions: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            ev = json.loads(line)
            if ev.get("event") == "session":
                self.sessions.append(ev)

    def wait_session(self, n: int = 1, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while len(self.sessions) < n:
            assert self.proc.poll() is None, "the proxy exited"
            assert time.monotonic() < deadline, f"{len(self.sessions)} of {n} sessions after {timeout}s"
            time.sleep(0.02)
        return self.sessions[n - 1]

    def status(self) -> dict[str, int]:
        """Threads, RSS and peak RSS (KiB), open fds of the proxy process."""
        out = {"fds": len(os.listdir(f"/proc/{self.proc.pid}/fd"))}
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            key, _, val = line.partition(":")
            if key in ("Threads", "VmRSS", "VmHWM"):
                out[key] = int(val.split()[0])
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def flood(port: int, n: int) -> list[socket.socket]:
    """*n* idle connections (non-blocking connects: the kernel completes them)."""
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        try:
            s.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        socks.append(s)
    return socks


def was_reset(s: socket.socket, timeout: float = 5.0) -> bool:
    """Whether the proxy ended *s* with a reset (not a FIN, not silence)."""
    s.setblocking(True)
    s.settimeout(timeout)
    try:
        return s.recv(1) == b"" and False
    except ConnectionResetError:
        return True
    except (TimeoutError, OSError):
        return False


def log_lines(env: ProxyEnv, needle: str) -> list[str]:
    return [ln for ln in env.config.log_file.read_text().splitlines() if needle in ln]


# --------------------------------------------------------------------------- floods and fds
def test_ten_thousand_idle_connections_and_the_armed_migration_is_still_served(proxy_env: ProxyEnv) -> None:
    """Before: 2000 idle connections kept 1987 threads (65 MB).  Now one thread holds at
    most max-unarmed of them, sheds the oldest, and the real source is served."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 10_500:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < 10500")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 10_500), hard))
    proxy_env.arm([])
    sink = Sink()
    px = CliProxy(proxy_env, sink.endpoint)
    idle: list[socket.socket] = []
    try:
        base = px.status()
        t0 = time.monotonic()
        idle = flood(px.port, 10_000)
        peak = px.status()
        for _ in range(20):  # while the flood is digested
            time.sleep(0.1)
            st = px.status()
            peak = {k: max(v, peak[k]) for k, v in st.items()}
        got = replay(px.port, TINY)
        res = px.wait_session(timeout=60)
        elapsed = time.monotonic() - t0
        assert res["ok"], res
        assert sink.wait(10) and sink.data == TINY and not got.reset
        print(f"\n10,000 idle connections: proxy before {base}, peak {peak}, migration served "
              f"{elapsed:.1f}s after the flood began")
        assert peak["Threads"] <= base["Threads"] + 3  # the accept thread + one session (+ its return path)
        assert peak["fds"] <= base["fds"] + 256 + 16  # max-unarmed + a session's
        assert peak["VmRSS"] < base["VmRSS"] + 64 * 1024
        assert elapsed < 60
    finally:
        for s in idle:
            s.close()
        px.stop()
        sink.close()


def test_file_descriptor_exhaustion_does_not_stop_the_accept_loop(proxy_env: ProxyEnv) -> None:
    """``ulimit -n 64``, then the limit squeezed to what is open: the flood hits EMFILE
    (before: the accept loop exited with 'internal error (OSError) ... Too many open
    files').  The proxy sheds, keeps accepting, and serves the real source afterwards."""
    proxy_env.arm([])
    sink = Sink()
    px = CliProxy(proxy_env, sink.endpoint, "--first-bytes-timeout", "1", nofile=64)
    idle: list[socket.socket] = []
    try:
        idle = flood(px.port, 100)  # the derived cap (20 at ulimit 64) keeps it clear of EMFILE
        time.sleep(0.5)
        assert px.proc.poll() is None and px.status()["fds"] < 64
        used = px.status()["fds"]
        # below what is open: every accept now fails with EMFILE (as when sessions hold the fds)
        resource.prlimit(px.proc.pid, resource.RLIMIT_NOFILE, (min(8, used - 4), 64))
        idle += flood(px.port, 100)
        time.sleep(1.5)  # the first-bytes deadline frees the held ones
        assert px.proc.poll() is None, "the proxy died"
        resource.prlimit(px.proc.pid, resource.RLIMIT_NOFILE, (64, 64))
        got = replay(px.port, TINY)
        res = px.wait_session(timeout=30)
        assert res["ok"], res
        assert sink.wait(10) and sink.data == TINY and not got.reset
        shed = log_lines(proxy_env, "out of file descriptors")
        assert shed and "resetting the oldest one" in shed[0]
        assert not log_lines(proxy_env, "internal error")
        print(f"\nEMFILE: {len(shed)} shed line(s) (rate-limited); proxy after: {px.status()}")
    finally:
        for s in idle:
            s.close()
        px.stop()
        sink.close()


# --------------------------------------------------------------------------- slow peers
def drip(port: int, data: bytes, every: float, out: dict[str, float]) -> socket.socket:
    """Send *data* one byte per *every* seconds from a thread; ``out['cut']`` = seconds
    after connecting when the proxy reset the connection."""
    s = socket.create_connection(("127.0.0.1", port))
    t0 = time.monotonic()

    def run() -> None:
        for b in data:
            try:
                s.send(bytes([b]))
            except OSError:
                break
            r, _, _ = select.select([s], [], [], every)
            if r:
                try:
                    s.recv(1)
                except OSError:
                    pass
                break
        out["cut"] = time.monotonic() - t0

    threading.Thread(target=run, daemon=True).start()
    return s


def test_a_one_byte_per_second_peer_is_cut_at_its_deadline_while_the_real_migration_proceeds(
        proxy_env: ProxyEnv, injected_stream) -> None:
    """Before: a 1 byte/s connection to an armed proxy held it for 240 s+ and the real
    source was refused as 'a second connection'."""
    data, _ = injected_stream
    proxy_env.arm()
    sink = Sink()
    px = proxy_env.proxy(sink.endpoint, limits=ProxyLimits(first_bytes_timeout=1, header_timeout=3))
    cut: dict[str, float] = {}
    slow = drip(px.address.port, data[:8], 1.0, cut)
    time.sleep(0.5)
    got = replay(px.address.port, data)  # the real source, after the slow one
    wait_results(px)
    res = px.results[0]
    assert res.ok, res.error
    assert sink.wait(30) and sink.data == data and not got.reset
    assert {d["idstr"] for d in res.devices} == {"0000:00:05.0/vfio", "0000:00:06.0/vfio"}
    deadline = time.monotonic() + 10
    while "cut" not in cut and time.monotonic() < deadline:
        time.sleep(0.05)
    assert 2.5 <= cut["cut"] <= 5, cut
    line = log_lines(proxy_env, "header deadline")
    assert len(line) == 1 and "connection cut, reset" in line[0] and "of the 8 bytes" in line[0]
    slow.close()


def test_a_peer_that_stalls_after_its_header_is_cut_at_the_progress_deadline(proxy_env: ProxyEnv,
                                                                              injected_stream) -> None:
    data, _ = injected_stream
    proxy_env.arm()
    sink = Sink()
    px = proxy_env.proxy(sink.endpoint, limits=ProxyLimits(progress_timeout=1.5, progress_min_bytes=1024))
    cut: dict[str, float] = {}
    s = socket.create_connection(("127.0.0.1", px.address.port))
    s.sendall(data[:4096])
    slow = drip_after(s, data[4096:4200], 0.3, cut)
    wait_results(px, timeout=15)
    res = px.results[0]
    assert not res.ok and "progress deadline" in res.error and "--progress-timeout" in res.error
    assert 1.4 <= res.seconds <= 6
    assert sink.wait(10) and sink.reset  # the destination saw a reset, not a stream that ended
    lines = log_lines(proxy_env, "REFUSED")
    assert len(lines) == 1 and "progress deadline" in lines[0]
    slow.close()


def drip_after(s: socket.socket, data: bytes, every: float, out: dict[str, float]) -> socket.socket:
    def run() -> None:
        for b in data:
            try:
                s.send(bytes([b]))
            except OSError:
                break
            time.sleep(every)

    threading.Thread(target=run, daemon=True).start()
    return s


# --------------------------------------------------------------------------- refusals
CLIENT_HELLO = b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(32)


@pytest.mark.parametrize("first, line", [
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "not a QEMU migration stream (first bytes 47455420, expected 'QEVM')"),
    (CLIENT_HELLO, "this proxy does not terminate TLS: start it with --tls-dir"),
    (b"QEVM\x00\x00\x00\x02", "QEMU file version 2 is not supported"),
    (b"QEV", "closed after 3 bytes, inside the QEMU file header"),
])
def test_each_refusal_is_one_line_and_a_reset(proxy_env: ProxyEnv, first: bytes, line: str) -> None:
    proxy_env.arm([])
    sink = Sink()
    px = proxy_env.proxy(sink.endpoint)
    c = socket.create_connection(("127.0.0.1", px.address.port))
    c.sendall(first)
    if first == b"QEV":
        c.shutdown(socket.SHUT_WR)
    reset = was_reset(c)
    c.close()
    wait_results(px)
    res = px.results[0]
    assert not res.ok and line in res.error and "\n" not in res.error
    assert res.exit_code in (1, 3), res
    assert reset or first == b"QEV"  # a peer that already closed its side may see EOF only
    logged = log_lines(proxy_env, "REFUSED")
    assert len(logged) == 1 and line in logged[0]
    assert not sink.received  # nothing reached the destination
    # the armed migration is still there for the real source
    got = replay(px.address.port, TINY)
    wait_results(px, 2)
    assert px.results[1].ok and not got.reset


def test_a_silent_connection_is_cut_at_the_first_bytes_deadline(proxy_env: ProxyEnv) -> None:
    proxy_env.arm([])
    sink = Sink()
    px = proxy_env.proxy(sink.endpoint, limits=ProxyLimits(first_bytes_timeout=0.5))
    c = socket.create_connection(("127.0.0.1", px.address.port))
    t0 = time.monotonic()
    assert was_reset(c, timeout=5)
    assert 0.4 <= time.monotonic() - t0 <= 2
    lines = log_lines(proxy_env, "first-bytes deadline")
    assert len(lines) == 1 and "sent nothing within 0.5s" in lines[0]
    assert px.admission is not None and px.admission.expired == 1


def test_a_second_connection_is_named_with_the_one_being_served(proxy_env: ProxyEnv, injected_stream) -> None:
    px, _sink, first, _second = proxy_env.second_connection(injected_stream[0])
    err = px.results[0].error
    assert f"the one from 127.0.0.1:{first.getsockname()[1]} is already being served" in err, err
    first.close()


# --------------------------------------------------------------------------- kill -9
def test_kill_9_of_the_proxy_resets_both_connections(proxy_env: ProxyEnv, injected_stream) -> None:
    """Before: the destination saw a FIN (a stream that merely ended).  SO_LINGER 0 is set
    on both sockets from accept/connect, so the kernel's close at process exit resets."""
    data, _ = injected_stream
    proxy_env.arm()
    sink = Sink()
    px = CliProxy(proxy_env, sink.endpoint)
    try:
        src = socket.create_connection(("127.0.0.1", px.port))
        src.sendall(data[: len(data) // 3])
        deadline = time.monotonic() + 10
        while not (sink.received and len(sink.received[0]) > 0):
            assert time.monotonic() < deadline, "nothing forwarded"
            time.sleep(0.02)
        px.proc.kill()
        px.proc.wait(10)
        assert sink.wait(10) and sink.reset, "the destination saw a FIN, not a reset"
        assert was_reset(src)
        src.close()
    finally:
        px.stop()
        sink.close()


@pytest.mark.parametrize("args, code, text", [
    (["--header-timeout", "0"], 2, "header-timeout must be a positive number of seconds"),
    (["--max-unarmed", "0"], 2, "max-handshakes and max-channels must be at least 1"),
    (["--tls-dir", "{bad}"], 9, "cannot load server-cert.pem, server-key.pem or ca-cert.pem"),
    (["--tls-dir", "{missing}"], 9, "server-cert.pem is missing"),
])
def test_proxy_start_errors_are_one_line(tmp_path: Path, args: list[str], code: int, text: str) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("server-cert", "server-key", "client-cert", "client-key", "ca-cert"):
        (bad / f"{name}.pem").write_text("not PEM\n")
    args = [a.format(bad=bad, missing=tmp_path / "none") for a in args]
    r = subprocess.run([sys.executable, "-m", "libvirt_mdev.cli", "proxy", "--listen", "127.0.0.1:0",
                        "--forward", "127.0.0.1:1", *args], cwd=REPO, capture_output=True, text=True,
                       timeout=60, check=False)
    assert r.returncode == code and text in r.stderr and r.stderr.count("\n") == 1, r.stderr
