"""Run the CLI as a user does (`python -m libvirt_mdev.cli` in a subprocess, from this checkout) and check a refusal
the way CONTRIBUTING.md asks for it: one line on stderr naming the fix, the exact exit code, never a traceback."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PREFIX = "libvirt-mdev: "


def cli_env(config: Path | str | None = None, *, clean: bool = False) -> dict[str, str]:
    """The environment of a CLI run: this process's (or, with *clean*, only PATH), the checkout on PYTHONPATH, and
    LIBVIRT_MDEV_CONFIG set to *config* or, when None, removed (the CLI then reads its default path)."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin")} if clean else dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    if config is None:
        env.pop("LIBVIRT_MDEV_CONFIG", None)
    else:
        env["LIBVIRT_MDEV_CONFIG"] = str(config)
    return env


def run_cli(*args: str, config: Path | str | None = None, clean_env: bool = False, check: bool = False,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`python -m libvirt_mdev.cli ARGS` from the repository root; *check* raises with stderr on a non-zero exit."""
    r = subprocess.run([sys.executable, "-m", "libvirt_mdev.cli", *args], cwd=REPO, env=cli_env(config, clean=clean_env),
                       capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    if check and r.returncode:
        raise AssertionError(f"{args}: rc={r.returncode} {r.stderr}")
    return r


def one_line_error(stderr: str, *words: str, rc: int | None = None, code: int | None = None) -> str:
    """A refusal: exactly one line on stderr, starting with "libvirt-mdev: ", no traceback, containing each of
    *words*; with *code*, the exit code *rc* must be exactly that. Returns the line."""
    if code is not None:
        assert rc == code, (rc, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith(PREFIX) and "Traceback" not in stderr, stderr
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]
