"""Real migration streams from the QEMU on PATH, made at test time (no libvirt).

The guests are firmware-only TCG VMs (no disk, no OS): what matters is the stream QEMU
writes for a given machine, device set and set of migration capabilities.  Features are
probed on the QEMU itself (device help, ``query-migrate-capabilities``), never by a
version string, so the tests that need QEMU ≥ 8 skip cleanly on Debian 12's QEMU 7.2.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Self

from tests.harness.relay import pump

QEMU = "qemu-system-x86_64"
MIGRATION_TIMEOUT = 240.0


class QmpError(RuntimeError):
    pass


def qemu_binary() -> str | None:
    return shutil.which(QEMU)


def has_device(device: str) -> bool:
    """Does the QEMU on PATH know *device*?"""
    exe = qemu_binary()
    if exe is None:
        return False
    out = subprocess.run([exe, "-device", f"{device},help"], capture_output=True, text=True, timeout=60, check=False)
    return out.returncode == 0 and "not found" not in (out.stderr + out.stdout)


class Qmp:
    """A minimal synchronous QMP client (line-delimited JSON over a unix socket)."""

    def __init__(self, path: Path, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._sock.connect(str(path))
                break
            except OSError:
                self._sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self._sock.settimeout(timeout)
        self._file = self._sock.makefile("rwb")
        self._read()  # greeting
        self.cmd("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        while True:
            line = self._file.readline()
            if not line:
                raise QmpError("QMP connection closed")
            msg = json.loads(line)
            if "event" not in msg:
                return msg  # type: ignore[no-any-return]

    def cmd(self, name: str, **args: Any) -> Any:
        self._file.write(json.dumps({"execute": name, "arguments": args}).encode() + b"\n")
        self._file.flush()
        reply = self._read()
        if "error" in reply:
            raise QmpError(f"{name}: {reply['error'].get('desc')}")
        return reply.get("return")

    def close(self) -> None:
        self._file.close()
        self._sock.close()


class Guest:
    """A running firmware-only guest on the QEMU on PATH, paused or running."""

    def __init__(self, workdir: Path, machine: str = "q35", memory: str = "256M",
                 extra: Sequence[str] = (), name: str = "src", incoming: bool = False) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.qmp_path = workdir / f"{name}.qmp"
        self.stderr = workdir / f"{name}.stderr"
        exe = qemu_binary()
        assert exe is not None
        args = [exe, "-nodefaults", "-no-user-config", "-accel", "tcg", "-display", "none",
                "-M", machine, "-m", memory, "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
                "-serial", "none", "-device", "isa-debugcon,iobase=0x402,chardev=dbg", "-chardev",
                f"file,id=dbg,path={workdir / (name + '.dbg')}", *extra]
        if incoming:
            args += ["-incoming", "defer"]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=open(self.stderr, "wb"))
        try:
            self.qmp = Qmp(self.qmp_path)
        except (OSError, QmpError):
            self.stop()
            raise QmpError(f"QEMU did not start: {self.stderr.read_text()[-2000:]}") from None

    def capabilities(self) -> set[str]:
        return {c["capability"] for c in self.qmp.cmd("query-migrate-capabilities")}

    def migrate_to(self, uri: str, caps: Sequence[str] = (), params: dict[str, Any] | None = None) -> None:
        if caps:
            self.qmp.cmd("migrate-set-capabilities",
                         capabilities=[{"capability": c, "state": True} for c in caps])
        if params:
            self.qmp.cmd("migrate-set-parameters", **params)
        self.qmp.cmd("migrate", uri=uri)
        self.wait_migration()

    def wait_migration(self) -> None:
        deadline = time.monotonic() + MIGRATION_TIMEOUT
        while time.monotonic() < deadline:
            st = self.qmp.cmd("query-migrate").get("status")
            if st == "completed":
                return
            if st in ("failed", "cancelled"):
                raise QmpError(f"migration {st}: {self.qmp.cmd('query-migrate').get('error-desc')}")
            time.sleep(0.1)
        raise QmpError("migration timed out")

    def stop(self) -> None:
        try:
            self.proc.terminate()
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.qmp.close()
        finally:
            self.stop()


def virtio_mem_args(requested: str = "64M", size: str = "512M") -> list[str]:
    """A virtio-mem device (plugged memory *requested* of *size*) on a memory backend."""
    return ["-object", f"memory-backend-ram,id=vmem0,size={size}",
            "-device", f"virtio-mem-pci,id=vm0,memdev=vmem0,node=0,requested-size={requested}",
            "-numa", "node,nodeid=0,cpus=0,memdev=ram0",
            "-object", "memory-backend-ram,id=ram0,size=256M"]


def stream_of(workdir: Path, out: Path, machine: str, extra: Sequence[str] = (), caps: Sequence[str] = (),
              params: dict[str, Any] | None = None, memory: str = "256M", uri: str | None = None,
              run_for: float = 0.5) -> Path:
    """Migrate a fresh guest to the file *out* (``exec:cat`` unless *uri* is given)."""
    with Guest(workdir, machine=machine, memory=memory, extra=extra) as g:
        time.sleep(run_for)
        g.migrate_to(uri or f"exec:cat > {out}", caps, params)
    return out


def env_note() -> str:
    return os.environ.get("PATH", "")


def live_stream_of(workdir: Path, out: Path, machine: str, extra: Sequence[str] = (), caps: Sequence[str] = (),
                   memory: str = "256M", run_for: float = 0.5) -> Path:
    """Migrate a fresh guest to a real destination QEMU over a unix socket, with *caps* on
    both sides (e.g. return-path, switchover-ack), recording the source's bytes in *out*.
    The destination must load the stream: a recording of a migration that completed."""
    import threading
    relay_path = workdir / "relay.sock"
    dest_path = workdir / "dest.sock"
    for p in (relay_path, dest_path):
        if p.exists():
            p.unlink()
    with Guest(workdir, machine=machine, memory=memory, extra=extra, name="dst", incoming=True) as dst, \
            Guest(workdir, machine=machine, memory=memory, extra=extra, name="src") as src:
        if caps:
            for g in (dst, src):
                g.qmp.cmd("migrate-set-capabilities",
                          capabilities=[{"capability": c, "state": True} for c in caps])
        dst.qmp.cmd("migrate-incoming", uri=f"unix:{dest_path}")
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lsock.bind(str(relay_path))
        lsock.listen(1)
        time.sleep(run_for)
        src.qmp.cmd("migrate", uri=f"unix:{relay_path}")
        lsock.settimeout(60)
        a, _ = lsock.accept()
        b = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        b.connect(str(dest_path))
        with open(out, "wb") as rec:
            fwd = threading.Thread(target=pump, args=(a, b, rec.write), daemon=True)
            back = threading.Thread(target=pump, args=(b, a, None), daemon=True)
            fwd.start()
            back.start()
            src.wait_migration()
            fwd.join(60)
        deadline = time.monotonic() + 60
        while dst.qmp.cmd("query-status")["status"] in ("inmigrate", "restore-vm") and time.monotonic() < deadline:
            time.sleep(0.1)
        status = dst.qmp.cmd("query-status")["status"]
        for s in (a, b, lsock):
            s.close()
        if status in ("inmigrate", "internal-error"):
            raise QmpError(f"destination did not load the stream (status {status})")
    return out


def run_filter(src_path: Path, dst_path: Path, store: Any, mode: str) -> list[Any]:
    """strip (``token``) or splice a save image of any format through libvirt_mdev.io.compress,
    writing it back in its own format (sparse images stay sparse)."""
    from libvirt_mdev.filter import FilterOptions, filter_stream
    from libvirt_mdev.io.compress import ImageSink, open_image

    opts = FilterOptions(mode=mode, accept_tokens=mode == "splice", bind_from_save_image=False)
    with open(src_path, "rb") as raw, open_image(raw) as src, open(dst_path, "wb", buffering=0) as out:
        sink = ImageSink(out.write, sparse_file=out)
        res = filter_stream(src, sink.write, store, opts)
        sink.close()
    return res

