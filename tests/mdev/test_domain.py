"""Domain XML: mdev hostdevs, VFIO idstrs, our metadata (read, build, edit in place)."""
from __future__ import annotations

import pytest

from libvirt_mdev.errors import XMLError
from libvirt_mdev.mdev import domain as D
from libvirt_mdev.mdev.domain import (
    METADATA_NS,
    AnnotatedMdev,
    Annotation,
    annotation_xml,
    merge_annotations,
    parse_annotation,
    parse_domain,
    set_annotation,
)

U1 = "4b20d080-1b54-4048-85b3-a6a62d165c01"
U2 = "4b20d080-1b54-4048-85b3-a6a62d165c02"


def hostdev(uuid: str, bus: int = 0, slot: int = 5, fn: int = 0, addr: bool = True) -> str:
    a = (f'<address type="pci" domain="0x0000" bus="0x{bus:02x}" slot="0x{slot:02x}" '
         f'function="0x{fn:x}"/>') if addr else ""
    return (f'<hostdev mode="subsystem" type="mdev" managed="no" model="vfio-pci">'
            f'<source><address uuid="{uuid}"/></source>{a}</hostdev>')


def domain(devices: str = "", metadata: str = "") -> str:
    meta = f"\n  <metadata>\n    {metadata}\n  </metadata>" if metadata else ""
    return (f'<domain type="kvm">\n  <name>vm1</name>\n  <uuid>11111111-2222-3333-4444-555555555555</uuid>'
            f'{meta}\n  <memory unit="KiB">1048576</memory>\n  <devices>\n    {devices}\n  </devices>\n</domain>\n')


def controller(index: int, model: str, bus: int = 0, slot: int = 2, extra: str = "") -> str:
    return (f'<controller type="pci" index="{index}" model="{model}">{extra}'
            f'<address type="pci" domain="0x0000" bus="0x{bus:02x}" slot="0x{slot:02x}" function="0x0"/>'
            f'</controller>')


ANN = (f'<mdev:migration xmlns:mdev="{METADATA_NS}" host="src1">'
       f'<mdev:device uuid="{U1}" type="nvidia-222" parent="0000:af:00.0"/></mdev:migration>')


def test_parse_domain_lists_mdev_hostdevs_with_root_bus_idstr() -> None:
    info = parse_domain(domain(hostdev(U1) + hostdev(U2, slot=6)))
    assert info.name == "vm1"
    assert info.uuid == "11111111-2222-3333-4444-555555555555"
    assert [h.uuid for h in info.hostdevs] == [U1, U2]
    assert info.hostdevs[0].model == "vfio-pci"
    assert str(info.hostdevs[0].guest_address) == "0000:00:05.0"
    assert info.hostdevs[0].idstr == "0000:00:05.0/vfio"
    assert info.hostdevs[1].idstr == "0000:00:06.0/vfio"
    assert info.annotation is None


def test_parse_domain_ignores_other_hostdevs() -> None:
    pci = ('<hostdev mode="subsystem" type="pci" managed="yes"><source>'
           '<address domain="0x0000" bus="0x03" slot="0x00" function="0x0"/></source></hostdev>')
    assert parse_domain(domain(pci + hostdev(U1))).hostdevs[0].uuid == U1
    assert len(parse_domain(domain(pci)).hostdevs) == 0


def test_uuid_is_normalised_to_lower_case() -> None:
    info = parse_domain(domain(hostdev(U1.upper())))
    assert info.hostdevs[0].uuid == U1
    assert info.hostdev(U1.upper()) is info.hostdevs[0]


def test_idstr_behind_root_port() -> None:
    devs = controller(0, "pcie-root").replace('<address type="pci" domain="0x0000" bus="0x00" slot="0x02" function="0x0"/>', "")
    devs += controller(1, "pcie-root-port", bus=0, slot=2) + hostdev(U1, bus=1, slot=0)
    assert parse_domain(domain(devs)).hostdevs[0].idstr == "0000:00:02.0:00.0/vfio"


