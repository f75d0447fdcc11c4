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
    assert out["schema"] == "libvirt-mdev/check/2"
    assert out["allowed"] is True and out["verdict"] == "match" and out["annotated"] is True
    d = out["devices"][0]
    assert {k: d[k] for k in ("uuid", "source_uuid", "guest_address", "idstr", "source_type", "source_live_type",
                              "annotated_type", "matched_by", "source_parent", "dest_type", "dest_parent",
                              "present", "gate_verdict", "verdict", "problems")} == {
        "uuid": U.format(3), "source_uuid": U.format(3), "guest_address": "0000:00:05.0",
        "idstr": "0000:00:05.0/vfio", "source_type": "nvidia-222", "source_live_type": "nvidia-222",
        "annotated_type": "nvidia-222", "matched_by": "guest-address", "source_parent": "0000:af:00.0",
        "dest_type": "nvidia-222", "dest_parent": "0000:3b:00.0", "present": True,
        "gate_verdict": "match", "verdict": "match", "problems": []}
    assert out["can_take"] is True and out["how"] == "as-is"
    assert out["store"]["ready"] is None


def test_annotated_mismatch_exit_6_old_annotation_by_uuid(run_cli: Any) -> None:
    code, out, _ = check_json(run_cli, "demo")
    assert code == 6
    assert out["allowed"] is False and out["verdict"] == "type-mismatch"
    by_uuid = {d["uuid"]: d for d in out["devices"]}
    assert by_uuid[U.format(1)]["verdict"] == "match"
    assert by_uuid[U.format(1)]["matched_by"] == "uuid"  # demo's annotation predates guest addresses
    bad = by_uuid[U.format(2)]
    assert (bad["annotated_type"], bad["dest_type"], bad["present"], bad["verdict"], bad["problems"]) == \
        ("nvidia-223", "nvidia-224", True, "type-mismatch", ["type-mismatch"])
    assert U.format(2) in out["reason"]


def test_annotated_missing_exit_7(run_cli: Any) -> None:
    code, out, _ = check_json(run_cli, "demo-missing")
    assert code == 7 and out["allowed"] is False and out["verdict"] == "missing-on-dest"
    assert out["devices"][0]["present"] is False and out["devices"][0]["dest_type"] is None


def test_unannotated_but_matching_exit_8(run_cli: Any) -> None:
    code, out, _ = check_json(run_cli, "demo-unannotated")
    assert code == 8 and out["annotated"] is False and out["verdict"] == "not-annotated"
    d = out["devices"][0]
    assert d["annotated_type"] is None and d["source_type"] == "nvidia-222" and d["source_live_type"] == "nvidia-222"
    assert d["problems"] == ["not-annotated"] and d["live_verdict"] == "match"
    assert any("run libvirt-mdev annotate" in n for n in out["notes"])


def test_unannotated_and_mismatch_reports_both_facts_exit_6(run_cli: Any) -> None:
    """Issue 15: the real type mismatch must not hide behind the missing annotation."""
    code, out, _ = check_json(run_cli, "demo-unannotated-mismatch")
    assert code == 6 and out["verdict"] == "type-mismatch" and out["gate_verdict"] == "not-annotated"
    d = out["devices"][0]
    assert (d["source_type"], d["annotated_type"], d["dest_type"]) == ("nvidia-223", None, "nvidia-224")
    assert d["problems"] == ["type-mismatch", "not-annotated"] and d["verdict"] == "type-mismatch"
    assert "nvidia-223" in out["reason"] and "nvidia-224" in out["reason"]


def test_unannotated_and_missing_reports_both_facts_exit_7(run_cli: Any) -> None:
    code, out, _ = check_json(run_cli, "demo-unannotated-missing")
    assert code == 7 and out["verdict"] == "missing-on-dest" and out["gate_verdict"] == "not-annotated"
    d = out["devices"][0]
    assert d["problems"] == ["missing-on-dest", "not-annotated"] and d["source_type"] == "nvidia-222"
    assert d["present"] is False


def test_text_shows_both_facts_and_what_the_hook_says_now(run_cli: Any) -> None:
    r = run_cli("check", "demo-unannotated-mismatch", "--connect", SRC, "--dest", DST)
    assert r.returncode == 6
    row = next(line for line in r.stdout.splitlines() if line.startswith("0000:00:05.0"))
    assert row.split() == ["0000:00:05.0", U.format(6), "nvidia-223", "(none)", "nvidia-224", "yes",
                           "type-mismatch,", "not-annotated"]
    assert "hook now: refused (not-annotated)" in r.stdout
    assert "result: refused (type-mismatch, exit 6)" in r.stdout


