"""Helpers to run real ``libvirt-mdev proxy`` processes against generated streams: a
destination host's side (fake sysfs with N mdevs, config file, store, pending records),
a hashing byte sink standing in for the destination QEMU, and a source made of
``gen_stream | socat`` (the stream never exists on disk or in the test's memory)."""
from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from libvirt_mdev.store.pending import write_pending
from testkit.fakesysfs import make_fake_sysfs

REPO = Path(__file__).resolve().parents[2]
PARENT = "0000:3b:00.0"
MDEV_TYPE = "nvidia-222"
IDSTR = "0000:00:05.0/vfio"


def mdev_uuid(i: int) -> str:
    return f"7a1c0000-0000-4000-8000-{i:012x}"


def domain_uuid(i: int) -> str:
    return f"7d000000-0000-4000-8000-{i:012x}"


def env(config: Path | None = None) -> dict[str, str]:
    e = dict(os.environ, PYTHONPATH=str(REPO))
    if config is not None:
        e["LIBVIRT_MDEV_CONFIG"] = str(config)
    return e


@dataclass
class DestHost:
    root: Path
    n: int

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def runtime(self) -> Path:
        return self.root / "run"

    @property
    def config(self) -> Path:
        return self.root / "libvirt-mdev.conf"

    def setup(self) -> DestHost:
        make_fake_sysfs(self.root / "sys", parents={PARENT: [MDEV_TYPE]},
                        devices={mdev_uuid(i): (PARENT, MDEV_TYPE) for i in range(self.n)})
        self.config.write_text(f"[libvirt-mdev]\nstore = {self.store}\nruntime_dir = {self.runtime}\n"
                               f"sysfs_root = {self.root / 'sys'}\nlog_file = {self.root / 'proxy.log'}\n"
                               "require_guard = no\n")  # a root-namespace rig without the no-bypass guard (tests/guard tests the guard itself)
        return self

    def arm(self, i: int, migration_id: str) -> None:
        """What the migrate-begin hook writes for domain *i*."""
        write_pending(self.runtime, {"domain_name": f"dom-{i}", "domain_uuid": domain_uuid(i),
                                     "migration_id": migration_id, "created": int(time.time()),
                                     "devices": [{"mdev_uuid": mdev_uuid(i), "idstr": IDSTR, "type": MDEV_TYPE}]})


class HashSink:
    """Accepts one connection and hashes everything it receives (the destination QEMU)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(2)
        self.port = self.sock.getsockname()[1]
        self.hasher = hashlib.sha256()
        self.count = 0
        self.reset = False
        self.done = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            self.done.set()
            return
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        try:
            while True:
                n = conn.recv_into(buf)
                if not n:
                    break
                self.hasher.update(view[:n])
                self.count += n
        except OSError:
            self.reset = True
        conn.close()
        self.sock.close()
        self.done.set()


def start_proxy(host: DestHost, i: int, forward_port: int) -> tuple[subprocess.Popen, int]:
    """A ``proxy --once`` for domain *i*; returns it and the port it listens on."""
    p = subprocess.Popen([sys.executable, "-m", "libvirt_mdev.cli", "proxy", "--listen", "127.0.0.1:0",
                          "--forward", f"127.0.0.1:{forward_port}", "--domain", domain_uuid(i), "--once",
                          "--json-log", "--connect-timeout", "5"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, env=env(host.config), text=True)
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line, p.stderr.read() if p.stderr else "proxy did not start"
    listen = json.loads(line)["listen"]
    return p, int(listen.rsplit(":", 1)[1])


def start_source(real: Path, seed: int, state: int, port: int, sha_out: Path) -> tuple[subprocess.Popen, subprocess.Popen]:
    """``gen_stream | socat - TCP:127.0.0.1:port``: a source QEMU sending the stream."""
    gen = subprocess.Popen([sys.executable, "-m", "tests.faults.gen_stream", str(real), str(seed), str(state),
                            str(sha_out)], stdout=subprocess.PIPE, cwd=REPO, env=env())
    cat = subprocess.Popen(["socat", "-u", "-", f"TCP:127.0.0.1:{port}"], stdin=gen.stdout,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert gen.stdout is not None
    gen.stdout.close()
    return gen, cat
