"""Helpers for the guard tests: a private network namespace (nft never runs in the root
namespace), a fake QEMU (a copy of the Python binary named ``qemu-system-x86_64``, so
/proc/PID/exe says "qemu") that listens where a test says, and running code as uid 65534."""
from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NOBODY = 65534
_seq = itertools.count()


@dataclass
class Netns:
    name: str

    def run(self, args: list[str], *, check: bool = True, input: str | None = None,
            env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(["ip", "netns", "exec", self.name, *args], capture_output=True, text=True, input=input,
                           env=env, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"{args} in {self.name}: rc {r.returncode}: {r.stdout}{r.stderr}")
        return r

    def popen(self, args: list[str], **kw: object) -> subprocess.Popen[str]:
        return subprocess.Popen(["ip", "netns", "exec", self.name, *args], text=True, **kw)  # type: ignore[call-overload]

    def cli(self, config: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.run([sys.executable, "-m", "libvirt_mdev.cli", "--config", str(config), *args], check=check,
                        env={**os.environ, "PYTHONPATH": str(REPO)})

    def py(self, code: str, *, uid: int | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run Python *code* in the namespace, as *uid* (setpriv) if given."""
        pre = ["setpriv", "--reuid", str(uid), "--regid", str(uid), "--clear-groups"] if uid is not None else []
        return self.run([*pre, sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(REPO)!r})\n" + code],
                        check=check)


@pytest.fixture
def netns() -> Iterator[Netns]:
    name = f"lmg{os.getpid()}x{next(_seq)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    try:
        yield Netns(name)
    finally:
        out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
        for pid in out:
            try:
                os.kill(int(pid), 9)
            except (ProcessLookupError, ValueError):
                pass
        subprocess.run(["ip", "netns", "del", name], check=False)


#: the fake QEMU: listens as argv says, writes "ready" to stdout, then sleeps
FAKE_QEMU = r"""
import socket, sys, time
socks = []
for spec in sys.argv[1:]:
    if spec.startswith("tcp:"):
        host, port = spec[4:].rsplit(":", 1)
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host.strip("[]"), int(port)))
        s.listen(4)
        socks.append(s)
    elif spec.startswith("unix:"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(spec[5:])
        s.listen(4)
        socks.append(s)
print("ready", flush=True)
time.sleep(600)
"""


@dataclass
class FakeQemu:
    proc: subprocess.Popen[str]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> FakeQemu:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture(scope="session")
def fake_qemu_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("fakeqemu")
    exe = d / "qemu-system-x86_64"
    shutil.copy2(os.path.realpath(sys.executable), exe)
    return exe


def start_fake_qemu(binary: Path, listen: list[str], domain: str, *, incoming: bool = True,
                    netns: Netns | None = None, pid_dir: Path | None = None) -> FakeQemu:
    """A process whose exe is named qemu, whose argv carries ``-name guest=DOMAIN`` (and
    ``-incoming defer``), listening on *listen*; its pid goes to ``PID_DIR/DOMAIN.pid``
    as libvirt writes it."""
    code_file = binary.parent / "fake_qemu.py"
    code_file.write_text(FAKE_QEMU)
    # python ignores argv after the script: the script parses only tcp:/unix: items
    argv = [str(binary), "-I", str(code_file), *listen, "-name", f"guest={domain},debug-threads=on",
            *(["-incoming", "defer"] if incoming else [])]
    if netns is not None:
        argv = ["ip", "netns", "exec", netns.name, *argv]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.strip() == "ready", proc.stderr.read() if proc.stderr else ""
    q = FakeQemu(proc)
    if netns is not None:  # ip netns exec execs: same pid
        pass
    if pid_dir is not None:
        pid_dir.mkdir(parents=True, exist_ok=True)
        (pid_dir / f"{domain}.pid").write_text(str(q.pid))
    time.sleep(0.05)
    return q
