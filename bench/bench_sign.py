#!/usr/bin/env python3
"""Signed vs unsigned migrations through the real proxies: total time, downtime, peak RSS.

Both ends run the real CLI proxy in its own process (``libvirt-mdev proxy --once``), as
in production; each proxy's peak RSS is its ``VmHWM`` just before it exits.

* **unsigned**: source ``proxy --mode relay`` → destination ``proxy`` (splice, no keys)
* **signed**:   source ``proxy --mode sign`` → destination ``proxy`` with
  ``require_signature = yes`` (format 2: each VFIO block signed ahead of itself, held
  and verified before it is forwarded; docs/signing-wire.md)

Two workloads, rounds alternating unsigned / signed so drift hits both alike:

``qemu``  a real QEMU 7.2 live migration of a TCG guest whose RAM is a random file
          (no VFIO device: only the hello is signed); QEMU's own total-time and downtime.
``vfio``  a stream in QEMU's framing with one synthetic VFIO device of ``--vfio-mib``
          MiB of state (v2 framing, 1 MiB blocks, as QEMU >= 8.0 writes them) replayed
          at socket speed into a byte sink standing in for the destination QEMU.
          *total*: first byte sent → last byte at the sink; *stop-copy*: the moment the
          sender reaches the device's END section → last byte at the sink (what the
          proxies add to the downtime while the device's final state crosses).

    python3 bench/bench_sign.py [--mib 512] [--vfio-mib 512] [--rounds 3] [--only qemu|vfio] [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from libvirt_mdev.sign.keys import generate_key, write_key_pair  # noqa: E402
from libvirt_mdev.store.pending import write_pending  # noqa: E402
from libvirt_mdev.stream import SectionHeader, iter_events  # noqa: E402
from libvirt_mdev.stream.wire import SectionType  # noqa: E402

BANDWIDTH = 10 << 30
PARENT = "0000:3b:00.0"
MDEV = "4b20d080-1b54-4048-85b3-a6a62d165c01"
IDSTR = "0000:00:05.0/vfio"
MDEV_TYPE = "nvidia-222"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


class World:
    """Config files, keys, fake sysfs, domain XML for one source and one destination host."""

    def __init__(self, work: Path, with_mdev: bool) -> None:
        from testkit.fakesysfs import make_fake_sysfs
        self.work = work
        self.domain = str(uuid.uuid4())
        work.mkdir(parents=True, exist_ok=True)
        make_fake_sysfs(work / "sys", parents={PARENT: [MDEV_TYPE]}, devices={MDEV: (PARENT, MDEV_TYPE)})
        key = generate_key("bench-src")
        kdir = work / f"keys-{self.domain[:8]}"
        write_key_pair(key, kdir, uid=os.geteuid())
        pub = work / "src.pub"
        pub.write_text(key.public.to_text())
        pub.chmod(0o644)
        hostdev = ("<hostdev mode='subsystem' type='mdev' model='vfio-pci'>"
                   f"<source><address uuid='{MDEV}'/></source>"
                   "<address type='pci' domain='0x0000' bus='0x00' slot='0x05' function='0x0'/></hostdev>"
                   if with_mdev else "")
        self.xml = work / "dom.xml"
        self.xml.write_text(f"<domain type='kvm'><name>bench</name><uuid>{self.domain}</uuid>"
                            f"<devices>{hostdev}</devices></domain>")
        self.devices = [{"mdev_uuid": MDEV, "idstr": IDSTR, "type": MDEV_TYPE}] if with_mdev else []
        # loopback benches have no nftables guard in front of QEMU (docs/guard.md): the proxies must not insist
        common = f"sysfs_root = {work / 'sys'}\nlog_file = {work / 'proxy.log'}\nrequire_guard = no\n"
        self.src_conf = work / "src.conf"
        self.src_conf.write_text(f"[libvirt-mdev]\nstore = {work / 'src-store'}\nruntime_dir = {work / 'src-run'}\n"
                                 f"host_key = {kdir / 'host.key'}\n{common}")
        self.dst_plain = work / "dst-plain.conf"
        self.dst_plain.write_text(f"[libvirt-mdev]\nstore = {work / 'store'}\nruntime_dir = {work / 'run'}\n{common}")
        self.dst_signed = work / "dst-signed.conf"
        self.dst_signed.write_text(f"[libvirt-mdev]\nstore = {work / 'store'}\nruntime_dir = {work / 'run'}\n"
                                   f"require_signature = yes\ntrusted_keys = {pub}\n{common}")

    def arm(self) -> None:
        write_pending(self.work / "run", {"domain_name": "bench", "domain_uuid": self.domain,
                                          "migration_id": f"bench-{time.monotonic_ns()}",
                                          "created": int(time.time()), "devices": self.devices})


class Proxy:
    """One CLI proxy process (``--once --json-log``)."""

    def __init__(self, conf: Path, forward: str, mode: str, extra: tuple[str, ...] = ()) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "libvirt_mdev.cli", "--config", str(conf), "proxy",
                                      "--listen", "127.0.0.1:0", "--forward", forward, "--mode", mode, "--once",
                                      "--json-log", *extra], cwd=REPO, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        hello = json.loads(self.proc.stdout.readline())
        self.port = int(hello["listen"].rsplit(":", 1)[1])
        self.rss = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._watch, daemon=True)
        self._t.start()

    def _watch(self) -> None:
        while not self._stop.is_set() and self.proc.poll() is None:
            try:
                self.rss = max(self.rss, peak_rss_kib(self.proc.pid))
            except (FileNotFoundError, ProcessLookupError):
                break
            time.sleep(0.01)

    def result(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        self.proc.wait(120)
        self._stop.set()
        self._t.join()
        session = json.loads(line) if line else {}
        if not session.get("ok"):
            raise RuntimeError(f"proxy session failed: {session}")
        return session


def proxies(w: World, signed: bool, forward: str) -> tuple[Proxy, Proxy]:
    """(source proxy, destination proxy); the source's listens where the source QEMU connects."""
    w.arm()
    dst = Proxy(w.dst_signed if signed else w.dst_plain, forward, "splice")
    if signed:
        src = Proxy(w.src_conf, f"127.0.0.1:{dst.port}", "sign", ("--domain", w.domain, "--domain-xml", str(w.xml)))
    else:
        src = Proxy(w.src_conf, f"127.0.0.1:{dst.port}", "relay")
    return src, dst


