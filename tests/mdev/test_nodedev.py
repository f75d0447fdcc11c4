"""Node devices: mdev type and parent through libvirt (test driver host files)."""
from __future__ import annotations

from pathlib import Path

import pytest

from libvirt_mdev.errors import ConnectError, MdevError, NotFound, XMLError
from libvirt_mdev.mdev.nodedev import (
    NodedevMdev,
    find_mdev,
    list_mdevs,
    lookup_domain,
    open_connection,
    parse_nodedev_mdev,
)

HOSTS = Path(__file__).resolve().parents[2] / "examples" / "hosts"
U = "8f1e4a52-6c1e-4c1e-9a3b-5a0b7e3d00{:02d}"


def uri(name: str) -> str:
    return f"test://{HOSTS / name}"


def test_new_style_name_and_uuid_element() -> None:
    xml = """<device><name>mdev_4b20d080_1b54_4048_85b3_a6a62d165c01_0000_af_00_0</name>
      <parent>pci_0000_af_00_0</parent>
      <capability type='mdev'><type id='nvidia-222'/><uuid>4b20d080-1b54-4048-85b3-a6a62d165c01</uuid>
      <iommuGroup number='1'/></capability></device>"""
    m = parse_nodedev_mdev(xml)
    assert m == NodedevMdev("4b20d080-1b54-4048-85b3-a6a62d165c01", "nvidia-222", "0000:af:00.0",
                            "mdev_4b20d080_1b54_4048_85b3_a6a62d165c01_0000_af_00_0")


def test_legacy_name_without_uuid_element() -> None:
    xml = """<device><name>mdev_4B20D080_1b54_4048_85b3_a6a62d165c01</name><parent>css_0_0_0023</parent>
      <capability type='mdev'><type id='vfio_ccw-io'/><iommuGroup number='0'/></capability></device>"""
    m = parse_nodedev_mdev(xml)
    assert m is not None
    assert m.uuid == "4b20d080-1b54-4048-85b3-a6a62d165c01"
    assert m.type_id == "vfio_ccw-io"
    assert m.parent == "css_0_0_0023"  # not PCI: libvirt's name is kept


def test_parent_addr_element_wins() -> None:
    xml = """<device><name>mdev_x</name><parent>pci_0000_af_00_0</parent><capability type='mdev'>
      <type id='t'/><uuid>4b20d080-1b54-4048-85b3-a6a62d165c01</uuid><parent_addr>0000:af:00.1</parent_addr>
      </capability></device>"""
    assert parse_nodedev_mdev(xml).parent == "0000:af:00.1"  # type: ignore[union-attr]


def test_non_mdev_device_is_none() -> None:
    assert parse_nodedev_mdev("<device><name>computer</name><capability type='system'/></device>") is None


@pytest.mark.parametrize("xml,match", [
    ("<device><name>mdev_x</name><capability type='mdev'><uuid>4b20d080-1b54-4048-85b3-a6a62d165c01</uuid>"
     "</capability></device>", "without a valid <type"),
    ("<device><name>mdev_x</name><capability type='mdev'><type id='t'/></capability></device>", "cannot tell the mdev uuid"),
    ("<device><name>", "not well-formed"),
])
def test_bad_nodedev_xml(xml: str, match: str) -> None:
    with pytest.raises(XMLError, match=match):
        parse_nodedev_mdev(xml)


def test_list_mdevs_on_example_hosts() -> None:
    src = list_mdevs(open_connection(uri("source.xml")))
    dst = list_mdevs(open_connection(uri("dest.xml")))
    assert src[U.format(2)][0].type_id == "nvidia-223"
    assert dst[U.format(2)][0].type_id == "nvidia-224"
    assert dst[U.format(2)][0].parent == "0000:3b:00.0"
    assert U.format(4) in src and U.format(4) not in dst


def test_find_mdev_refuses_ambiguous_uuid() -> None:
    a = NodedevMdev(U.format(1), "t1", "p1", "n1")
    b = NodedevMdev(U.format(1), "t2", "p2", "n2")
    with pytest.raises(MdevError, match="more than once"):
        find_mdev({a.uuid: [a, b]}, a.uuid, "h")
    assert find_mdev({a.uuid: [a, a]}, a.uuid, "h") == a
    inactive = NodedevMdev(U.format(1), "t1", "p1", "n1", active=False)
    assert find_mdev({a.uuid: [inactive]}, a.uuid, "h") is None
    assert find_mdev({a.uuid: [inactive]}, a.uuid, "h", include_inactive=True) == inactive


def test_unreachable_uri_is_connecterror() -> None:
    with pytest.raises(ConnectError, match="cannot connect to qemu\\+tcp://127.0.0.1:1/system"):
        open_connection("qemu+tcp://127.0.0.1:1/system")
    with pytest.raises(ConnectError, match="does not exist"):
        open_connection("test:///no/such/host.xml")


def test_unknown_domain_is_notfound() -> None:
    with pytest.raises(NotFound, match="domain nope not found") as exc:
        lookup_domain(open_connection(uri("source.xml")), "nope")
    assert exc.value.exit_code == 12
    assert lookup_domain(open_connection(uri("source.xml")), "5a9c2a4e-7d1b-4b8e-8f57-0c1d2e3f4001").name() == "demo"
