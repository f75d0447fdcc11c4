"""``libvirt-mdev annotate`` against the test driver.

Each test:/// connection gets a fresh copy of the host file, so the read-back tests
call :func:`annotate_domain` and read the metadata on the same connection; the CLI
tests check the command's output and exit codes.
"""
from __future__ import annotations

import json
from typing import Any

import libvirt
import pytest

from libvirt_mdev.cli.annotate import annotate_domain
from libvirt_mdev.errors import MdevMissing
from libvirt_mdev.mdev.domain import METADATA_NS, AnnotatedMdev, parse_annotation, parse_domain
from libvirt_mdev.mdev.nodedev import find_mdev, list_mdevs, open_connection
from libvirt_mdev.mdev.types import DestMdev, Verdict, compare

from .conftest import HOSTS, host_uri

SRC = host_uri(HOSTS / "source.xml")
U = "8f1e4a52-6c1e-4c1e-9a3b-5a0b7e3d00{:02d}"


def test_annotate_writes_live_and_config_metadata() -> None:
    conn = open_connection(SRC)
    out = annotate_domain(conn, "demo-unannotated")
    assert out["written"] == ["live", "config"]
    assert out["devices"] == [{"uuid": U.format(5), "type": "nvidia-222", "parent": "0000:af:00.0",
                               "address": "0000:00:05.0", "parent_model": "10de:1eb8", "driver": None,
                               "driver_version": None, "from": "nodedev"}]
    dom = conn.lookupByName("demo-unannotated")
    for flag in (libvirt.VIR_DOMAIN_AFFECT_LIVE, libvirt.VIR_DOMAIN_AFFECT_CONFIG):
        ann = parse_annotation(dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, METADATA_NS, flag))
        assert ann.get(U.format(5)) == AnnotatedMdev(U.format(5), "nvidia-222", "0000:af:00.0",
                                                     guest_address="0000:00:05.0", parent_model="10de:1eb8")
    info = parse_domain(dom.XMLDesc(0))
    assert info.annotation is not None and info.annotation.host


def test_annotated_domain_then_passes_check_against_dest() -> None:
    conn = open_connection(SRC)
    annotate_domain(conn, "demo-unannotated")
    info = parse_domain(conn.lookupByName("demo-unannotated").XMLDesc(0))
    dest = list_mdevs(open_connection(host_uri(HOSTS / "dest.xml")))

    def lookup(u: str) -> DestMdev | None:
        m = find_mdev(dest, u, "dest")
        return DestMdev(m.type_id, m.parent) if m else None

    assert compare(info, lookup).verdict is Verdict.MATCH


def test_annotate_replaces_a_stale_annotation() -> None:
    conn = open_connection(SRC)
    dom = conn.lookupByName("demo")
    dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT,
                    f"<migration><device uuid='{U.format(2)}' type='stale-type'/></migration>",
                    "mdev", METADATA_NS, libvirt.VIR_DOMAIN_AFFECT_LIVE)
    annotate_domain(conn, "demo")
    ann = parse_domain(dom.XMLDesc(0)).annotation
    assert ann is not None
    assert ann.get(U.format(2)).type_id == "nvidia-223"  # type: ignore[union-attr]
    assert ann.get(U.format(1)).type_id == "nvidia-222"  # type: ignore[union-attr]


def test_annotate_records_the_driver_version_from_sysfs_and_binds_by_address(tmp_path: Any) -> None:
    from testkit.fakesysfs import FakeParent, make_fake_sysfs

    env = make_fake_sysfs(tmp_path / "sys", parents={"0000:af:00.0": ["nvidia-222"]},
                          parent_info={"0000:af:00.0": FakeParent(version="550.54.14")})
    conn = open_connection(SRC)
    out = annotate_domain(conn, "demo-unannotated", sysfs=env)
    assert (out["devices"][0]["driver"], out["devices"][0]["driver_version"]) == ("nvidia", "550.54.14")
    xml = conn.lookupByName("demo-unannotated").XMLDesc(0)
    # the destination gives the guest another mdev: the annotation still describes the device at 05.0
    remapped = parse_domain(xml.replace(f"<address uuid='{U.format(5)}'/>",
                                        f"<address uuid='{U.format(12)}'/>"))
    src, how = remapped.source_of(remapped.hostdevs[0])
    assert src is not None and how is not None
    assert (src.uuid, src.driver_version, how.value) == (U.format(5), "550.54.14", "guest-address")


def test_reannotating_an_old_annotation_adds_addresses() -> None:
    conn = open_connection(SRC)
    before = parse_domain(conn.lookupByName("demo").XMLDesc(0)).annotation
    assert before is not None and all(d.guest_address is None for d in before.devices.values())
    annotate_domain(conn, "demo")
    after = parse_domain(conn.lookupByName("demo").XMLDesc(0)).annotation
    assert after is not None
    assert {d.guest_address: d.type_id for d in after.devices.values()} == {
        "0000:00:05.0": "nvidia-222", "0000:00:06.0": "nvidia-223"}


def test_type_override_for_an_mdev_the_host_lacks() -> None:
    conn = open_connection(host_uri(HOSTS / "dest.xml"))
    conn.defineXML(open_connection(SRC).lookupByName("demo-missing").XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE))
    with pytest.raises(MdevMissing, match=f"mdev {U.format(4)} is not a node device"):
        annotate_domain(conn, "demo-missing")
    out = annotate_domain(conn, "demo-missing", {U.format(4): AnnotatedMdev(U.format(4), "nvidia-999")})
    assert out["written"] == ["config"]  # defined, not running
    assert out["devices"][0]["from"] == "--type"
    xml = conn.lookupByName("demo-missing").XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    assert parse_domain(xml).annotation.get(U.format(4)).type_id == "nvidia-999"  # type: ignore[union-attr]


def test_cli_annotate_json(run_cli: Any) -> None:
    r = run_cli("annotate", "demo", "--connect", SRC, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["domain"] == "demo" and out["written"] == ["live", "config"]
    assert [(d["uuid"], d["type"]) for d in out["devices"]] == [(U.format(1), "nvidia-222"),
                                                                (U.format(2), "nvidia-223")]


def test_cli_annotate_table_and_no_mdev(run_cli: Any) -> None:
    r = run_cli("annotate", "demo", "--connect", SRC)
    assert r.returncode == 0
    assert f"0000:00:05.0  {U.format(1)}  type nvidia-222  parent 0000:af:00.0" in r.stdout
    r = run_cli("annotate", "demo-plain", "--connect", SRC)
    assert r.returncode == 0 and "nothing to annotate" in r.stdout


def test_cli_annotate_errors_are_one_line(run_cli: Any) -> None:
    r = run_cli("annotate", "nope", "--connect", SRC)
    assert r.returncode == 12 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    r = run_cli("annotate", "demo", "--connect", SRC, "--type", "garbage")
    assert r.returncode == 2 and "expected UUID=TYPE" in r.stderr
    r = run_cli("annotate", "demo", "--connect", "qemu+tcp://127.0.0.1:1/system", "--json")
    assert r.returncode == 5 and json.loads(r.stdout)["error"]["kind"] == "connect"
