"""annotate / check against a real libvirtd (the harness's private host).

This machine has no mdev hardware: libvirt defines (but cannot start) a domain whose
mdevs are absent, and its node devices list no mdevs, so annotate takes the types
with --type.  The metadata is read back through `virsh dumpxml`, as an admin would.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from libvirt_mdev.mdev.domain import METADATA_NS, parse_domain
from tests.harness import LibvirtHost
from tests.harness.cli import run_cli
from tests.harness.guests import GuestSpec

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
U1 = "8f1e4a52-6c1e-4c1e-9a3b-5a0b7e3d0001"  # the example dest host has it as nvidia-222
U2 = "8f1e4a52-6c1e-4c1e-9a3b-5a0b7e3d0002"  # … and this one as nvidia-224
DEST = f"test://{REPO / 'examples' / 'hosts' / 'dest.xml'}"


def mdev_hostdev(uuid: str, slot: int) -> str:
    return (f"<hostdev mode='subsystem' type='mdev' model='vfio-pci'><source><address uuid='{uuid}'/></source>"
            f"<address type='pci' domain='0x0000' bus='0x00' slot='0x{slot:02x}' function='0x0'/></hostdev>")


def cli(*args: str, config: str = "/dev/null") -> subprocess.CompletedProcess[str]:
    return run_cli(*args, config=config, clean_env=True, timeout=120)


@pytest.fixture
def mdev_domain(libvirt_host: LibvirtHost, tmp_path: Path):  # type: ignore[no-untyped-def]
    spec = GuestSpec(name="lm-mdev-annot", net=None, usb_model=None,
                     extra_devices=[mdev_hostdev(U1, 7), mdev_hostdev(U2, 8)])
    xml = tmp_path / "dom.xml"
    xml.write_text(spec.to_xml())
    libvirt_host.virsh("define", str(xml))
    try:
        yield spec
    finally:
        libvirt_host.virsh("undefine", spec.name, check=False)


def test_annotate_defined_domain_and_read_back_with_virsh(libvirt_host: LibvirtHost, mdev_domain: GuestSpec) -> None:
    name = mdev_domain.name
    # libvirt's node devices know no such mdevs here: annotate says so, in one line, exit 7
    r = cli("annotate", name, "--connect", libvirt_host.uri)
    assert r.returncode == 7 and r.stderr.count("\n") == 1 and "--type" in r.stderr and "Traceback" not in r.stderr
    r = cli("annotate", name, "--connect", libvirt_host.uri, "--json",
            "--type", f"{U1}=nvidia-222", "--type", f"{U2}=nvidia-223")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["written"] == ["config"]  # defined, not running: only the persistent definition
    assert {d["uuid"]: d["type"] for d in out["devices"]} == {U1: "nvidia-222", U2: "nvidia-223"}

    dumped = libvirt_host.virsh("dumpxml", "--inactive", name).stdout
    assert f'xmlns:mdev="{METADATA_NS}"' in dumped
    assert f'<mdev:device address="0000:00:08.0" uuid="{U2}" type="nvidia-223"/>' in dumped
    info = parse_domain(dumped)
    assert info.annotation is not None
    assert {u: a.type_id for u, a in info.annotation.devices.items()} == {U1: "nvidia-222", U2: "nvidia-223"}
    assert [h.idstr for h in info.hostdevs] == ["0000:00:07.0/vfio", "0000:00:08.0/vfio"]
    # the same through virsh metadata (libvirt's own accessor)
    meta = libvirt_host.virsh("metadata", name, METADATA_NS, "--config").stdout
    assert "<migration" in meta and U1 in meta

    # re-annotating replaces, it does not pile up elements
    assert cli("annotate", name, "--connect", libvirt_host.uri, "--type", f"{U1}=nvidia-222",
               "--type", f"{U2}=nvidia-224").returncode == 0
    dumped = libvirt_host.virsh("dumpxml", "--inactive", name).stdout
    assert dumped.count("<mdev:migration") == 1 and 'type="nvidia-224"' in dumped


def test_check_real_source_against_example_dest(libvirt_host: LibvirtHost, mdev_domain: GuestSpec) -> None:
    name = mdev_domain.name
    r = cli("check", name, "--connect", libvirt_host.uri, "--dest", DEST, "--json")
    assert r.returncode == 8 and json.loads(r.stdout)["verdict"] == "not-annotated"
    assert cli("annotate", name, "--connect", libvirt_host.uri, "--type", f"{U1}=nvidia-222",
               "--type", f"{U2}=nvidia-223").returncode == 0
    r = cli("check", name, "--connect", libvirt_host.uri, "--dest", DEST, "--json")
    out = json.loads(r.stdout)
    assert r.returncode == 6 and out["verdict"] == "type-mismatch"
    assert [(d["uuid"], d["verdict"]) for d in out["devices"]] == [(U1, "match"), (U2, "type-mismatch")]


def test_check_local_destination_reports_store_readiness(libvirt_host: LibvirtHost, mdev_domain: GuestSpec,
                                                        tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir(mode=0o700)
    store.chmod(0o700)
    conf = tmp_path / "c.conf"
    conf.write_text(f"[libvirt-mdev]\nstore = {store}\n")
    # the private host as both source and destination: a local qemu URI, so the store is checked
    r = cli("check", mdev_domain.name, "--connect", libvirt_host.uri, "--dest", libvirt_host.uri, "--json",
            config=str(conf))
    out = json.loads(r.stdout)
    assert out["store"]["ready"] is True
    assert r.returncode == 8 and out["verdict"] == "not-annotated"  # fresh domain, not annotated
    store.chmod(0o755)
    r = cli("check", mdev_domain.name, "--connect", libvirt_host.uri, "--dest", libvirt_host.uri, "--json",
            config=str(conf))
    out = json.loads(r.stdout)
    assert out["store"]["ready"] is False and any("store is not usable" in n for n in out["notes"])