# ----------------------------------------------------------------- no same-uuid mdev on the destination
def test_missing_lists_free_compatible_mdevs_not_those_in_use(run_cli: Any) -> None:
    code, out, _ = check_json(run_cli, "demo-missing")
    d = out["devices"][0]
    free = [m["uuid"] for m in d["free_mdevs"]]
    assert free == [U.format(n) for n in (1, 3, 5, 10, 12)]  # …0011 is named by domain "tenant" on dest
    assert all(m["type"] == "nvidia-222" for m in d["free_mdevs"])
    assert d["parents"] == [{"parent": "0000:3b:00.0", "type": "nvidia-222", "available_instances": 16}]
    assert out["can_take"] is True and out["how"] == "remap" and out["remap"] == "free"
    assert U.format(1) in out["remap_plan"]
    assert code == 7  # as named, the hook refuses: the exit code says so


def test_none_free_but_creatable(run_cli: Any) -> None:
    code, out, _ = check_json(run_cli, "demo-creatable")
    d = out["devices"][0]
    assert code == 7 and d["free_mdevs"] == []
    assert d["parents"] == [{"parent": "0000:3b:00.0", "type": "nvidia-223", "available_instances": 8}]
    assert out["remap"] == "create" and out["how"] == "remap+create"
    assert "mdevctl start -u NEW-UUID -p 0000:3b:00.0 -t nvidia-223" in out["remap_plan"]


def test_none_possible(run_cli: Any) -> None:
    code, out, _ = check_json(run_cli, "demo-impossible")
    d = out["devices"][0]
    assert code == 7 and d["free_mdevs"] == [] and d["parents"][0]["available_instances"] == 0
    assert out["can_take"] is False and out["remap"] == "impossible"
    assert "available_instances 0" in out["reason"]
    r = run_cli("check", "demo-impossible", "--connect", SRC, "--dest", DST)
    assert "parent 0000:3b:00.0: available_instances 0 for nvidia-225" in r.stdout
    assert "orchestrator:" not in r.stdout


# ----------------------------------------------------------------- --dest-xml (Nova's destination XML)
def _dest_xml(tmp_path: Path, domain: str, mapping: dict[str, str], keep_metadata: bool = True) -> Path:
    import libvirt

    conn = libvirt.open(SRC)
    xml = conn.lookupByName(domain).XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE)
    for old, new in mapping.items():  # what Nova rewrites: the hostdev's source, nothing else
        assert xml.count(old) >= 1
        xml = xml.replace(f"<address uuid='{old}'/>", f"<address uuid='{new}'/>") if "-" in old else \
            xml.replace(old, new)
    if not keep_metadata:
        xml = xml[:xml.index("<metadata>")] + xml[xml.index("</metadata>") + len("</metadata>"):]
    path = tmp_path / f"{domain}-dest.xml"
    path.write_text(xml)
    return path


def test_dest_xml_naming_another_mdev_of_the_same_type_is_allowed(run_cli: Any, tmp_path: Path) -> None:
    xml = _dest_xml(tmp_path, "demo-missing", {U.format(4): U.format(12)})
    r = run_cli("check", "demo-missing", "--connect", SRC, "--dest", DST, "--dest-xml", str(xml), "--json")
    out = json.loads(r.stdout)
    assert r.returncode == 0 and out["verdict"] == "match" and out["dest_xml"] == str(xml)
    d = out["devices"][0]
    assert (d["uuid"], d["source_uuid"], d["matched_by"]) == (U.format(12), U.format(4), "guest-address")


def test_dest_xml_naming_another_type_is_refused(run_cli: Any, tmp_path: Path) -> None:
    xml = _dest_xml(tmp_path, "demo-ok", {U.format(3): U.format(2)})  # …0002 is an nvidia-224 on dest
    r = run_cli("check", "demo-ok", "--connect", SRC, "--dest", DST, "--dest-xml", str(xml), "--json")
    out = json.loads(r.stdout)
    assert r.returncode == 6 and out["verdict"] == "type-mismatch"
    assert U.format(2) in out["reason"] and U.format(3) in out["reason"]