def test_idstr_behind_two_levels_of_bridges() -> None:
    devs = (controller(1, "pcie-root-port", bus=0, slot=3) + controller(2, "pcie-switch-upstream-port", bus=1, slot=0)
            + controller(3, "pcie-switch-downstream-port", bus=2, slot=0) + hostdev(U1, bus=3, slot=0))
    assert parse_domain(domain(devs)).hostdevs[0].idstr == "0000:00:03.0:00.0:00.0:00.0/vfio"  # root port, upstream, downstream, device


def test_idstr_on_expander_bus_uses_its_bus_number() -> None:
    devs = controller(1, "pcie-expander-bus", bus=0, slot=4, extra="<target busNr='254'/>") + hostdev(U1, bus=1, slot=0)
    assert parse_domain(domain(devs)).hostdevs[0].idstr == "0000:fe:00.0/vfio"


def test_idstr_unknown_when_bus_has_no_controller_or_no_address() -> None:
    info = parse_domain(domain(hostdev(U1, bus=7) + hostdev(U2, addr=False)))
    assert info.hostdevs[0].idstr is None
    assert str(info.hostdevs[0].guest_address) == "0000:07:05.0"
    assert info.hostdevs[1].guest_address is None and info.hostdevs[1].idstr is None


def test_controller_cycle_gives_no_idstr() -> None:
    devs = controller(1, "pci-bridge", bus=2, slot=1) + controller(2, "pci-bridge", bus=1, slot=1) + hostdev(U1, bus=1)
    assert parse_domain(domain(devs)).hostdevs[0].idstr is None


def test_annotation_is_read_from_metadata() -> None:
    info = parse_domain(domain(hostdev(U1), ANN))
    assert info.annotation is not None
    assert info.annotation.host == "src1"
    dev = info.annotation.get(U1)
    assert dev == AnnotatedMdev(U1, "nvidia-222", "0000:af:00.0", None)
    assert info.annotation.get(U2) is None


def test_annotation_in_foreign_namespace_is_ignored() -> None:
    other = ANN.replace(METADATA_NS, "urn:someone-else")
    assert parse_domain(domain(hostdev(U1), other)).annotation is None


def test_parse_annotation_accepts_libvirt_metadata_form() -> None:
    # dom.metadata() returns the element without prefix or namespace (docs/mdev.md)
    ann = parse_annotation(f'<migration host="h"><device uuid="{U1}" type="nvidia-222"/></migration>')
    assert ann.get(U1) is not None and ann.get(U1).type_id == "nvidia-222"  # type: ignore[union-attr]
    with pytest.raises(XMLError, match="expected <migration>"):
        parse_annotation("<other/>")


@pytest.mark.parametrize("xml,match", [
    ("<domain><name>x</name", "not well-formed"),
    ("", "empty"),
    ("<notdomain/>", "expected <domain>"),
    ("<domain/>", "no <name>"),
    (domain('<hostdev mode="subsystem" type="mdev" model="vfio-pci"><source/></hostdev>'), "no <source><address uuid"),
    (domain(hostdev("../../etc")), "invalid value"),
    (domain(hostdev(U1, addr=False).replace("</source>", "</source><address type='pci' slot='zz'/>")), "invalid value 'zz'"),
    (domain(hostdev(U1) + hostdev(U1, slot=6)), "listed twice"),
    (domain(hostdev(U1), ANN.replace('type="nvidia-222"', 'type="bad/type"')), "invalid value"),
    (domain(hostdev(U1), ANN.replace('type="nvidia-222" ', '')), "needs uuid and type"),
    (domain(hostdev(U1), ANN + ANN), "more than one"),
    (domain(hostdev(U1), ANN.replace("</mdev:migration>", f'<mdev:device uuid="{U1}" type="x"/></mdev:migration>')),
     "annotated twice"),
])
def test_bad_xml_raises_one_line_xmlerror(xml: str, match: str) -> None:
    with pytest.raises(XMLError, match=match) as exc:
        parse_domain(xml)
    assert "\n" not in str(exc.value)


