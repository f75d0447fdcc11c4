"""Issue 17 at ``load``: the match policy checked against the destination mdev that will
really load the state, with the source facts the state's manifest records.

Manifests are written through the store API (``StateMeta(driver_version=...,
parent_model=...)``, what the filter fills from the binding); destinations are fake
sysfs trees (``testkit/fakesysfs.py``) whose parent shows a vendor driver version and
a PCI model.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from libvirt_mdev.cli.load import load_state
from libvirt_mdev.errors import MdevMissing, StoreIntegrityError, TypeMismatch, UsageError
from libvirt_mdev.mdev.policy import MatchPolicy
from libvirt_mdev.store import Manifest, Store, issue_token, parse_manifest
from testkit.fakesysfs import FakeParent, make_fake_sysfs

from .conftest import MDEV, MDEV_TYPE, assert_one_line_error, make_meta, run_cli

PARENT = "0000:af:00.0"
SRC_VERSION = "550.54.14"
SRC_MODEL = "10de:1eb8"
SAME_OR_NEWER = MatchPolicy.parse("same-or-newer", False)
SAME = MatchPolicy.parse("same", False)
MODEL = MatchPolicy.parse("off", True)
OFF = MatchPolicy()


def dest_sysfs(root: Path, version: str | None = SRC_VERSION, device: str = "0x1eb8",
               mdev_type: str = MDEV_TYPE) -> Path:
    """A destination whose mdev MDEV sits on a parent with that driver version and PCI device id."""
    env = make_fake_sysfs(root, {PARENT: [mdev_type]}, {MDEV: (PARENT, mdev_type)},
                          {PARENT: FakeParent(version=version, device=device)})
    return env.root


def stored(store: Store, **facts: str | None) -> tuple[Manifest, str, bytes]:
    data = b"STATE-" + bytes(range(256)) * 4
    m = store.put_state(make_meta(**facts), data)
    return m, issue_token(m), data


def load(store: Store, token: str, sysfs: Path, sink: Path, policy: MatchPolicy) -> dict[str, object]:
    return load_state(store, token, MDEV, sysfs, sink, policy=policy)


def refused(store: Store, m: Manifest, token: str, sysfs: Path, sink: Path, policy: MatchPolicy,
            exc: type[Exception] = TypeMismatch) -> str:
    """Refusal: one line, nothing delivered, the token not spent (a fixed destination may still load it)."""
    with pytest.raises(exc) as ei:
        load(store, token, sysfs, sink, policy)
    msg = str(ei.value)
    assert "\n" not in msg
    assert not sink.exists()
    assert not store.is_spent(m.id)
    return msg


# ------------------------------------------------------------------ the manifest fields
def test_manifest_without_the_new_fields_keeps_its_bytes(store: Store) -> None:
    """Backward compatible: unset fields are not in the canonical bytes, so a manifest
    stored before them parses to the same bytes and the same id (its token still works)."""
    m, _, _ = stored(store)
    raw = m.to_json()
    assert b"driver_version" not in raw and b"parent_model" not in raw
    assert set(json.loads(raw)) == {"format", "idstr", "instance_id", "version_id", "vfio_framing",
                                    "migration_id", "mdev_uuid", "mdev_type", "domain_name", "domain_uuid",
                                    "source_host", "length", "sha256", "created", "signature", "signer"}
    again = parse_manifest(raw, expect_id=m.id)
    assert again == m and again.driver_version is None and again.parent_model is None


def test_manifest_with_the_fields_round_trips(store: Store) -> None:
    m, _, _ = stored(store, driver_version=SRC_VERSION, parent_model=SRC_MODEL)
    obj = json.loads(m.to_json())
    assert obj["driver_version"] == SRC_VERSION and obj["parent_model"] == SRC_MODEL
    back = store.manifest(m.id)
    assert (back.driver_version, back.parent_model) == (SRC_VERSION, SRC_MODEL)
    assert back.meta.driver_version == SRC_VERSION


def test_manifest_null_field_is_not_canonical(store: Store) -> None:
    m, _, _ = stored(store)
    obj = json.loads(m.to_json())
    obj["driver_version"] = None
    raw = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
    with pytest.raises(StoreIntegrityError, match="canonical"):
        parse_manifest(raw)


@pytest.mark.parametrize("field,value", [("driver_version", "550 54"), ("parent_model", "10de/1eb8"),
                                         ("driver_version", "")])
def test_bad_source_facts_are_refused_before_storing(store: Store, field: str, value: str) -> None:
    with pytest.raises(UsageError, match=field):
        store.put_state(make_meta(**{field: value}), b"x")
    assert store.list() == []


# ------------------------------------------------------------------ driver version
def test_older_driver_refused_when_policy_asks_same_or_newer(store: Store, tmp_path: Path) -> None:
    m, token, _ = stored(store, driver_version=SRC_VERSION, parent_model=SRC_MODEL)
    sysfs = dest_sysfs(tmp_path / "sys", version="535.104.05")
    msg = refused(store, m, token, sysfs, tmp_path / "sink", SAME_OR_NEWER)
    assert "535.104.05" in msg and SRC_VERSION in msg and "older" in msg and MDEV in msg


def test_older_driver_allowed_when_policy_off(store: Store, tmp_path: Path) -> None:
    m, token, data = stored(store, driver_version=SRC_VERSION, parent_model=SRC_MODEL)
    sysfs = dest_sysfs(tmp_path / "sys", version="535.104.05")
    out = load(store, token, sysfs, tmp_path / "sink", OFF)
    assert (tmp_path / "sink").read_bytes() == data
    assert out["source_driver_version"] == SRC_VERSION and out["dest_driver_version"] == "535.104.05"
    assert out["policy"] == {"match_driver_version": "off", "match_parent_model": False}
    assert store.is_spent(m.id)


def test_newer_driver_allowed_by_same_or_newer_but_not_by_same(store: Store, tmp_path: Path) -> None:
    m, token, data = stored(store, driver_version=SRC_VERSION)
    sysfs = dest_sysfs(tmp_path / "sys", version="550.100")
    msg = refused(store, m, token, sysfs, tmp_path / "sink", SAME)
    assert "550.100" in msg and "same" in msg
    load(store, token, sysfs, tmp_path / "sink", SAME_OR_NEWER)
    assert (tmp_path / "sink").read_bytes() == data


def test_manifest_without_driver_version_refused_when_policy_needs_it(store: Store, tmp_path: Path) -> None:
    """A state stored without the source's version (an older filter): doubt is never a
    match when the rule is on; with the rule off it still loads as before."""
    m, token, _ = stored(store)
    sysfs = dest_sysfs(tmp_path / "sys")
    msg = refused(store, m, token, sysfs, tmp_path / "sink", SAME_OR_NEWER)
    assert "no vendor driver version" in msg
    load(store, token, sysfs, tmp_path / "sink", OFF)
    assert store.is_spent(m.id)


def test_destination_without_a_version_refused(store: Store, tmp_path: Path) -> None:
    m, token, _ = stored(store, driver_version=SRC_VERSION)
    sysfs = dest_sysfs(tmp_path / "sys", version=None)
    msg = refused(store, m, token, sysfs, tmp_path / "sink", SAME_OR_NEWER)
    assert "destination's vendor driver version is unknown" in msg


# ------------------------------------------------------------------ parent model
def test_parent_model_mismatch_refused_when_asked(store: Store, tmp_path: Path) -> None:
    m, token, data = stored(store, driver_version=SRC_VERSION, parent_model=SRC_MODEL)
    sysfs = dest_sysfs(tmp_path / "sys", device="0x20b5")
    msg = refused(store, m, token, sysfs, tmp_path / "sink", MODEL)
    assert "10de:20b5" in msg and SRC_MODEL in msg
    out = load(store, token, sysfs, tmp_path / "sink", OFF)
    assert out["dest_parent_model"] == "10de:20b5" and (tmp_path / "sink").read_bytes() == data


def test_same_parent_model_and_driver_loads_under_the_full_policy(store: Store, tmp_path: Path) -> None:
    m, token, data = stored(store, driver_version=SRC_VERSION, parent_model=SRC_MODEL)
    out = load(store, token, dest_sysfs(tmp_path / "sys"), tmp_path / "sink",
               MatchPolicy.parse("same-or-newer", True))
    assert out["manifest_id"] == m.id
    assert out["dest_parent_model"] == SRC_MODEL and out["dest_driver_version"] == SRC_VERSION
    assert (tmp_path / "sink").read_bytes() == data


def test_type_rule_still_first_and_missing_mdev_still_missing(store: Store, tmp_path: Path) -> None:
    m, token, _ = stored(store, driver_version=SRC_VERSION, parent_model=SRC_MODEL)
    other = dest_sysfs(tmp_path / "sys-other", mdev_type="nvidia-64")
    msg = refused(store, m, token, other, tmp_path / "sink", OFF)
    assert MDEV_TYPE in msg and "nvidia-64" in msg
    empty = make_fake_sysfs(tmp_path / "sys-empty", {PARENT: [MDEV_TYPE]}).root
    msg = refused(store, m, token, empty, tmp_path / "sink", SAME_OR_NEWER, MdevMissing)
    assert "does not exist" in msg


# ------------------------------------------------------------------ the CLI, configured
def _config(tmp_path: Path, store: Path, sysfs: Path, driver_version: str, parent_model: str) -> Path:
    p = tmp_path / "libvirt-mdev.conf"
    p.write_text(f"[libvirt-mdev]\nstore = {store}\nsysfs_root = {sysfs}\n"
                 f"match_driver_version = {driver_version}\nmatch_parent_model = {parent_model}\n")
    return p


def test_cli_load_applies_the_configured_policy(store: Store, store_root: Path, tmp_path: Path) -> None:
    m, token, data = stored(store, driver_version=SRC_VERSION, parent_model=SRC_MODEL)
    sysfs = dest_sysfs(tmp_path / "sys", version="535.104.05", device="0x20b5")
    sink = tmp_path / "sink"
    strict = _config(tmp_path, store_root, sysfs, "same-or-newer", "no")
    res = run_cli("load", token, "--mdev", MDEV, "--sink", str(sink), "--json", config=strict)
    assert_one_line_error(res, TypeMismatch.exit_code, "535.104.05", SRC_VERSION, "match_driver_version")
    assert json.loads(res.stdout)["error"]["kind"] == TypeMismatch.kind
    assert not sink.exists() and not store.is_spent(m.id)
    model = _config(tmp_path, store_root, sysfs, "off", "yes")
    res = run_cli("load", token, "--mdev", MDEV, "--sink", str(sink), config=model)
    assert_one_line_error(res, TypeMismatch.exit_code, "10de:20b5", "match_parent_model")
    assert not sink.exists()
    off = _config(tmp_path, store_root, sysfs, "off", "no")
    res = run_cli("load", token, "--mdev", MDEV, "--sink", str(sink), "--json", config=off)
    assert res.rc == 0, res.stderr
    assert json.loads(res.stdout)["dest_driver_version"] == "535.104.05"
    assert sink.read_bytes() == data and store.is_spent(m.id)
