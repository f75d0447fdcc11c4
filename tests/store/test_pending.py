"""Pending records under the runtime dir (written by the hook, read by the proxy)."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from libvirt_mdev.errors import StoreAccessError, StoreIntegrityError, UsageError
from libvirt_mdev.store.pending import (list_pending, read_pending, remove_pending,
                                        write_pending)

from .conftest import DOMAIN, MDEV, NOBODY, needs_root

OTHER = "0f3e2b44-91aa-4b8f-8a1c-2a9c1d7e5b11"


def rec(uuid: str = DOMAIN, created: int = 100) -> dict:
    return {"domain_name": "guest1", "domain_uuid": uuid, "migration_id": "mig-1",
            "created": created,
            "devices": [{"mdev_uuid": MDEV, "idstr": "0000:00:05.0/vfio", "type": "nvidia-63"}]}


def test_round_trip(tmp_path: Path) -> None:
    rd = tmp_path / "run" / "libvirt-mdev"
    (tmp_path / "run").mkdir()
    p = write_pending(rd, rec())
    assert p == rd / f"{DOMAIN}.json"
    assert stat.S_IMODE(os.stat(rd).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    assert read_pending(rd, DOMAIN) == rec()
    write_pending(rd, rec(OTHER, created=50))
    assert [r["domain_uuid"] for r in list_pending(rd)] == [OTHER, DOMAIN]
    write_pending(rd, dict(rec(), migration_id="mig-2"))  # replace
    assert read_pending(rd, DOMAIN)["migration_id"] == "mig-2"
    assert remove_pending(rd, DOMAIN) is True
    assert remove_pending(rd, DOMAIN) is False
    assert read_pending(rd, DOMAIN) is None
    assert sorted(os.listdir(rd)) == [f"{OTHER}.json"]


def test_missing_runtime_dir_means_nothing_pending(tmp_path: Path) -> None:
    assert read_pending(tmp_path / "nope", DOMAIN) is None
    assert list_pending(tmp_path / "nope") == []
    assert remove_pending(tmp_path / "nope", DOMAIN) is False


@pytest.mark.parametrize("bad,why", [
    (dict(rec(), extra=1), "unknown key 'extra'"),
    ({k: v for k, v in rec().items() if k != "devices"}, "missing key 'devices'"),
    (dict(rec(), domain_uuid="../etc"), "domain_uuid"),
    (dict(rec(), migration_id="a b"), "migration_id"),
    (dict(rec(), created=True), "created"),
    (dict(rec(), devices=[{"mdev_uuid": MDEV}]), "devices[0]"),
    (dict(rec(), devices=[{"mdev_uuid": "x", "idstr": "a", "type": None}]), "devices[0].mdev_uuid"),
    (dict(rec(), domain_name="a\nb"), "domain_name"),
])
def test_invalid_record_refused(tmp_path: Path, bad: dict, why: str) -> None:
    with pytest.raises(UsageError) as ei:
        write_pending(tmp_path / "rd", bad)
    assert why in ei.value.message


def test_tampered_record_refused(tmp_path: Path) -> None:
    p = write_pending(tmp_path / "rd", rec())
    with open(p, "w") as fh:
        json.dump(dict(rec(), domain_uuid=OTHER), fh)
    with pytest.raises(StoreIntegrityError, match="names domain"):
        read_pending(tmp_path / "rd", DOMAIN)
    with open(p, "w") as fh:
        fh.write("{not json")
    with pytest.raises(StoreIntegrityError, match="not JSON"):
        list_pending(tmp_path / "rd")


@needs_root
def test_untrusted_runtime_dir_or_file_refused(tmp_path: Path) -> None:
    rd = tmp_path / "rd"
    p = write_pending(rd, rec())
    os.chown(p, NOBODY, -1)
    with pytest.raises(StoreAccessError, match="uid 65534"):
        read_pending(rd, DOMAIN)
    os.unlink(p)
    os.symlink(tmp_path / "x", p)
    with pytest.raises(StoreAccessError, match="symlink"):
        read_pending(rd, DOMAIN)
    os.chmod(rd, 0o755)
    with pytest.raises(StoreAccessError, match="mode 0755"):
        write_pending(rd, rec())


def test_domain_uuid_argument_checked(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        read_pending(tmp_path, "../../etc/passwd")