def test_entities_are_not_expanded() -> None:
    xml = ('<?xml version="1.0"?><!DOCTYPE d [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
           '<domain><name>&x;</name></domain>')
    with pytest.raises(XMLError):
        parse_domain(xml)  # the name stays an unresolved entity: no <name> text


def test_annotation_xml_unqualified_for_setmetadata() -> None:
    ann = Annotation({U1: AnnotatedMdev(U1, "nvidia-222", "0000:af:00.0", "vfio-pci")}, host="h", time="t")
    text = annotation_xml(ann)
    assert text.startswith('<migration host="h" time="t">')
    assert "xmlns" not in text
    assert parse_annotation(text) == ann
    assert METADATA_NS in annotation_xml(ann, qualified=True)


def test_set_annotation_adds_metadata_and_changes_nothing_else() -> None:
    original = domain(hostdev(U1) + hostdev(U2, slot=6))
    ann = Annotation({U1: AnnotatedMdev(U1, "nvidia-222"), U2: AnnotatedMdev(U2, "nvidia-223", "0000:af:00.0")})
    out = set_annotation(original, ann).decode()
    info = parse_domain(out)
    assert info.annotation == ann
    assert info.hostdevs == parse_domain(original).hostdevs
    # removing it again gives back exactly the input: the edit touched nothing else
    assert set_annotation(out, None).decode() == original
    assert "  <metadata>\n    <mdev:migration" in out  # indented like libvirt


def test_set_annotation_replaces_ours_and_keeps_other_metadata() -> None:
    other = '<app:info xmlns:app="urn:app">keep me</app:info>'
    original = domain(hostdev(U1), other + "\n    " + ANN)
    new = Annotation({U1: AnnotatedMdev(U1, "nvidia-999")})
    out = set_annotation(original, new).decode()
    assert 'keep me' in out and 'xmlns:app="urn:app"' in out
    assert parse_domain(out).annotation == new
    assert out.count("mdev:migration") == 2  # one open, one close tag: the old one is gone
    removed = set_annotation(out, None).decode()
    assert "<metadata>" in removed and "keep me" in removed and METADATA_NS not in removed


def test_set_annotation_keeps_xml_declaration_and_comments() -> None:
    original = '<?xml version="1.0" encoding="UTF-8"?>\n<!-- c -->\n' + domain(hostdev(U1))
    out = set_annotation(original.encode(), Annotation({U1: AnnotatedMdev(U1, "t")}))
    assert out.startswith(b"<?xml") and b"<!-- c -->" in out


def test_merge_annotations_new_wins_old_kept() -> None:
    old = Annotation({U1: AnnotatedMdev(U1, "a"), U2: AnnotatedMdev(U2, "b")}, host="old")
    new = Annotation({U1: AnnotatedMdev(U1, "c")})
    merged = merge_annotations(old, new)
    assert merged.get(U1).type_id == "c"  # type: ignore[union-attr]
    assert merged.get(U2).type_id == "b"  # type: ignore[union-attr]
    assert merged.host == "old"
    assert merge_annotations(None, new) == new


def test_every_xpath_property_is_exercised() -> None:
    """virt-manager's test_checkprops idea: a declared XPath nobody reads is dead code."""
    rich = domain(controller(1, "pcie-expander-bus", extra="<target busNr='3'/>") + hostdev(U1, bus=1), ANN
                  .replace('parent=', 'device_api="vfio-pci" parent='))
    seen: set[str] = set()
    orig_get = D.XPathProp.__get__

    def spy(self, obj, objtype=None):  # type: ignore[no-untyped-def]
        if obj is not None:
            seen.add(f"{self.owner}.{self.name}")
        return orig_get(self, obj, objtype)

    D.XPathProp.__get__ = spy  # type: ignore[method-assign]
    try:
        parse_domain(rich)
        h = D.Hostdev(D.parse_xml(rich).find("./devices/hostdev"))
        _ = (h.mode, h.type)
    finally:
        D.XPathProp.__get__ = orig_get  # type: ignore[method-assign]
    declared = {f"{p.owner}.{p.name}" for p in D.XPathProp.registry}
    assert declared - seen == set()