def test_dest_xml_without_our_metadata_is_called_out(run_cli: Any, tmp_path: Path) -> None:
    xml = _dest_xml(tmp_path, "demo-ok", {U.format(3): U.format(12)}, keep_metadata=False)
    r = run_cli("check", "demo-ok", "--connect", SRC, "--dest", DST, "--dest-xml", str(xml), "--json")
    out = json.loads(r.stdout)
    assert r.returncode == 8 and out["gate_verdict"] == "not-annotated"
    assert any("carries no libvirt-mdev metadata" in n for n in out["notes"])


def test_dest_xml_that_moves_a_device_is_malformed(run_cli: Any, tmp_path: Path) -> None:
    xml = _dest_xml(tmp_path, "demo-ok", {"slot='0x05'": "slot='0x07'"})
    r = run_cli("check", "demo-ok", "--connect", SRC, "--dest", DST, "--dest-xml", str(xml))
    assert r.returncode == 10 and r.stderr.count("\n") == 1 and "libvirt refuses a destination XML" in r.stderr


# ----------------------------------------------------------------- version policy through check
def _fake_dest_sysfs(tmp_path: Path, version: str) -> Path:
    from testkit.fakesysfs import FakeParent, make_fake_sysfs

    return make_fake_sysfs(tmp_path / version, parents={"0000:3b:00.0": ["nvidia-222"]},
                           parent_info={"0000:3b:00.0": FakeParent(version=version)}).root


def test_version_policy_older_driver_refused_when_asked_allowed_when_off(run_cli: Any, tmp_path: Path) -> None:
    older = _fake_dest_sysfs(tmp_path, "535.129.03")
    base = ("check", "demo-versioned", "--connect", SRC, "--dest", DST, "--dest-sysfs", str(older), "--json")
    r = run_cli(*base, "--match-driver-version", "same-or-newer")
    out = json.loads(r.stdout)
    assert r.returncode == 6 and out["verdict"] == "driver-mismatch"
    d = out["devices"][0]
    assert (d["source_driver_version"], d["dest_driver_version"]) == ("550.54.14", "535.129.03")
    r = run_cli(*base, "--match-driver-version", "off")
    assert r.returncode == 0 and json.loads(r.stdout)["verdict"] == "match"
    newer = _fake_dest_sysfs(tmp_path, "550.127.05")
    r = run_cli("check", "demo-versioned", "--connect", SRC, "--dest", DST, "--dest-sysfs", str(newer),
                "--match-driver-version", "same-or-newer")
    assert r.returncode == 0 and "vendor driver version same-or-newer" in r.stdout


def test_version_rule_without_dest_sysfs_is_unchecked_and_said(run_cli: Any) -> None:
    r = run_cli("check", "demo-versioned", "--connect", SRC, "--dest", DST, "--json",
                "--match-driver-version", "same-or-newer")
    out = json.loads(r.stdout)
    assert r.returncode == 0 and out["policy_unchecked"] == ["match_driver_version"]
    assert any("libvirt does not report vendor driver versions" in n for n in out["notes"])


def test_parent_model_policy_through_check(run_cli: Any) -> None:
    a100 = host_uri(HOSTS / "dest-a100.xml")
    r = run_cli("check", "demo-versioned", "--connect", SRC, "--dest", DST, "--json", "--match-parent-model")
    assert r.returncode == 0 and json.loads(r.stdout)["devices"][0]["dest_parent_model"] == "10de:1eb8"
    r = run_cli("check", "demo-versioned", "--connect", SRC, "--dest", a100, "--json", "--match-parent-model")
    assert r.returncode == 7  # no such mdev there at all; and no parent offers nvidia-222
    assert json.loads(r.stdout)["remap"] == "impossible"


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
    header = next(i for i, line in enumerate(lines) if line.startswith("GUEST ADDR"))
    assert lines[header].split() == ["GUEST", "ADDR", "MDEV", "UUID", "SOURCE", "TYPE", "ANNOTATED", "DEST", "TYPE",
                                     "ON", "DEST", "VERDICT"]
    assert lines[header + 1].split() == ["0000:00:05.0", U.format(1), "nvidia-222", "nvidia-222", "nvidia-222",
                                         "yes", "match"]
    assert lines[header + 2].split() == ["0000:00:06.0", U.format(2), "nvidia-223", "nvidia-223", "nvidia-224",
                                         "yes", "type-mismatch"]
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
    for word in ("type-mismatch", "missing-on-dest", "not-annotated", "exit 6", "--dest", "annotate", "--dest-xml",
                 "available_instances", "docs/check.md", "--match-driver-version"):
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
