"""Helpers for the proxy tests: an armed host (config, fake sysfs, pending record), a
byte sink standing in for the destination QEMU, and a client that replays a stream."""
from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from libvirt_mdev.config import Config
from libvirt_mdev.live.proxy import MigrationProxy, ProxyOptions, SessionResult
from libvirt_mdev.live.relay import Endpoint
from libvirt_mdev.log import setup_logging
from libvirt_mdev.store.pending import PendingRecord, write_pending
from testkit.fakesysfs import make_fake_sysfs
from testkit.synth import SyntheticVfioDevice, inject

if TYPE_CHECKING:
    from tests.harness.qemu_vm import QemuVM

U1 = "4b20d080-1b54-4048-85b3-a6a62d165c01"   # this host: nvidia-222
U2 = "4b20d080-1b54-4048-85b3-a6a62d165c02"   # this host: nvidia-224
DOM_UUID = "5a9c2a4e-7d1b-4b8e-8f57-0c1d2e3f4001"
PARENT = "0000:3b:00.0"
ID_A, ID_B = "0000:00:05.0/vfio", "0000:00:06.0/vfio"
MARK_A = b"\x8f-PROXY-STATE-OF-DEVICE-A-" + os.urandom(8).hex().encode()
MARK_B = b"\x8f-PROXY-STATE-OF-DEVICE-B-" + os.urandom(8).hex().encode()


def both_devices() -> list[dict[str, Any]]:
    return [{"mdev_uuid": U1, "idstr": ID_A, "type": "nvidia-222"},
            {"mdev_uuid": U2, "idstr": ID_B, "type": "nvidia-224"}]


@dataclass
class ProxyEnv:
    """One destination host's libvirt-mdev side: config, fake sysfs, runtime dir, store."""

    root: Path
    config: Config
    proxies: list[MigrationProxy] = field(default_factory=list)

    def arm(self, devices: list[dict[str, Any]] | None = None, *, name: str = "vm1",
            uuid: str = DOM_UUID, migration_id: str | None = None) -> PendingRecord:
        """Write the pending record the migrate-begin hook would write; returns it as read back."""
        rec = {"domain_name": name, "domain_uuid": uuid,
               "migration_id": migration_id or f"m-{time.monotonic_ns()}", "created": int(time.time()),
               "devices": both_devices() if devices is None else devices}
        write_pending(self.config.runtime_dir, rec)
        return PendingRecord.from_dict(rec)

    def proxy(self, forward: Endpoint, **opts: Any) -> MigrationProxy:
        """A proxy listening on 127.0.0.1:<free port>, serving in a background thread."""
        opts.setdefault("connect_timeout", 3.0)
        px = MigrationProxy(self.config, ProxyOptions(forward=forward, **opts))
        px.bind(Endpoint("127.0.0.1", 0))
        px.start()
        self.proxies.append(px)
        return px

    def replay_once(self, data: bytes, **opts: Any) -> tuple[SessionResult, Sink]:
        """Arm, put a proxy in front of a new Sink, send *data* through it as one source QEMU would, wait for the
        session: its result, and the sink (what reached the 'destination QEMU')."""
        self.arm()
        sink = Sink()
        px = self.proxy(sink.endpoint, **opts)
        replay(px.address.port, data)
        wait_results(px)
        return px.results[0], sink

    def second_connection(self, data: bytes) -> tuple[MigrationProxy, Sink, socket.socket, Replay]:
        """Arm, put a proxy in front of a new Sink, open a first connection that sends the first 64 bytes of
        *data* and is held open, then send those 64 bytes on a second connection and wait for the proxy's first
        session (the second connection's): the proxy, the sink, the first connection and what the second saw."""
        self.arm()
        sink = Sink()
        px = self.proxy(sink.endpoint)
        first = socket.create_connection(("127.0.0.1", px.address.port))
        first.sendall(data[:64])
        time.sleep(0.3)
        second = replay(px.address.port, data[:64])
        wait_results(px)
        return px, sink, first, second

    def conf_file(self, **extra: str) -> Path:
        """The same settings as a configuration file (for the CLI)."""
        c = self.config
        lines = [f"store = {c.store}", f"runtime_dir = {c.runtime_dir}", f"sysfs_root = {c.sysfs_root}",
                 f"log_file = {c.log_file}", "require_guard = no"] + [f"{k} = {v}" for k, v in extra.items()]
        path = self.root / "libvirt-mdev.conf"
        path.write_text("[libvirt-mdev]\n" + "\n".join(lines) + "\n")
        return path


