"""Pending records under the runtime dir (written by the hook, read by the proxy)."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from libvirt_mdev.errors import StoreAccessError, StoreIntegrityError, UsageError
from libvirt_mdev.store.pending import (
    PendingDevice,
    PendingRecord,
    list_pending,
    read_pending,
    remove_pending,
    write_pending,
)

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
    assert read_pending(rd, DOMAIN) == PendingRecord("guest1", DOMAIN, "mig-1", 100,
                                                     (PendingDevice(MDEV, "0000:00:05.0/vfio", "nvidia-63"),))
    write_pending(rd, rec(OTHER, created=50))
    assert [r.domain_uuid for r in list_pending(rd)] == [OTHER, DOMAIN]
    write_pending(rd, dict(rec(), migration_id="mig-2"))  # replace
    assert read_pending(rd, DOMAIN) == PendingRecord.from_dict(dict(rec(), migration_id="mig-2"))
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


# --------------------------------------------------------------------------- the typed record and its bytes
#: a record as the hook has written it since issue 17: all five device keys, unknown facts as null
HOOK_BYTES = ('{"created":1764590000,"devices":[{"driver_version":"550.54.14","idstr":"0000:00:05.0/vfio",'
              f'"mdev_uuid":"{MDEV}","parent_model":"10de:1eb8","type":"nvidia-63"}},'
              '{"driver_version":null,"idstr":"0000:00:06.0/vfio",'
              f'"mdev_uuid":"{MDEV[:-1]}2","parent_model":null,"type":null}}],'
              f'"domain_name":"guest1","domain_uuid":"{DOMAIN}","migration_id":"1764590000-a1b2c3"}}').encode()
#: a record as a hook older than issue 17 wrote it, spelled out: three device keys only
OLD_HOOK_BYTES = (b'{"created":1700000000,"devices":[{"idstr":"0000:00:05.0/vfio",'
                  b'"mdev_uuid":"5b1c1f36-2d0b-4c8e-9a43-7d2f3c0e9a01","type":"nvidia-63"}],'
                  b'"domain_name":"guest1","domain_uuid":"0f3e2b44-91aa-4b8f-8a1c-2a9c1d7e5b10",'
                  b'"migration_id":"1700000000-0a0b0c"}')


def _store_raw(rd: Path, data: bytes) -> None:
    """Put *data* in DOMAIN's record file as another writer would (the file keeps its checked mode)."""
    p = write_pending(rd, rec())
    with open(p, "wb") as fh:
        fh.write(data)


def test_hook_bytes_round_trip_exactly(tmp_path: Path) -> None:
    r = PendingRecord.from_json(HOOK_BYTES, "x")
    assert r == PendingRecord("guest1", DOMAIN, "1764590000-a1b2c3", 1764590000, (
        PendingDevice(MDEV, "0000:00:05.0/vfio", "nvidia-63", "550.54.14", "10de:1eb8"),
        PendingDevice(MDEV[:-1] + "2", "0000:00:06.0/vfio", None)))
    assert r.to_json() == HOOK_BYTES
    p = write_pending(tmp_path / "rd", r)
    assert p.read_bytes() == HOOK_BYTES  # the typed writer writes what the dict writer wrote
    write_pending(tmp_path / "rd", json.loads(HOOK_BYTES))
    assert p.read_bytes() == HOOK_BYTES
    assert read_pending(tmp_path / "rd", DOMAIN) == r


def test_a_record_of_an_older_hook_still_parses(tmp_path: Path) -> None:
    rd = tmp_path / "rd"
    _store_raw(rd, OLD_HOOK_BYTES)
    r = read_pending(rd, DOMAIN)
    assert r == PendingRecord("guest1", DOMAIN, "1700000000-0a0b0c", 1700000000,
                              (PendingDevice(MDEV, "0000:00:05.0/vfio", "nvidia-63"),))
    assert (r.devices[0].driver_version, r.devices[0].parent_model) == (None, None)
    assert list_pending(rd) == [r]


