"""``libvirt-mdev store list|verify|gc`` and ``load`` through the real CLI."""
from __future__ import annotations

import json
import os
from pathlib import Path

from libvirt_mdev.store import Store, issue_token

from .conftest import MDEV, Stored, assert_one_line_error, make_meta, run_cli


def _config(tmp_path: Path, store: Path, sysfs: Path) -> Path:
    p = tmp_path / "libvirt-mdev.conf"
    p.write_text(f"[libvirt-mdev]\nstore = {store}\nsysfs_root = {sysfs}\nretention = 60\n")
    return p


def test_list_json_and_text(stored: Stored) -> None:
    res = run_cli("store", "list", "--store", str(stored.root), "--json")
    assert res.rc == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["store"] == str(stored.root)
    [row] = out["states"]
    assert row["id"] == stored.manifest.id and row["sha256"] == stored.manifest.sha256
    assert row["spent"] is False and row["mdev_uuid"] == MDEV and row["length"] == len(stored.data)
    res = run_cli("store", "list", "--store", str(stored.root))
    assert res.rc == 0 and "ready" in res.stdout and MDEV in res.stdout


def test_verify_ok_then_tampered(stored: Stored) -> None:
    res = run_cli("store", "verify", "--store", str(stored.root), "--json")
    assert res.rc == 0 and json.loads(res.stdout)["ok"] is True
    with open(stored.state_path, "r+b") as fh:
        fh.seek(10)
        fh.write(b"!")
    res = run_cli("store", "verify", "--store", str(stored.root), "--json")
    assert res.rc == 4
    out = json.loads(res.stdout)
    assert out["ok"] is False and "does not match" in out["states"][0]["problem"]
    res = run_cli("store", "verify", "--store", str(stored.root))
    assert "FAILED" in res.stdout
    assert_one_line_error(res, 4, "1 of 1 stored states failed verification")


def test_gc_uses_configured_store_and_retention(stored: Stored, tmp_path: Path) -> None:
    cfg = _config(tmp_path, stored.root, stored.sysfs)
    with Store.open(stored.root) as st:
        w = st.begin_state(make_meta(migration_id="ancient"), created=1000)
        w.write(b"old")
        old = w.commit()
    res = run_cli("store", "gc", "--json", config=cfg)
    assert res.rc == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["removed_manifests"] == [old.id]
    assert {e.id for e in Store.open(stored.root).list()} == {stored.manifest.id}


def test_load_defaults_from_config_and_prints_path(stored: Stored, tmp_path: Path) -> None:
    cfg = _config(tmp_path, stored.root, stored.sysfs)
    res = run_cli("load", stored.token, "--mdev", MDEV, config=cfg)
    assert res.rc == 0, res.stderr
    path = Path(res.stdout.strip())
    assert path == stored.state_path and path.read_bytes() == stored.data
    res = run_cli("load", stored.token, "--mdev", MDEV, config=cfg)
    assert_one_line_error(res, 4, "already used")


def test_store_errors_are_one_line(tmp_path: Path) -> None:
    res = run_cli("store", "list", "--store", str(tmp_path / "missing"))
    assert_one_line_error(res, 4, "does not exist")
    os.mkdir(tmp_path / "loose", 0o755)
    os.chmod(tmp_path / "loose", 0o755)
    res = run_cli("store", "gc", "--store", str(tmp_path / "loose"), "--json")
    assert_one_line_error(res, 4, "mode 0755")
    assert json.loads(res.stdout)["error"]["kind"] == "store-access"
    res = run_cli("store", "gc", "--store", str(tmp_path), "--domain", "x")
    assert_one_line_error(res, 2, "--domain")


def test_load_bad_config_is_config_error(tmp_path: Path, stored: Stored) -> None:
    bad = tmp_path / "bad.conf"
    bad.write_text("[libvirt-mdev]\nstore = relative/path\n")
    res = run_cli("load", stored.token, "--mdev", MDEV, config=bad)
    assert_one_line_error(res, 9, "absolute path")


def test_token_from_api_loads_through_cli(store: Store, tmp_path: Path) -> None:
    from .conftest import make_sysfs
    m = store.put_state(make_meta(), b"abc" * 1000)
    sysfs = make_sysfs(tmp_path / "sys", {MDEV: "nvidia-63"})
    sink = tmp_path / "out"
    res = run_cli("load", issue_token(m), "--mdev", MDEV, "--store", str(store.root),
                  "--sysfs-root", str(sysfs), "--sink", str(sink))
    assert res.rc == 0, res.stderr
    assert sink.read_bytes() == b"abc" * 1000
    assert "loaded 3000 bytes" in res.stderr
