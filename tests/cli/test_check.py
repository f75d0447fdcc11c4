"""``libvirt-mdev check`` against libvirt's test driver: one host file per host."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from .conftest import HOSTS, host_uri

SRC = host_uri(HOSTS / "source.xml")
DST = host_uri(HOSTS / "dest.xml")
U = "8f1e4a52-6c1e-4c1e-9a3b-5a0b7e3d00{:02d}"


def check_json(run_cli: Any, domain: str, src: str = SRC, dst: str = DST) -> tuple[int, dict[str, Any], str]:
    r = run_cli("check", domain, "--connect", src, "--dest", dst, "--json")
    assert "Traceback" not in r.stderr
    return r.returncode, json.loads(r.stdout), r.stderr


def test_all_match_is_allowed(run_cli: Any) -> None:
    code, out, err = check_json(run_cli, "demo-ok")
    assert code == 0 and err == ""
    assert out["allowed"] is True and out["verdict"] == "match" and out["annotated"] is True
    assert out["devices"] == [{
        "uuid": U.format(3), "guest_address": "0000:00:05.0", "idstr": "0000:00:05.0/vfio",
        "source_type": "nvidia-222", "source_parent": "0000:af:00.0",
        "dest_type": "nvidia-222", "dest_parent": "0000:3b:00.0", "present": True,
        "verdict": "match", "source_live_type": "nvidia-222"}]
    assert out["store"]["ready"] is None


def test_type_mismatch_exit_6(run_cli: Any) -> None:
    code, out, _ = check_json(run_cli, "demo")
    assert code == 6
    assert out["allowed"] is False and out["verdict"] == "type-mismatch"
    by_uuid = {d["uuid"]: d for d in out["devices"]}
    assert by_uuid[U.format(1)]["verdict"] == "match"
    bad = by_uuid[U.format(2)]
    assert (bad["source_type"], bad["dest_type"], bad["present"], bad["verdict"]) == \
        ("nvidia-223", "nvidia-224", True, "type-mismatch")
    assert U.format(2) in out["reason"]


def test_missing_on_dest_exit_7(run_cli: Any) -> None:
    code, out, _ = check_json(run_cli, "demo-missing")
    assert code == 7 and out["allowed"] is False and out["verdict"] == "missing-on-dest"
    assert out["devices"][0]["present"] is False and out["devices"][0]["dest_type"] is None


def test_unannotated_exit_8(run_cli: Any) -> None:
    code, out, _ = check_json(run_cli, "demo-unannotated")
    assert code == 8 and out["annotated"] is False and out["verdict"] == "not-annotated"
    assert out["devices"][0]["source_type"] is None
    assert out["devices"][0]["source_live_type"] == "nvidia-222"
    assert any("run libvirt-mdev annotate" in n for n in out["notes"])


def test_unannotated_allowed_when_annotation_not_required(run_cli: Any, tmp_path: Path) -> None:
    conf = tmp_path / "lax.conf"
    conf.write_text("[libvirt-mdev]\nrequire_annotation = no\n")
    r = run_cli("check", "demo-unannotated", "--connect", SRC, "--dest", DST, "--json", config=conf)
    out = json.loads(r.stdout)
    assert r.returncode == 0 and out["allowed"] is True and out["require_annotation"] is False


def test_domain_without_mdev_is_allowed_and_says_so(run_cli: Any) -> None:
    code, out, _ = check_json(run_cli, "demo-plain")
    assert code == 0 and out["allowed"] is True and out["verdict"] == "no-mdev" and out["devices"] == []
    r = run_cli("check", "demo-plain", "--connect", SRC, "--dest", DST)
    assert r.returncode == 0
    assert "no mdev hostdevs: nothing to check" in r.stdout


def test_table_shows_one_row_per_mdev_and_the_result(run_cli: Any) -> None:
    r = run_cli("check", "demo", "--connect", SRC, "--dest", DST)
    assert r.returncode == 6
    lines = r.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("MDEV UUID"))
    assert lines[header].split() == ["MDEV", "UUID", "GUEST", "ADDR", "SOURCE", "TYPE", "DEST", "TYPE",
                                     "ON", "DEST", "VERDICT"]
    assert lines[header + 1].split() == [U.format(1), "0000:00:05.0", "nvidia-222", "nvidia-222", "yes", "match"]
    assert lines[header + 2].split() == [U.format(2), "0000:00:06.0", "nvidia-223", "nvidia-224", "yes",
                                         "type-mismatch"]
    assert any(line.startswith("result: refused (type-mismatch, exit 6)") for line in lines)


@pytest.mark.parametrize("which", ["source", "dest"])
def test_unreachable_uri_exit_5(run_cli: Any, which: str) -> None:
    bad = "qemu+tcp://127.0.0.1:1/system"
    args = (bad, DST) if which == "source" else (SRC, bad)
    code, out, err = check_json(run_cli, "demo", *args)
    assert code == 5
    assert out["error"]["kind"] == "connect" and out["error"]["exit_code"] == 5
    assert err.count("\n") == 1 and err.startswith("libvirt-mdev: cannot connect to qemu+tcp://127.0.0.1:1/system")


def test_unknown_domain_exit_12(run_cli: Any) -> None:
    code, out, err = check_json(run_cli, "no-such-domain")
    assert code == 12 and out["error"]["kind"] == "not-found"
    assert err.count("\n") == 1 and "domain no-such-domain not found" in err


def test_bad_metadata_xml_exit_10(run_cli: Any, tmp_path: Path) -> None:
    host = tmp_path / "bad.xml"
    text = (HOSTS / "source.xml").read_text()
    host.write_text(text.replace("type='nvidia-223' parent", "type='bad type' parent", 1))
    code, out, err = check_json(run_cli, "demo", host_uri(host), DST)
    assert code == 10 and out["error"]["kind"] == "xml"
    assert err.count("\n") == 1 and "invalid value 'bad type'" in err


def test_missing_host_file_is_one_line(run_cli: Any, tmp_path: Path) -> None:
    r = run_cli("check", "demo", "--connect", f"test://{tmp_path}/nope.xml", "--dest", DST)
    assert r.returncode == 5 and r.stderr.count("\n") == 1 and "does not exist" in r.stderr


def test_help_explains_verdicts_and_exit_codes(run_cli: Any) -> None:
    r = run_cli("check", "--help")
    assert r.returncode == 0
    for word in ("type-mismatch", "missing-on-dest", "not-annotated", "exit 6", "--dest", "annotate"):
        assert word in r.stdout


def test_missing_required_option_is_usage_error(run_cli: Any) -> None:
    r = run_cli("check", "demo", "--connect", SRC)
    assert r.returncode == 2 and "--dest" in r.stderr


def test_store_readiness_only_for_a_local_destination(tmp_path: Path) -> None:
    from libvirt_mdev.cli.check import store_readiness

    good = tmp_path / "store"
    good.mkdir(mode=0o700)
    good.chmod(0o700)
    assert store_readiness("qemu:///system", good)["ready"] is True
    assert store_readiness("qemu+unix:///system?socket=/run/x.sock", good)["ready"] is True
    bad = store_readiness("qemu:///system", tmp_path / "missing")
    assert bad["ready"] is False and "does not exist" in bad["detail"]
    good.chmod(0o755)
    assert store_readiness("qemu:///system", good)["ready"] is False
    for remote in ("qemu+ssh://dest/system", "qemu+tcp://10.0.0.2/system", DST):
        assert store_readiness(remote, good)["ready"] is None
