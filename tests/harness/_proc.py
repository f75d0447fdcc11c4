"""Process helpers shared by the harness modules.

Kept apart from the host/VM classes because every one of them needs the same three things: run a command and
fail with its stderr in the message, tell whether a pid is really gone (PID 1 here reaps late, docs/testing.md
pitfall 10), and stop a pid politely before forcefully.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path


class HarnessError(RuntimeError):
    """The test infrastructure itself failed (a daemon did not start, a command failed).

    Distinct from the product's error hierarchy on purpose: a test that sees this knows the fault is in the
    environment or the harness, not in libvirt_mdev.
    """


def run(args: Sequence[str], *, check: bool = True, timeout: float = 120.0,
        input: str | bytes | None = None, text: bool = True, env: dict[str, str] | None = None,
        ) -> subprocess.CompletedProcess:
    """Run *args* and capture output; on failure raise HarnessError naming the command, rc and stderr."""
    try:
        proc = subprocess.run(list(args), capture_output=True, timeout=timeout, input=input, text=text, env=env)
    except subprocess.TimeoutExpired as exc:
        raise HarnessError(f"command timed out after {timeout:.0f}s: {' '.join(args)}") from exc
    if check and proc.returncode != 0:
        err = proc.stderr if text else proc.stderr.decode(errors="replace")
        raise HarnessError(f"command failed (rc={proc.returncode}): {' '.join(args)}\n{err.strip()}")
    return proc


def pid_alive(pid: int) -> bool:
    """True while *pid* exists and is not a zombie (a zombie still answers kill -0)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    for line in status.splitlines():
        if line.startswith("State:"):
            return "Z" not in line.split()[1]
    return True


def read_pid(path: Path) -> int | None:
    """The pid stored in a pid file, or None when the file is missing or empty."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    return int(text) if text.isdigit() else None


def wait_gone(pids: Sequence[int], timeout: float) -> list[int]:
    """Wait until every pid is gone or a zombie; return the ones still alive at the deadline."""
    deadline = time.monotonic() + timeout
    alive = [p for p in pids if pid_alive(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if pid_alive(p)]
    return alive


def terminate(pids: Sequence[int], timeout: float = 10.0) -> None:
    """SIGTERM the pids, wait, then SIGKILL whatever is left. Only ever called with pids this harness started."""
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    for pid in wait_gone(pids, timeout):
        _signal(pid, signal.SIGKILL)
    wait_gone(pids, 5.0)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def tail(path: Path, lines: int = 30) -> str:
    """Last lines of a log file for error messages; says so when the file does not exist."""
    try:
        content = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return f"(no log at {path})"
    return "\n".join(content[-lines:])
