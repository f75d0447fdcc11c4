"""Fixtures for the store tests: a fresh store, a stored state with its token, a
fake sysfs tree, and a runner for the real CLI in a subprocess."""
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from libvirt_mdev.store import Manifest, StateMeta, Store, issue_token
from tests.harness import cli

REPO = Path(__file__).resolve().parents[2]
MDEV = "5b1c1f36-2d0b-4c8e-9a43-7d2f3c0e9a01"
OTHER_MDEV = "5b1c1f36-2d0b-4c8e-9a43-7d2f3c0e9a02"
DOMAIN = "0f3e2b44-91aa-4b8f-8a1c-2a9c1d7e5b10"
MDEV_TYPE = "nvidia-63"
NOBODY = 65534

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, mount)")


def make_meta(**over: object) -> StateMeta:
    fields: dict[str, object] = {
        "idstr": "0000:00:05.0/vfio", "instance_id": 0, "version_id": 1, "vfio_framing": "v1",
        "migration_id": "mig-test-1", "mdev_uuid": MDEV, "mdev_type": MDEV_TYPE,
        "domain_name": "guest1", "domain_uuid": DOMAIN, "source_host": "src.example"}
    fields.update(over)
    return StateMeta(**fields)  # type: ignore[arg-type]


def make_sysfs(root: Path, devices: dict[str, str]) -> Path:
    """A minimal fake sysfs: ``bus/mdev/devices/<uuid>/mdev_type`` links to a
    parent's ``mdev_supported_types/<type>`` directory, as the kernel lays it out."""
    parent = root / "devices" / "pci0000:00" / "0000:00:02.0"
    for uuid, mtype in devices.items():
        tdir = parent / "mdev_supported_types" / mtype
        tdir.mkdir(parents=True, exist_ok=True)
        ddir = parent / uuid
        ddir.mkdir(parents=True, exist_ok=True)
        (ddir / "mdev_type").symlink_to(tdir)
        links = root / "bus" / "mdev" / "devices"
        links.mkdir(parents=True, exist_ok=True)
        (links / uuid).symlink_to(ddir)
    return root


@dataclass
class Stored:
    """A store holding one state: everything an attack needs to aim at."""

    root: Path
    store: Store
    manifest: Manifest
    token: str
    data: bytes
    sysfs: Path
    outside: Path   # a directory outside the store, same filesystem

    @property
    def state_path(self) -> Path:
        return self.root / self.manifest.state_name

    @property
    def manifest_path(self) -> Path:
        return self.root / f"{self.manifest.id}.json"


@pytest.fixture
def store_root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(store_root: Path) -> Iterator[Store]:
    st = Store.open(store_root, create=True)
    yield st
    st.close()


@pytest.fixture
def stored(tmp_path: Path, store: Store, store_root: Path) -> Stored:
    data = b"VFIO-STATE-MARKER-" + os.urandom(3000) + b"-END"
    m = store.put_state(make_meta(), data)
    outside = tmp_path / "outside"
    outside.mkdir()
    sysfs = make_sysfs(tmp_path / "sys", {MDEV: MDEV_TYPE, OTHER_MDEV: MDEV_TYPE})
    return Stored(store_root, store, m, issue_token(m), data, sysfs, outside)


@dataclass
class CliResult:
    rc: int
    stdout: str
    stderr: str


def run_cli(*args: str, config: Path | None = None, timeout: float = 60) -> CliResult:
    """Run ``python -m libvirt_mdev.cli ARGS`` from the repo root (no installed script)."""
    p = cli.run_cli(*args, config=config, timeout=timeout)
    return CliResult(p.returncode, p.stdout, p.stderr)


def assert_one_line_error(res: CliResult, code: int, *words: str) -> None:
    """A refusal: exact exit code, exactly one line on stderr, no traceback."""
    cli.one_line_error(res.stderr, *words, rc=res.rc, code=code)