def test_records_are_frozen() -> None:
    import dataclasses

    r = PendingRecord.from_json(HOOK_BYTES, "x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.migration_id = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.devices[0].type = "nvidia-64"  # type: ignore[misc]


def test_refusals_keep_their_exact_lines(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as ei:
        write_pending(tmp_path / "rd", dict(rec(), devices=[{"mdev_uuid": "x", "idstr": "a", "type": None}]))
    assert ei.value.message == "invalid pending record: devices[0].mdev_uuid must be a lowercase UUID"
    with pytest.raises(UsageError) as ei:
        PendingRecord.from_dict(dict(rec(), devices=[dict(rec()["devices"][0], driver_version="a b")]))
    assert ei.value.message == "invalid pending record: devices[0].driver_version must be a word or null"
    rd = tmp_path / "rd2"
    _store_raw(rd, json.dumps(dict(rec(), created=-1)).encode())
    with pytest.raises(StoreIntegrityError) as ej:
        read_pending(rd, DOMAIN)
    assert ej.value.message == f"pending record {rd}/{DOMAIN}.json: created must be a non-negative integer (unix seconds)"
    _store_raw(rd, b"\xff")
    with pytest.raises(StoreIntegrityError) as ej:
        read_pending(rd, DOMAIN)
    assert ej.value.message == f"pending record {rd}/{DOMAIN}.json is not JSON"


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


# --------------------------------------------------------------------------- staleness (issue 12)
def test_stale_records_expire_and_live_ones_stay(tmp_path: Path) -> None:
    import time

    from libvirt_mdev.store.pending import PENDING_GRACE, expire_pending, is_stale, qemu_start_times
    from testkit.fakeproc import make_fake_proc

    now = time.time()
    third = "0f3e2b44-91aa-4b8f-8a1c-2a9c1d7e5b12"
    old_qemu = "0f3e2b44-91aa-4b8f-8a1c-2a9c1d7e5b13"
    proc = make_fake_proc(tmp_path / "proc", {OTHER: now - 5, old_qemu: now - 7200})
    rd = tmp_path / "rd"
    write_pending(rd, rec(DOMAIN, created=int(now - PENDING_GRACE - 5)))   # no QEMU, grace over: stale
    write_pending(rd, rec(OTHER, created=int(now - PENDING_GRACE - 5)))    # its QEMU runs: live
    write_pending(rd, rec(third, created=int(now - 10)))                   # no QEMU yet, in grace: live
    # a QEMU of that uuid runs, but it started long before 'migrate begin' ("domain already exists")
    write_pending(rd, rec(old_qemu, created=int(now - PENDING_GRACE - 5)))
    qemus = qemu_start_times(proc)
    assert {r.domain_uuid: is_stale(r, qemus, now) for r in list_pending(rd)} == {
        DOMAIN: True, OTHER: False, third: False, old_qemu: True}
    assert {r.domain_uuid for r in expire_pending(rd, proc=proc, dry_run=True)} == {DOMAIN, old_qemu}
    assert len(list_pending(rd)) == 4
    removed = expire_pending(rd, proc=proc)
    assert {r.domain_uuid for r in removed} == {DOMAIN, old_qemu}
    assert {r.domain_uuid for r in list_pending(rd)} == {OTHER, third}


def test_pending_cli_list_and_clear(tmp_path: Path) -> None:
    import json as _json
    import time

    from libvirt_mdev.cli import main
    from libvirt_mdev.store.pending import PENDING_GRACE

    rd = tmp_path / "run"
    conf = tmp_path / "c.conf"
    conf.write_text(f"[libvirt-mdev]\nruntime_dir = {rd}\nstore = {tmp_path / 'store'}\n")
    now = int(time.time())
    write_pending(rd, rec(DOMAIN, created=now - PENDING_GRACE - 100))
    write_pending(rd, dict(rec(OTHER, created=now), domain_name="guest2"))
    assert main(["--config", str(conf), "pending", "list", "--json"]) == 0
    assert main(["--config", str(conf), "pending", "clear"]) == 2  # says which
    assert main(["--config", str(conf), "pending", "clear", "nosuchvm"]) == 12
    assert main(["--config", str(conf), "pending", "clear", "--stale", "--json"]) == 0
    assert [r.domain_uuid for r in list_pending(rd)] == [OTHER]
    assert main(["--config", str(conf), "pending", "clear", "guest2"]) == 0
    assert list_pending(rd) == []
    _ = _json  # the JSON shapes are checked below through a subprocess


def test_pending_cli_json_shapes(tmp_path: Path) -> None:
    import json as _json
    import subprocess
    import sys
    import time

    from libvirt_mdev.store.pending import PENDING_GRACE

    rd = tmp_path / "run"
    conf = tmp_path / "c.conf"
    conf.write_text(f"[libvirt-mdev]\nruntime_dir = {rd}\nstore = {tmp_path / 'store'}\n")
    write_pending(rd, rec(DOMAIN, created=int(time.time()) - PENDING_GRACE - 100))

    def run(*args: str) -> tuple[int, str, str]:
        p = subprocess.run([sys.executable, "-m", "libvirt_mdev.cli", "--config", str(conf), *args],
                           capture_output=True, text=True, timeout=60)
        return p.returncode, p.stdout, p.stderr

    code, out, _ = run("pending", "list", "--json")
    doc = _json.loads(out)
    assert code == 0 and doc["pending"][0]["domain_uuid"] == DOMAIN and doc["pending"][0]["state"] == "stale"
    code, out, _ = run("pending", "list")
    assert code == 0 and "guest1" in out and "stale" in out
    code, out, err = run("pending", "clear", "--stale", "--all")
    assert code == 2 and err.count("\n") == 1 and "a DOMAIN (name or uuid), --stale or --all" in err
    code, out, _ = run("pending", "clear", "--stale", "--json")
    assert code == 0 and [r["domain_uuid"] for r in _json.loads(out)["removed"]] == [DOMAIN]
