"""A recorded real QEMU 7.2 stream with injected VFIO state, replayed into the proxy by a
test client; a byte sink stands in for the destination QEMU (a real one could not load
state for devices it does not have).

Splice: the state lands in the store under the armed mdev's uuid and type, and the
destination receives the stream byte for byte.  Token: the destination receives
token records that resolve in the store.  Fail closed: every refusal resets both
connections and forwards none of the offending bytes.
"""
from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from libvirt_mdev.filter import TOKEN_MAGIC, FilterOptions, filter_stream
from libvirt_mdev.store import Store
from libvirt_mdev.store.acl import TEMP_PREFIX
from libvirt_mdev.store.pending import read_pending
from libvirt_mdev.stream import SectionStart, VfioBlockStart, iter_events
from libvirt_mdev.stream.wire import SectionType

from .conftest import (
    DOM_UUID,
    ID_A,
    ID_B,
    MARK_A,
    MARK_B,
    U1,
    U2,
    ProxyEnv,
    Sink,
    replay,
    synthetic_devices,
    wait_results,
)

pytestmark = pytest.mark.e2e  # the recorded stream comes from a real QEMU run
REPO = Path(__file__).resolve().parents[2]


def offset_of(data: bytes, idstr: str, kind: type = SectionStart) -> int:
    """Stream offset of the first *kind* event of the section named *idstr*."""
    sid = None
    for ev in iter_events(io.BytesIO(data)):
        if isinstance(ev, SectionStart) and ev.idstr == idstr and ev.type == SectionType.SECTION_START:
            sid = ev.section_id
            if kind is SectionStart:
                return ev.offset
        if kind is VfioBlockStart and isinstance(ev, VfioBlockStart) and ev.section_id == sid and ev.size > 4096:
            return ev.offset
    raise AssertionError(f"no {kind.__name__} for {idstr}")


def committed(env: ProxyEnv) -> list:
    if not env.config.store.exists():
        return []
    with Store.open(env.config.store) as store:
        return [e.manifest for e in store.list() if e.manifest is not None]


def test_splice_stores_state_under_the_armed_mdevs_and_forwards_identical_bytes(
        proxy_env: ProxyEnv, injected_stream) -> None:
    data, devs = injected_stream
    rec = proxy_env.arm()
    sink = Sink(reply=b"\x00\x01\x00\x00")  # a return-path message must reach the source
    px = proxy_env.proxy(sink.endpoint, digest=True)
    got = replay(px.address.port, data)
    wait_results(px)
    res = px.results[0]
    assert res.ok, res.error
    assert sink.wait() and sink.data == data
    assert got.back == b"\x00\x01\x00\x00" and res.bytes_back == 4
    assert res.bytes_in == res.bytes_out == len(data) and res.sha256_in == res.sha256_out
    by_id = {m.idstr: m for m in committed(proxy_env)}
    for d, uuid, typ in ((devs[0], U1, "nvidia-222"), (devs[1], U2, "nvidia-224")):
        m = by_id[d.idstr]
        assert (m.mdev_uuid, m.mdev_type, m.domain_uuid, m.domain_name) == (uuid, typ, DOM_UUID, "vm1")
        assert m.migration_id == rec.migration_id
        assert (m.length, m.sha256) == (d.state_bytes, d.expected_sha256())
    assert {d["idstr"] for d in res.devices} == {ID_A, ID_B}
    # one migration per record: the record is gone, a replay is refused before any byte moves
    assert read_pending(proxy_env.config.runtime_dir, DOM_UUID) is None
    sink2 = Sink()
    px2 = proxy_env.proxy(sink2.endpoint)
    replay(px2.address.port, data)
    wait_results(px2)
    assert not px2.results[0].ok and "no incoming migration is armed" in px2.results[0].error
    assert sink2.received == []
    log = proxy_env.config.log_file.read_text()
    assert f"serving domain vm1 ({DOM_UUID}) migration {rec.migration_id}" in log


