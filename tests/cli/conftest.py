"""Run the CLI exactly as a user does: ``python -m libvirt_mdev.cli`` in a subprocess."""
from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HOSTS = REPO / "examples" / "hosts"


def host_uri(path: Path) -> str:
    return f"test://{path}"


@pytest.fixture
def run_cli(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    conf = tmp_path / "libvirt-mdev.conf"
    conf.write_text("[libvirt-mdev]\nrequire_annotation = yes\n")

    def run(*args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path),
               "PYTHONPATH": str(REPO), "LIBVIRT_MDEV_CONFIG": str(config or conf), "LC_ALL": "C.UTF-8"}
        return subprocess.run([sys.executable, "-m", "libvirt_mdev.cli", *args], cwd=REPO, env=env,
                               capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    return run