def rss_mib(p: Proxy) -> float:
    return round(p.rss / 1024, 1)


# -- workload 1: a real QEMU live migration -----------------------------------------------------


def qemu_round(w: World, ram: Path, mib: int, signed: bool) -> dict[str, Any]:
    from tests.harness.qemu_vm import QemuVM  # retries its QMP connect while QEMU is not listening yet
    qport = free_port()
    with QemuVM(w.work, name="ssrc", memory_mib=mib, with_disk=False, ram_file=ram,
                extra_args=["-uuid", w.domain]) as src, \
            QemuVM(w.work, name="sdst", memory_mib=mib, with_disk=False, ram_file=ram, incoming_defer=True,
                   extra_args=["-uuid", w.domain]) as dst:
        dst.incoming(f"tcp:127.0.0.1:{qport}")
        sp, dp = proxies(w, signed, f"127.0.0.1:{qport}")
        src.migrate(f"tcp:127.0.0.1:{sp.port}", max_bandwidth=BANDWIDTH)
        while True:
            info = src.query_migrate()
            if info.get("status") in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.02)
        if info.get("status") != "completed":
            raise RuntimeError(f"migration {info.get('status')}: {info.get('error-desc')}")
        dst.wait_status("running", 120)
        s, d = sp.result(), dp.result()
        return {"total_ms": info["total-time"], "downtime_ms": info.get("downtime"), "bytes": d["bytes_in"],
                "src_rss_mib": rss_mib(sp), "dst_rss_mib": rss_mib(dp), "src_bytes_out": s["bytes_out"]}


def random_file(path: Path, mib: int) -> None:
    if path.exists() and path.stat().st_size == mib << 20:
        return
    with open(path, "wb") as fh:
        for _ in range(mib):
            fh.write(os.urandom(1 << 20))


# -- workload 2: device state in QEMU's framing ---------------------------------------------------


def vfio_stream(path: Path, vfio_mib: int) -> int:
    """Write the stream; return the offset of the device's END section."""
    from testkit.synth import SyntheticVfioDevice, inject
    from tests.stream.builders import small_stream
    base = path.with_suffix(".base")
    base.write_bytes(small_stream())
    dev = SyntheticVfioDevice(idstr=IDSTR, stopcopy_size=vfio_mib << 20, framing="v2", seed=7)
    with open(path, "wb") as fh:
        inject(str(base), fh, [dev])
    with open(path, "rb") as fh:
        for ev in iter_events(fh):
            if isinstance(ev, SectionHeader) and ev.kind == "vfio" and ev.type == SectionType.SECTION_END:
                return ev.offset
    raise RuntimeError("no VFIO END section")