def test_token_mode_forwards_tokens_that_splice_back(proxy_env: ProxyEnv, injected_stream) -> None:
    data, devs = injected_stream
    proxy_env.arm()
    sink = Sink()
    px = proxy_env.proxy(sink.endpoint, mode="token")
    replay(px.address.port, data)
    wait_results(px)
    assert px.results[0].ok, px.results[0].error
    sink.wait()
    out = sink.data
    assert MARK_A not in out and MARK_B not in out and TOKEN_MAGIC in out
    assert len(out) < len(data) - devs[0].state_bytes
    tokens = {d["idstr"]: d["token"] for d in px.results[0].devices}
    assert all(t.encode() in out for t in tokens.values())
    # the trusted side can put the verified state back: offline splice of what QEMU got
    back = io.BytesIO()
    with Store.open(proxy_env.config.store) as store:
        filter_stream(io.BytesIO(out), back.write, store, FilterOptions(mode="splice", accept_tokens=True))
    assert back.getvalue() == data


def test_state_for_a_device_the_domain_lacks_is_refused_before_its_bytes(
        proxy_env: ProxyEnv, injected_stream) -> None:
    data, _ = injected_stream
    proxy_env.arm([{"mdev_uuid": U1, "idstr": ID_A, "type": "nvidia-222"}])  # no device at 06.0
    sink = Sink()
    px = proxy_env.proxy(sink.endpoint)
    got = replay(px.address.port, data)
    wait_results(px)
    res = px.results[0]
    assert not res.ok and res.error_kind == "mdev-missing"
    assert f"VFIO device {ID_B!r}, which domain vm1 does not have" in res.error
    sink.wait()
    b_start = offset_of(data, ID_B)
    assert len(sink.data) <= b_start and data.startswith(sink.data)  # nothing from B's section on
    assert MARK_B not in sink.data and got.back == b""
    assert not any(m.idstr == ID_B for m in committed(proxy_env))
    assert "REFUSED, both connections closed" in proxy_env.config.log_file.read_text()


def test_armed_type_mismatch_refuses_before_connecting_the_destination(
        proxy_env: ProxyEnv, injected_stream) -> None:
    data, _ = injected_stream
    devices = [{"mdev_uuid": U1, "idstr": ID_A, "type": "nvidia-222"},
               {"mdev_uuid": U2, "idstr": ID_B, "type": "nvidia-223"}]  # this host: nvidia-224
    proxy_env.arm(devices)
    sink = Sink()
    px = proxy_env.proxy(sink.endpoint)
    replay(px.address.port, data)
    wait_results(px)
    res = px.results[0]
    assert not res.ok and res.error_kind == "type-mismatch" and res.exit_code == 6
    assert "armed for type nvidia-223 but this host now has type nvidia-224" in res.error
    time.sleep(0.2)
    assert sink.received == [] and res.bytes_out == 0


def test_corrupted_vfio_section_is_refused_before_the_corrupt_bytes(proxy_env: ProxyEnv, injected_stream) -> None:
    data, _ = injected_stream
    block = offset_of(data, ID_A, VfioBlockStart)
    bad = bytearray(data)
    bad[block + 3] ^= 0x40  # the DEV_DATA_STATE tag becomes an unknown tag
    res, sink = proxy_env.replay_once(bytes(bad))
    assert not res.ok and res.error_kind == "stream" and "unknown VFIO tag" in res.error
    sink.wait()
    assert len(sink.data) <= block and data.startswith(sink.data)
    assert MARK_A not in sink.data and committed(proxy_env) == []