@pytest.fixture
def proxy_env(tmp_path: Path) -> Iterator[ProxyEnv]:
    make_fake_sysfs(tmp_path / "sys", parents={PARENT: ["nvidia-222", "nvidia-223", "nvidia-224"]},
                    devices={U1: (PARENT, "nvidia-222"), U2: (PARENT, "nvidia-224")})
    config = Config(store=tmp_path / "store", runtime_dir=tmp_path / "run", sysfs_root=tmp_path / "sys",
                    log_file=tmp_path / "proxy.log", require_guard=False)  # a root-namespace rig without the no-bypass guard (tests/guard tests the guard itself)
    env = ProxyEnv(tmp_path, config)
    setup_logging("libvirt-mdev-proxy-test", config.log_file, syslog=False)
    yield env
    for px in env.proxies:
        px.stop()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """TLS certificates (tests/sign/pki.py) for hosts "A" and "B" of one CA, and "other": an "A" of another CA."""
    pki_mod = pytest.importorskip("tests.sign.pki")
    base = tmp_path_factory.mktemp("pki")
    dirs = pki_mod.make_pki(base / "ours", "A", "B")
    dirs["other"] = pki_mod.make_pki(base / "other", "A")["A"]
    return dirs  # type: ignore[no-any-return]


class Sink:
    """A TCP listener that records every byte of each connection (the 'destination QEMU')."""

    def __init__(self, reply: bytes = b"") -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.reply = reply
        self.received: list[bytearray] = []
        self.reset = False
        self._done = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint("127.0.0.1", self.sock.getsockname()[1])

    @property
    def data(self) -> bytes:
        return bytes(self.received[0]) if self.received else b""

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        buf = bytearray()
        self.received.append(buf)
        if self.reply:
            conn.sendall(self.reply)  # a return-path message for the source
        try:
            while True:
                chunk = conn.recv(1 << 20)
                if not chunk:
                    break
                buf += chunk
        except ConnectionResetError:
            self.reset = True
        conn.close()
        self._done.set()

    def wait(self, timeout: float = 30) -> bool:
        return self._done.wait(timeout)

    def close(self) -> None:
        self.sock.close()


@dataclass
class Replay:
    """What a replaying client saw: bytes returned to it and how the connection ended."""

    back: bytes
    reset: bool


def replay(port: int, data: bytes, *, close_early: bool = False) -> Replay:
    """Send *data* to the proxy as a source QEMU would, then read the return path to EOF."""
    c = socket.create_connection(("127.0.0.1", port))
    reset = False
    try:
        c.sendall(data)
        if close_early:
            c.close()
            return Replay(b"", False)
        c.shutdown(socket.SHUT_WR)
        back = bytearray()
        while True:
            chunk = c.recv(65536)
            if not chunk:
                break
            back += chunk
    except OSError:  # reset by the proxy: ECONNRESET, EPIPE, ENOTCONN
        reset, back = True, bytearray()
    finally:
        c.close()
    return Replay(bytes(back), reset)


def wait_results(px: MigrationProxy, n: int = 1, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while len(px.results) < n:
        assert time.monotonic() < deadline, f"proxy finished {len(px.results)} of {n} sessions"
        time.sleep(0.02)


def assert_source_kept_the_guest(src: QemuVM, timeout: float = 60) -> None:
    """The source's migration ended as failed, and the source runs its guest again."""
    info = src.wait_migration_end(timeout)
    assert info["status"] == "failed", info
    src.wait_status("running", timeout=30)  # QEMU resumes the guest just after "failed"


def synthetic_devices() -> list[SyntheticVfioDevice]:
    return [SyntheticVfioDevice(idstr=ID_A, precopy_size=150_000, stopcopy_size=2_500_000, marker=MARK_A, seed=21),
            SyntheticVfioDevice(idstr=ID_B, stopcopy_size=70_001, framing="v2", marker=MARK_B, seed=22)]


@pytest.fixture(scope="session")
def injected_stream(real_qmp_stream: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, list]:
    """A recorded real QEMU 7.2 stream with two synthetic VFIO devices (A: v1 framing with
    precopy, 2.5 MB; B: v2 framing) injected where QEMU would put them."""
    out = tmp_path_factory.mktemp("pinj") / "vfio.stream"
    devs = synthetic_devices()
    with open(out, "wb") as fh:
        inject(str(real_qmp_stream), fh, devs)
    return out.read_bytes(), devs
