"""Golden-output files: compare a command's output with a committed file, or rewrite the file.

One command rewrites them (tests/cli/test_place.py reads the same variable for tests/cli/golden/):

    LIBVIRT_MDEV_UPDATE_GOLDEN=1 .venv/bin/python -m pytest -q -p no:cacheprovider tests/golden

then review the diff (``git diff tests/golden/data``) like code: a changed golden file is a changed user interface.
Outputs that hold paths of the checkout or of the test's temporary directory are normalised here, in the test, so
the product prints what it prints.
"""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DATA = Path(__file__).resolve().parent / "data"
#: the variable tests/cli/test_place.py reads too: one switch for every golden file
UPDATE_ENV = "LIBVIRT_MDEV_UPDATE_GOLDEN"


def updating() -> bool:
    return os.environ.get(UPDATE_ENV) == "1"


@dataclass(frozen=True)
class Run:
    code: int
    stdout: str
    stderr: str


def cli(*args: str, home: Path, config: Path | None = None) -> Run:
    """``python -m libvirt_mdev.cli ARGS`` as a user runs it: a clean environment, no terminal, C.UTF-8."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), "PYTHONPATH": str(REPO),
           "LC_ALL": "C.UTF-8"}
    if config is not None:
        env["LIBVIRT_MDEV_CONFIG"] = str(config)
    r = subprocess.run([sys.executable, "-m", "libvirt_mdev.cli", *args], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=120, stdin=subprocess.DEVNULL, check=False)
    assert "Traceback" not in r.stderr, r.stderr
    return Run(r.returncode, r.stdout, r.stderr)


def normalise(text: str, tmp: Path) -> str:
    """Paths that differ between checkouts and runs become ``$REPO`` and ``$TMP``."""
    return text.replace(str(tmp), "$TMP").replace(str(REPO), "$REPO")


def check_golden(name: str, text: str, tmp: Path) -> None:
    """*text* (normalised) equals data/*name*; with LIBVIRT_MDEV_UPDATE_GOLDEN=1 the file is rewritten first."""
    path = DATA / name
    got = normalise(text, tmp)
    if updating():
        DATA.mkdir(exist_ok=True)
        path.write_text(got)
    assert path.exists(), f"{path} is missing: {UPDATE_ENV}=1 writes it"
    want = path.read_text()
    assert got == want, f"{name} differs from {path} ({UPDATE_ENV}=1 rewrites it; review the diff)"