def test_truncated_stream_is_refused_and_leaves_no_state(proxy_env: ProxyEnv, injected_stream) -> None:
    data, _ = injected_stream
    # inside device A's END data, whatever way the injection split its precopy state between
    # iterations of the captured stream: find a piece of its stop-copy state, 1 MB in
    a = synthetic_devices()[0]
    a.take_state(a.precopy_size + 1_000_000)
    piece = a.take_state(32)
    assert data.count(piece) == 1
    cut = data.index(piece) + 16  # its state never completes
    res, sink = proxy_env.replay_once(data[:cut])
    assert not res.ok and res.error_kind == "stream" and "ends inside a VFIO data block" in res.error
    sink.wait()
    assert sink.reset or len(sink.data) < cut
    assert not any(m.idstr == ID_A for m in committed(proxy_env))
    temps = [p for p in proxy_env.config.store.iterdir() if p.name.startswith(TEMP_PREFIX)]
    assert temps == []  # the half-written state was discarded


def test_extra_connection_for_the_same_migration_is_refused(proxy_env: ProxyEnv, injected_stream) -> None:
    """multifd (--parallel) opens several connections: the extras are refused, the first goes on."""
    data, _ = injected_stream
    px, sink, first, second = proxy_env.second_connection(data)
    extra = px.results[0]
    assert not extra.ok and "second connection" in extra.error and "--parallel" in extra.error
    assert second.back == b""
    first.sendall(data[64:])
    first.shutdown(socket.SHUT_WR)
    first.recv(1)
    first.close()
    wait_results(px, 2)
    assert px.results[1].ok, px.results[1].error
    assert sink.wait() and sink.data == data


def test_json_result_is_serialisable(proxy_env: ProxyEnv, injected_stream) -> None:
    proxy_env.arm()
    sink = Sink()
    px = proxy_env.proxy(sink.endpoint)
    replay(px.address.port, injected_stream[0])
    wait_results(px)
    doc = json.loads(json.dumps(px.results[0].to_json()))
    assert doc["ok"] and doc["domain_name"] == "vm1" and len(doc["devices"]) == 2


def test_socket_activation_serves_a_migration(proxy_env: ProxyEnv, injected_stream) -> None:
    """The listening socket comes from systemd (LISTEN_FDS), as with the example .socket unit."""
    tool = shutil.which("systemd-socket-activate")
    if tool is None:
        pytest.fail("systemd-socket-activate is missing (Debian package systemd)")
    data, _ = injected_stream
    proxy_env.arm()
    sink = Sink()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = proxy_env.conf_file()
    proc = subprocess.Popen([tool, "-l", f"127.0.0.1:{port}", "-E", f"PYTHONPATH={REPO}",
                             sys.executable, "-m", "libvirt_mdev.cli", "--config", str(conf), "proxy",
                             "--forward", str(sink.endpoint), "--once", "--json-log"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while True:  # systemd-socket-activate listens before it starts the proxy
            try:
                got = replay(port, data)
                break
            except ConnectionRefusedError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    events = [json.loads(line) for line in out.splitlines()]
    assert events[0]["event"] == "listening" and events[0]["listen"] == f"127.0.0.1:{port}"
    assert events[1]["ok"] and events[1]["domain_name"] == "vm1", err
    assert proc.returncode == 0 and not got.reset
    assert sink.wait() and sink.data == data


def test_oversized_vfio_block_is_refused_before_its_bytes(proxy_env: ProxyEnv, injected_stream) -> None:
    data, _ = injected_stream
    block = offset_of(data, ID_A, VfioBlockStart)
    bad = bytearray(data)
    bad[block + 8:block + 16] = (1 << 62).to_bytes(8, "big")  # a block "of 4 EiB"
    res, sink = proxy_env.replay_once(bytes(bad))
    assert not res.ok and res.error_kind == "stream" and "VFIO data block claims" in res.error
    sink.wait()
    assert len(sink.data) <= block and MARK_A not in sink.data


def test_untrustworthy_store_refuses_before_connecting_the_destination(proxy_env: ProxyEnv,
                                                                        injected_stream) -> None:
    store = proxy_env.config.store
    store.mkdir(mode=0o700)
    store.chmod(0o755)  # others could read device state: the store refuses to be used
    res, sink = proxy_env.replay_once(injected_stream[0])
    assert not res.ok and res.error_kind.startswith("store"), res
    time.sleep(0.2)
    assert sink.received == []
