"""Multifd through the proxy (libvirt_mdev/live/channels.py), on synthetic channels.

One migration = a main channel (a synthetic QEVM stream, testkit.synth.write_minimal_stream) plus side
channels in QEMU's exact framing (testkit.multifd).  A "destination QEMU" (MultiSink) records every connection
the proxy makes to it, in accept order.  Checked: the binding (uuid = the armed domain's), RAM passing through
byte-identical, side channels held until the main channel is connected (QEMU 7.2 takes the first connection for
the main one), and each refusal failing the whole migration closed (main and side channels reset).
"""
from __future__ import annotations

import errno
import io
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from libvirt_mdev.live.limits import ProxyLimits
from libvirt_mdev.live.proxy import MigrationProxy
from libvirt_mdev.live.relay import Endpoint
from testkit.multifd import channel_init, device_packet, ram_packet, sync_packet
from testkit.synth import write_minimal_stream
from tests.harness.relay import accept_each

from .conftest import DOM_UUID, ID_A, U1, ProxyEnv, wait_results

OTHER_UUID = "0b0b0b0b-1111-4222-8333-444455556666"
PAGE = 4096


class MultiSink:
    """A listener standing in for the destination QEMU: records every connection (bytes, reset or not)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.conns: list[dict] = []
        self._lock = threading.Lock()
        accept_each(self.sock, self._accepted)

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint("127.0.0.1", self.sock.getsockname()[1])

    def _accepted(self, conn: socket.socket) -> None:
        rec = self._record()
        with self._lock:
            self.conns.append(rec)
        threading.Thread(target=self._read, args=(conn, rec), daemon=True).start()

    def _record(self) -> dict:
        return {"data": bytearray(), "reset": False, "done": threading.Event()}

    def _read(self, conn: socket.socket, rec: dict) -> None:
        try:
            while chunk := conn.recv(1 << 20):
                rec["data"] += chunk
        except ConnectionResetError:
            rec["reset"] = True
        conn.close()
        rec["done"].set()

    def wait(self, n: int, timeout: float = 20) -> list[dict]:
        deadline = time.monotonic() + timeout
        while len(self.conns) < n or not all(c["done"].is_set() for c in self.conns[:n]):
            assert time.monotonic() < deadline, f"{len(self.conns)} connections, not {n} ended"
            time.sleep(0.02)
        return self.conns

    def wait_connected(self, n: int, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while len(self.conns) < n:
            assert time.monotonic() < deadline, f"{len(self.conns)} connections, not {n}"
            time.sleep(0.02)

    def close(self) -> None:
        self.sock.close()


def main_stream() -> bytes:
    buf = io.BytesIO()
    write_minimal_stream(buf, ram_pages=64, seed=5)
    return buf.getvalue()


def side_channel(cid: int, uuid: str = DOM_UUID, *, extra: bytes = b"") -> bytes:
    pages = [os.urandom(PAGE) for _ in range(3)]
    return (channel_init(uuid, cid) + ram_packet("pc.ram", [0, PAGE * 7, PAGE * 9], pages, zero=[PAGE],
                                                 packet_num=cid) + extra + sync_packet(cid + 100))


def connect(px: MigrationProxy) -> socket.socket:
    return socket.create_connection(("127.0.0.1", px.address.port))


def finish(c: socket.socket, data: bytes) -> bool:
    """Send *data*, half-close, read to EOF: True when the proxy ended the connection with a reset."""
    try:
        c.sendall(data)
        c.shutdown(socket.SHUT_WR)
        c.settimeout(20)
        while c.recv(65536):
            pass
        return False
    except (ConnectionResetError, BrokenPipeError):
        return True
    except OSError as exc:  # shutdown() of a connection the proxy has reset
        if exc.errno == errno.ENOTCONN:
            return True
        raise
    finally:
        c.close()


def was_reset(c: socket.socket, timeout: float = 10) -> bool:
    c.settimeout(timeout)
    try:
        while c.recv(65536):
            pass
        return False
    except ConnectionResetError:
        return True
    except OSError:
        return False
    finally:
        c.close()


def open_fds() -> dict[str, str]:
    """This process's open descriptors and what each points to (a leak names itself)."""
    out = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            out[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the directory's own descriptor, closed by now
            pass
    return out


def wait_refusals(px: MigrationProxy, n: int = 1, timeout: float = 20) -> list[str]:
    assert px.channels is not None
    deadline = time.monotonic() + timeout
    while len(px.channels.refusals) < n:
        assert time.monotonic() < deadline, "no refusal"
        time.sleep(0.02)
    return list(px.channels.refusals)


@pytest.fixture
def sink() -> MultiSink:
    s = MultiSink()
    yield s
    s.close()


@pytest.mark.parametrize("order", ["main first", "side channels first"])
def test_main_and_side_channels_pass_through(proxy_env: ProxyEnv, sink: MultiSink, order: str) -> None:
    proxy_env.arm([])
    px = proxy_env.proxy(sink.endpoint)
    main, sides = main_stream(), [side_channel(i) for i in range(3)]
    conns: list[tuple[socket.socket, bytes]] = []
    if order == "main first":
        m = connect(px)
        m.sendall(main[:100])
        conns.append((m, main[100:]))
        time.sleep(0.2)
    for data in sides:
        c = connect(px)
        c.sendall(data[:64])
        conns.append((c, data[64:]))
    if order != "main first":
        time.sleep(0.5)
        assert sink.conns == []            # held until the main channel is connected
        m = connect(px)
        conns.append((m, main))
    # the main channel ends last, as in QEMU (its destination waits for every channel)
    (m, rest), sides_conns = (conns[0], conns[1:]) if order == "main first" else (conns[-1], conns[:-1])
    m.sendall(rest[:1000])
    threads = [threading.Thread(target=finish, args=cd) for cd in sides_conns]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    sink.wait_connected(4)
    assert not finish(m, rest[1000:])
    wait_results(px)
    res = px.results[0]
    assert res.ok, res.error
    got = sink.wait(4)
    assert bytes(got[0]["data"]) == main   # the main channel is connected first, always
    assert sorted(bytes(c["data"]) for c in got[1:]) == sorted(sides)   # RAM byte-identical
    assert not any(c["reset"] for c in got)
    assert "3 multifd channel(s)" in proxy_env.config.log_file.read_text()


def start_main(px: MigrationProxy, sink: MultiSink) -> tuple[socket.socket, bytes]:
    """A main channel that has sent part of its stream and is connected to the destination."""
    main = main_stream()
    m = connect(px)
    m.sendall(main[:5000])
    deadline = time.monotonic() + 10
    while not sink.conns:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return m, main


def start_side(px: MigrationProxy, cid: int) -> socket.socket:
    """A side channel that has sent its init and part of its RAM packet, and is held open."""
    c = connect(px)
    c.sendall(side_channel(cid)[:3000])
    return c


def assert_all_failed(px: MigrationProxy, sink: MultiSink, m: socket.socket, text: str, n_dst: int) -> None:
    assert was_reset(m), "the main channel was not reset"
    wait_results(px)
    res = px.results[0]
    assert not res.ok and text in res.error, res.error
    conns = sink.wait(n_dst)
    assert all(c["reset"] for c in conns), [c["reset"] for c in conns]
    assert px.channels is not None and len([r for r in px.channels.refusals if text in r]) == 1


def test_device_state_for_a_device_the_domain_lacks_fails_the_whole_migration(proxy_env: ProxyEnv,
                                                                              sink: MultiSink) -> None:
    """Device state on a side channel is bound like main-channel state (live/devstate.py): a domain
    with no mdev has no device to take it, so the header alone refuses it."""
    proxy_env.arm([])
    px = proxy_env.proxy(sink.endpoint)
    m, _ = start_main(px, sink)
    good = connect(px)
    good.sendall(side_channel(0)[:2000])
    sink.wait_connected(2)
    marker = b"VFIO-STATE-" + os.urandom(8).hex().encode()
    bad = connect(px)
    reset = finish(bad, side_channel(1, extra=device_packet("0000:00:05.0/vfio", 0, marker)))
    why = "which domain vm1 does not have"
    assert_all_failed(px, sink, m, why, 3)
    assert reset and was_reset(good)
    assert not any(marker in c["data"] for c in sink.conns)   # nothing of the refused chunk was forwarded
    lines = [ln for ln in proxy_env.config.log_file.read_text().splitlines() if why in ln]
    assert len(lines) == 1 and "REFUSED" in lines[0], lines


def test_a_channel_of_another_vm_fails_the_whole_migration(proxy_env: ProxyEnv, sink: MultiSink) -> None:
    proxy_env.arm([])
    px = proxy_env.proxy(sink.endpoint)
    m, _ = start_main(px, sink)
    bad = connect(px)
    assert finish(bad, side_channel(0, OTHER_UUID))
    assert_all_failed(px, sink, m, f"carries VM uuid {OTHER_UUID}, not the armed domain's", 1)


def test_a_duplicate_channel_id_fails_the_whole_migration(proxy_env: ProxyEnv, sink: MultiSink) -> None:
    proxy_env.arm([])
    px = proxy_env.proxy(sink.endpoint)
    m, _ = start_main(px, sink)
    first = start_side(px, 2)
    sink.wait_connected(2)
    assert finish(connect(px), side_channel(2))
    assert_all_failed(px, sink, m, "a second channel with id 2", 2)
    assert was_reset(first)


def test_more_channels_than_the_limit_fail_the_whole_migration(proxy_env: ProxyEnv, sink: MultiSink) -> None:
    proxy_env.arm([])
    px = proxy_env.proxy(sink.endpoint, limits=ProxyLimits(max_channels=2))
    m, _ = start_main(px, sink)
    held = [start_side(px, i) for i in range(2)]
    sink.wait_connected(3)
    assert finish(connect(px), side_channel(2))
    assert_all_failed(px, sink, m, "more than 2 multifd channels (the proxy's max-channels limit)", 3)
    assert all(was_reset(c) for c in held)


def test_side_channels_without_their_main_channel_are_cut_at_the_deadline(proxy_env: ProxyEnv,
                                                                           sink: MultiSink) -> None:
    proxy_env.arm([])
    px = proxy_env.proxy(sink.endpoint, limits=ProxyLimits(main_channel_timeout=0.5))
    cs = []
    for i in range(2):
        c = connect(px)
        c.sendall(side_channel(i))
        cs.append(c)
    started = time.monotonic()
    assert all(was_reset(c) for c in cs)
    assert time.monotonic() - started < 5
    (why,) = wait_refusals(px)
    assert "did not arrive within 0.5s of its first multifd channel" in why
    assert sink.conns == []                  # nothing reached the destination QEMU
    # the migration stays failed: its main channel, arriving late, is refused too
    m = connect(px)
    reset = finish(m, main_stream())
    wait_results(px)
    err = px.results[0].error or ""
    assert reset and not px.results[0].ok and "already failed on its multifd channels" in err, err
    assert "did not arrive within 0.5s" in err, err   # and it names why, as the side channels' refusal did


def test_a_failing_main_channel_resets_its_side_channels(proxy_env: ProxyEnv, sink: MultiSink) -> None:
    proxy_env.arm([])
    px = proxy_env.proxy(sink.endpoint)
    m, main = start_main(px, sink)
    side = start_side(px, 0)
    sink.wait_connected(2)
    assert finish(m, main[5000:len(main) // 2])      # the main stream is cut short: refused
    wait_results(px)
    assert not px.results[0].ok
    assert was_reset(side)
    assert all(c["reset"] for c in sink.wait(2))


def test_a_side_channel_after_the_migration_ended_is_refused_alone(proxy_env: ProxyEnv, sink: MultiSink) -> None:
    proxy_env.arm([])
    px = proxy_env.proxy(sink.endpoint)
    assert not finish(connect(px), main_stream())
    wait_results(px)
    assert px.results[0].ok, px.results[0].error
    assert finish(connect(px), side_channel(0))
    (why,) = wait_refusals(px)
    assert "arrived after its migration ended" in why
    assert len(sink.wait(1)) == 1


def test_a_stray_side_channel_is_refused_alone(proxy_env: ProxyEnv, sink: MultiSink) -> None:
    px = proxy_env.proxy(sink.endpoint)   # nothing armed
    assert finish(connect(px), side_channel(0))
    (why,) = wait_refusals(px)
    assert "no migration to serve it" in why and "no incoming migration is armed" in why
    assert sink.conns == [] and len(px.results) == 0


def test_a_bad_channel_init_is_refused_alone(proxy_env: ProxyEnv, sink: MultiSink) -> None:
    proxy_env.arm([])
    px = proxy_env.proxy(sink.endpoint)
    assert finish(connect(px), channel_init(DOM_UUID, 0, version=2))
    (why,) = wait_refusals(px)
    assert "version 2" in why
    assert sink.conns == []


def test_the_sign_and_relay_modes_do_not_bind_side_channels_to_pending_records(proxy_env: ProxyEnv,
                                                                               tmp_path: Path) -> None:
    """Relay carries side channels verbatim and sign groups them with its signing sessions
    (tests/proxy/test_multifd_modes*.py): neither uses the destination's Channels."""
    from libvirt_mdev.live.options import ProxyOptions

    for mode in ("relay", "sign"):
        px = MigrationProxy(proxy_env.config, ProxyOptions(forward=Endpoint("127.0.0.1", 1), mode=mode))
        assert px.channels is None


def test_a_side_channel_with_a_short_init_is_cut_at_the_header_deadline(proxy_env: ProxyEnv,
                                                                        sink: MultiSink) -> None:
    proxy_env.arm([])
    px = proxy_env.proxy(sink.endpoint, limits=ProxyLimits(header_timeout=0.5))
    c = connect(px)
    c.sendall(channel_init(DOM_UUID, 0)[:24])
    assert was_reset(c, timeout=5)
    lines = [ln for ln in proxy_env.config.log_file.read_text().splitlines() if "header deadline" in ln]
    assert len(lines) == 1 and "sent 24 of the 64 bytes of the multifd channel init within 0.5s" in lines[0]
    assert sink.conns == []


def test_side_channel_bytes_count_for_the_main_channels_progress_deadline(proxy_env: ProxyEnv,
                                                                          sink: MultiSink) -> None:
    """With multifd the RAM travels on the side channels while the main channel idles: that is progress."""
    proxy_env.arm([])
    px = proxy_env.proxy(sink.endpoint, limits=ProxyLimits(progress_timeout=1.0, progress_min_bytes=32 << 10))
    m, main = start_main(px, sink)
    side = connect(px)
    side.sendall(channel_init(DOM_UUID, 0))
    for i in range(16):   # 2.4 s of side-channel traffic, main channel silent
        side.sendall(ram_packet("pc.ram", [PAGE * j for j in range(16)], [os.urandom(PAGE) for _ in range(16)],
                                packet_num=i))
        time.sleep(0.15)
    assert len(px.results) == 0, px.results[0].error     # the main channel was not cut
    side_done = threading.Thread(target=finish, args=(side, b""))
    side_done.start()
    side_done.join(20)
    assert not finish(m, main[5000:])
    wait_results(px)
    assert px.results[0].ok, px.results[0].error
    # and without side-channel traffic the same deadline cuts it
    proxy_env.arm([])
    px2 = proxy_env.proxy(sink.endpoint, limits=ProxyLimits(progress_timeout=1.0, progress_min_bytes=32 << 10))
    m2 = connect(px2)
    m2.sendall(main[:5000])
    assert was_reset(m2)
    wait_results(px2)
    assert "progress deadline" in px2.results[0].error


def test_a_main_channel_refused_at_its_recheck_resets_the_held_side_channels_at_once(proxy_env: ProxyEnv,
                                                                                     sink: MultiSink) -> None:
    """The armed type is not this host's now: the main channel is refused after its claim; its side channels,
    held until then, are reset at once (not at the main-channel deadline)."""
    proxy_env.arm([{"mdev_uuid": U1, "idstr": ID_A, "type": "nvidia-224"}])   # U1 is nvidia-222 here
    px = proxy_env.proxy(sink.endpoint)
    sides = []
    for i in range(2):
        c = connect(px)
        c.sendall(side_channel(i))
        sides.append(c)
    time.sleep(0.3)
    started = time.monotonic()
    assert finish(connect(px), main_stream())
    assert all(was_reset(c) for c in sides)
    assert time.monotonic() - started < 5          # the main-channel deadline is 20 s
    wait_results(px)
    assert not px.results[0].ok and px.results[0].error_kind == "type-mismatch"
    assert sink.conns == []


def test_a_flood_of_stray_side_channels_leaves_no_thread_or_socket(proxy_env: ProxyEnv, sink: MultiSink) -> None:
    px = proxy_env.proxy(sink.endpoint)   # nothing armed
    # one refusal first: its log line may open the log file or syslog socket once, which is no leak
    warm = connect(px)
    warm.sendall(channel_init(OTHER_UUID, 0))
    assert was_reset(warm)
    wait_refusals(px, 1)
    threads = threading.active_count()
    before = open_fds()
    fds = len(before)
    cs = []
    for i in range(60):
        c = connect(px)
        c.sendall(channel_init(OTHER_UUID, i % 256))
        cs.append(c)
    assert all(was_reset(c) for c in cs)
    wait_refusals(px, 61)
    deadline = time.monotonic() + 10
    while threading.active_count() > threads or len(open_fds()) > fds:
        assert time.monotonic() < deadline, (threading.active_count(), threads,
                                             sorted(set(open_fds().values()) - set(before.values())))
        time.sleep(0.05)
    assert sink.conns == []


def test_a_flood_of_stray_side_channels_logs_a_bounded_number_of_lines(proxy_env: ProxyEnv,
                                                                       sink: MultiSink) -> None:
    """Each stray channel is refused and counted, but at most REFUSAL_LINES of them are logged per window."""
    from libvirt_mdev.live.group import REFUSAL_LINES
    px = proxy_env.proxy(sink.endpoint)   # nothing armed
    cs = []
    for i in range(3 * REFUSAL_LINES):
        c = connect(px)
        c.sendall(channel_init(OTHER_UUID, i % 256))
        cs.append(c)
    assert all(was_reset(c) for c in cs)
    wait_refusals(px, 3 * REFUSAL_LINES)
    lines = [ln for ln in proxy_env.config.log_file.read_text().splitlines() if "multifd channel REFUSED" in ln]
    assert len(lines) == REFUSAL_LINES, len(lines)