class Sink:
    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.port = self.sock.getsockname()[1]
        self.bytes = 0
        self.last = 0.0
        self.t = threading.Thread(target=self._run, daemon=True)
        self.t.start()

    def _run(self) -> None:
        conn, _ = self.sock.accept()
        buf = bytearray(1 << 20)
        while n := conn.recv_into(buf):
            self.bytes += n
        self.last = time.monotonic()
        conn.close()
        self.sock.close()


def vfio_round(w: World, stream: Path, end_at: int, signed: bool) -> dict[str, Any]:
    sink = Sink()
    sp, dp = proxies(w, signed, f"127.0.0.1:{sink.port}")
    c = socket.create_connection(("127.0.0.1", sp.port))
    t_end: float | None = None
    sent = 0
    t0 = time.monotonic()
    with open(stream, "rb") as fh:
        while chunk := fh.read(1 << 20):
            if t_end is None and sent + len(chunk) > end_at:
                c.sendall(chunk[:end_at - sent])
                t_end = time.monotonic()
                chunk = chunk[end_at - sent:]
                sent = end_at
            c.sendall(chunk)
            sent += len(chunk)
    c.shutdown(socket.SHUT_WR)
    while c.recv(65536):
        pass
    c.close()
    sink.t.join(120)
    s, d = sp.result(), dp.result()
    if sink.bytes != d["bytes_out"] or d["bytes_out"] != sent:
        raise RuntimeError(f"the sink got {sink.bytes} bytes of {sent}")
    assert t_end is not None
    return {"total_ms": round((sink.last - t0) * 1000), "stopcopy_ms": round((sink.last - t_end) * 1000),
            "bytes": sent, "src_rss_mib": rss_mib(sp), "dst_rss_mib": rss_mib(dp), "src_bytes_out": s["bytes_out"]}


# -- driver -------------------------------------------------------------------------------------


def median_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    keys = [k for k in rows[0] if isinstance(rows[0][k], (int, float))]
    out: dict[str, Any] = {k: statistics.median(r[k] for r in rows) for k in keys}
    for k in ("src_rss_mib", "dst_rss_mib"):
        out[f"{k}_max"] = max(r[k] for r in rows)
    return out


def run(name: str, rounds: int, one: Any) -> dict[str, Any]:
    rows: dict[str, list[dict[str, Any]]] = {"unsigned": [], "signed": []}
    for i in range(rounds):
        for kind in ("unsigned", "signed"):
            r = one(kind == "signed")
            rows[kind].append(r)
            print(f"{name} round {i + 1} {kind:8s} " + " ".join(f"{k} {v}" for k, v in r.items()), file=sys.stderr)
    med = {k: median_rows(v) for k, v in rows.items()}
    return {"median": med, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    ap.add_argument("--mib", type=int, default=512, help="guest RAM of the QEMU workload")
    ap.add_argument("--vfio-mib", type=int, default=512, help="device state of the VFIO workload")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", choices=("qemu", "vfio"))
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--workdir", type=Path)
    a = ap.parse_args()
    work = a.workdir or Path(tempfile.mkdtemp(prefix="bench-sign-"))
    summary: dict[str, Any] = {"rounds": a.rounds}
    if a.only in (None, "vfio"):
        w = World(work / "vfio", with_mdev=True)
        stream = work / "vfio.stream"
        end_at = vfio_stream(stream, a.vfio_mib)
        summary["vfio"] = dict(run("vfio", a.rounds, lambda s: vfio_round(w, stream, end_at, s)),
                               vfio_mib=a.vfio_mib)
    if a.only in (None, "qemu"):
        w = World(work / "qemu", with_mdev=False)
        ram = work / "ram.bin"
        random_file(ram, a.mib)
        summary["qemu"] = dict(run("qemu", a.rounds, lambda s: qemu_round(w, ram, a.mib, s)), mib=a.mib)
    if a.json:
        print(json.dumps(summary, indent=2))
        return
    for name in ("vfio", "qemu"):
        if name not in summary:
            continue
        for kind, m in summary[name]["median"].items():
            print(f"{name:5s} {kind:8s} " + "  ".join(f"{k} {v}" for k, v in m.items()))


if __name__ == "__main__":
    main()
