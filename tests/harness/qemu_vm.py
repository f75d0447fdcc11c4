"""QEMU run directly (no libvirt), driven over QMP with the qemu.qmp library.

This is how the tests get a raw migration stream (what travels between QEMUs, without libvirt's save header) and
how they feed one back into a destination started with `-incoming defer`. TCG and `-nodefaults` keep the device
set identical run to run, so streams from two runs have the same sections.
"""
from __future__ import annotations

import asyncio
import atexit
import shlex
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient

from ._proc import HarnessError, run, tail, terminate

QEMU = "/usr/bin/qemu-system-x86_64"
QMP_TIMEOUT = 30.0
MIGRATION_TIMEOUT = 300.0
# RAM block name of `-m` memory on the pc machine; a file-backed RAM must reuse it so streams stay loadable by a
# plain destination (QEMU matches RAM blocks by name).
RAM_ID = "pc.ram"


@dataclass
class QemuVM:
    """A TCG VM: -M pc, virtio-net on `-netdev user`, a qemu-xhci controller, serial to a file, a qcow2 disk.

    incoming_defer=True starts it with `-incoming defer`, ready for incoming(uri).
    ram_file: back guest RAM with a private mapping of this file, so the RAM (and thus the stream) carries the
    file's bytes instead of zero pages (the file must be exactly memory_mib MiB).
    ram_shared: map ram_file shared instead (writes go to the file): a destination whose RAM lives in a
    tmpfs file written once before gets no new pages from the kernel as the migration fills it.
    """

    workdir: Path
    name: str = "vm"
    memory_mib: int = 256
    disk: Path | None = None
    with_disk: bool = True
    incoming_defer: bool = False
    ram_file: Path | None = None
    ram_shared: bool = False
    extra_args: Sequence[str] = ()
    proc: subprocess.Popen | None = field(init=False, default=None)
    _loop: asyncio.AbstractEventLoop | None = field(init=False, default=None)
    _qmp: QMPClient | None = field(init=False, default=None)

    @property
    def qmp_path(self) -> Path:
        return Path(self.workdir) / f"{self.name}.qmp"

    @property
    def serial_log(self) -> Path:
        return Path(self.workdir) / f"{self.name}.serial"

    @property
    def stderr_log(self) -> Path:
        return Path(self.workdir) / f"{self.name}.stderr"

    def __enter__(self) -> QemuVM:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def command_line(self) -> list[str]:
        args = [QEMU, "-name", self.name, "-nodefaults", "-no-user-config", "-accel", "tcg", "-display", "none",
                "-M", "pc", "-m", f"{self.memory_mib}M",
                "-qmp", f"unix:{self.qmp_path},server=on,wait=off",
                "-netdev", "user,id=net0", "-device", "virtio-net-pci,netdev=net0,id=nic0,romfile=",
                "-device", "qemu-xhci,id=usb0",
                "-serial", f"file:{self.serial_log}",
                "-boot", "order=n"]
        if self.ram_file is not None:
            args += ["-object", f"memory-backend-file,id={RAM_ID},size={self.memory_mib}M,"
                                f"mem-path={self.ram_file},share={'on' if self.ram_shared else 'off'}",
                     "-machine", f"memory-backend={RAM_ID}"]
        if self.disk is not None:
            args += ["-drive", f"file={self.disk},if=none,id=disk0,format=qcow2",
                     "-device", "virtio-blk-pci,drive=disk0,id=vda"]
        if self.incoming_defer:
            args += ["-incoming", "defer"]
        return [*args, *self.extra_args]

    def start(self) -> None:
        """Launch QEMU and connect QMP; raises HarnessError with QEMU's stderr if it dies or never listens."""
        Path(self.workdir).mkdir(parents=True, exist_ok=True)
        if self.with_disk and self.disk is None:
            self.disk = Path(self.workdir) / f"{self.name}.qcow2"
            run(["qemu-img", "create", "-q", "-f", "qcow2", str(self.disk), "64M"])
        self.qmp_path.unlink(missing_ok=True)
        with self.stderr_log.open("wb") as err:
            self.proc = subprocess.Popen(self.command_line(), stdin=subprocess.DEVNULL, stdout=err, stderr=err)
        # Safety net: a test that forgets stop() (or dies first) must not leave QEMU running after pytest exits.
        atexit.register(self.stop)
        try:
            self._connect()
        except BaseException:
            self.stop()
            raise

    def _connect(self) -> None:
        """Connect QMP, retrying until QMP_TIMEOUT while the socket is missing or refuses.

        QEMU creates the socket file (bind) a moment before it listens on it, so on a loaded machine a connect
        right after the file appears can be refused (seen as a rare flake); that, and a file not there yet, are
        waited out. Any other failure, or QEMU exiting, ends the wait at once with QEMU's stderr.
        """
        assert self.proc is not None
        deadline = time.monotonic() + QMP_TIMEOUT
        self._loop = asyncio.new_event_loop()
        attempts = 0
        while True:
            if self.proc.poll() is not None:
                raise HarnessError(f"QEMU {self.name} exited with {self.proc.returncode}: {tail(self.stderr_log)}")
            if self.qmp_path.exists():
                attempts += 1
                client = QMPClient(self.name)
                try:
                    self._run(client.connect(str(self.qmp_path)))
                except Exception as exc:
                    if not _not_listening_yet(exc):
                        self._connect_failed(exc)
                    if time.monotonic() > deadline:
                        self.stop()
                        raise HarnessError(f"QEMU {self.name}: QMP {self.qmp_path} still refuses after "
                                           f"{QMP_TIMEOUT:.0f}s ({attempts} attempts): {exc}") from exc
                else:
                    self._qmp = client
                    return
            elif time.monotonic() > deadline:
                raise HarnessError(f"QEMU {self.name} did not create {self.qmp_path} within {QMP_TIMEOUT:.0f}s")
            time.sleep(0.02)

    def _connect_failed(self, exc: Exception) -> None:
        """Raise HarnessError for a QMP connect that failed for a reason other than "not listening yet"."""
        assert self.proc is not None
        # QEMU creates the QMP socket before it checks the devices, so a bad command line shows up here.
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            # __exit__ never runs when __enter__ fails: stop QEMU here or it outlives the test
            self.stop()
            raise HarnessError(f"QEMU {self.name}: QMP connect failed ({exc!r}); {tail(self.stderr_log)}") from exc
        raise HarnessError(f"QEMU {self.name} exited with {self.proc.returncode}: {tail(self.stderr_log)}") from exc

    def qmp(self, command: str, **arguments: Any) -> Any:
        """Execute one QMP command and return its result (qemu.qmp raises ExecuteError on an error reply)."""
        if self._qmp is None:
            raise HarnessError(f"QEMU {self.name} is not running; start() it first")
        return self._run(self._qmp.execute(command, arguments or None))

    def status(self) -> str:
        """The run state from query-status: 'running', 'paused', 'inmigrate', 'postmigrate', ..."""
        return self.qmp("query-status")["status"]

    def query_migrate(self) -> dict[str, Any]:
        return self.qmp("query-migrate")

    def migrate(self, uri: str, *, max_bandwidth: int = 1 << 34) -> None:
        """Start an outgoing migration; the default bandwidth cap of 32 MiB/s would only slow the tests down."""
        self.qmp("migrate-set-parameters", **{"max-bandwidth": max_bandwidth})
        self.qmp("migrate", uri=uri)

    def wait_migration(self, timeout: float = MIGRATION_TIMEOUT) -> dict[str, Any]:
        """Poll query-migrate until 'completed' (returned) or 'failed'/'cancelled' (HarnessError)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.query_migrate()
            state = info.get("status")
            if state == "completed":
                return info
            if state in ("failed", "cancelled"):
                raise HarnessError(f"QEMU {self.name}: migration {state}: {info.get('error-desc', info)}")
            time.sleep(0.05)
        raise HarnessError(f"QEMU {self.name}: migration not completed within {timeout:.0f}s: {self.query_migrate()}")

    def wait_migration_end(self, timeout: float = MIGRATION_TIMEOUT) -> dict[str, Any]:
        """Poll query-migrate until the migration ended ('completed', 'failed' or 'cancelled'): that last answer
        (for a test that expects a failure); HarnessError when it still runs after *timeout* seconds."""
        deadline = time.monotonic() + timeout
        while (info := self.query_migrate()).get("status") not in ("completed", "failed", "cancelled"):
            if time.monotonic() >= deadline:
                raise HarnessError(f"QEMU {self.name}: migration still {info.get('status')} after {timeout:.0f}s")
            time.sleep(0.05)
        return info

    def wait_transferred(self, nbytes: int, timeout: float = 30) -> None:
        """Poll query-migrate until the running migration has sent at least *nbytes* of RAM."""
        deadline = time.monotonic() + timeout
        while ((info := self.query_migrate()).get("ram") or {}).get("transferred", 0) < nbytes:
            if time.monotonic() >= deadline:
                raise HarnessError(f"QEMU {self.name}: not {nbytes} bytes of RAM sent after {timeout:.0f}s: {info}")
            time.sleep(0.02)

    def migrate_to_file(self, path: Path, timeout: float = MIGRATION_TIMEOUT) -> dict[str, Any]:
        """Write the raw migration stream to *path* (through `exec:cat`) and wait until QEMU says completed."""
        self.migrate(f"exec:cat > {shlex.quote(str(path))}")
        return self.wait_migration(timeout)

    def incoming(self, uri: str) -> None:
        """Start listening/reading for an incoming stream on a VM started with incoming_defer=True."""
        self.qmp("migrate-incoming", uri=uri)

    def wait_status(self, wanted: str, timeout: float = MIGRATION_TIMEOUT) -> None:
        """Wait for the run state *wanted* (e.g. 'running' after an incoming migration finished)."""
        deadline = time.monotonic() + timeout
        while (state := self.status()) != wanted:
            if time.monotonic() > deadline:
                raise HarnessError(f"QEMU {self.name}: state {state!r}, wanted {wanted!r} after {timeout:.0f}s")
            time.sleep(0.05)

    def stop(self) -> None:
        """Disconnect QMP and stop QEMU by its pid (SIGTERM, then SIGKILL); reaps it so no zombie stays.

        The QEMU is stopped even when the QMP disconnect fails in any way (a dead VM, a cancelled coroutine).
        """
        try:
            if self._qmp is not None and self._loop is not None:
                self._run(self._qmp.disconnect())
        except BaseException:
            pass
        finally:
            self._qmp = None
            if self.proc is not None:
                if self.proc.poll() is None:
                    terminate([self.proc.pid], timeout=10.0)
                self.proc.wait(timeout=10)
                self.proc = None
            if self._loop is not None:
                self._loop.close()
                self._loop = None
            atexit.unregister(self.stop)

    def _run(self, coro: Any) -> Any:
        assert self._loop is not None
        return self._loop.run_until_complete(asyncio.wait_for(coro, QMP_TIMEOUT))


def _not_listening_yet(exc: BaseException) -> bool:
    """True for the connect errors of a socket QEMU has not started listening on (or has not created) yet."""
    cause = getattr(exc, "exc", exc)  # qemu.qmp's ConnectError wraps the OSError
    return isinstance(cause, (ConnectionRefusedError, FileNotFoundError))
