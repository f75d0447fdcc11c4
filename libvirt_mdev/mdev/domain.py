"""Domain XML: the mdev hostdevs a domain uses, and our own ``<metadata>`` element.

What we read::

    <hostdev mode='subsystem' type='mdev' model='vfio-pci'>
      <source><address uuid='4b20d080-1b54-4048-85b3-a6a62d165c01'/></source>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x05' function='0x0'/>
    </hostdev>

The package is split by concern; this module is the entry point and re-exports the
names callers used before the split:

* :mod:`.xpath` — declared XPath properties and the hardened parser;
* :mod:`.model` — the dataclasses (no lxml: the hook's gate uses them);
* :mod:`.topology` — guest PCI topology → VFIO section idstr;
* :mod:`.annotation` — reading our metadata element;
* :mod:`.metadata_edit` — building, merging and editing it in domain XML.

Every parse error is an :class:`~libvirt_mdev.errors.XMLError` (one line); any other
exception escaping from here is a bug.
"""
from __future__ import annotations

from collections.abc import Mapping

from ..errors import XMLError
from .annotation import (
    METADATA_KEY,
    METADATA_NS,
    METADATA_ROOT,
    AnnotatedDeviceElement,
    annotation_from_element,
    find_annotation,
    parse_annotation,
)
from .metadata_edit import annotation_xml, merge_annotations, set_annotation
from .model import AnnotatedMdev, Annotation, DomainInfo, GuestAddress, MatchedBy, MdevHostdev
from .topology import Controller, PciAddressElement, element_address, pci_controllers, vfio_idstr
from .xpath import XMLElement, XMLInput, XPathProp, parse_xml, uuid_value

__all__ = ["METADATA_KEY", "METADATA_NS", "METADATA_ROOT", "AnnotatedDeviceElement", "AnnotatedMdev", "Annotation",
           "Controller", "DomainElement", "DomainInfo", "GuestAddress", "Hostdev", "MatchedBy", "MdevHostdev",
           "XMLElement", "XMLInput", "XPathProp", "annotation_from_element", "annotation_xml", "merge_annotations",
           "parse_annotation", "parse_domain", "parse_xml", "set_annotation", "vfio_idstr"]


class Hostdev(PciAddressElement):
    """``<hostdev>``; the ``source`` uuid exists for ``type='mdev'`` only."""

    XML_NAME = "hostdev"
    mode = XPathProp[str]("./@mode")
    type = XPathProp[str]("./@type")
    model = XPathProp[str]("./@model")
    uuid = XPathProp("./source/address/@uuid", uuid_value)


class DomainElement(XMLElement):
    XML_NAME = "domain"
    name = XPathProp[str]("./name/text()")
    uuid = XPathProp("./uuid/text()", uuid_value)


def parse_domain(xml: XMLInput) -> DomainInfo:
    """The facts libvirt-mdev needs from a domain definition.

    Raises:
        XMLError: not XML, not a ``<domain>``, no ``<name>``, a malformed mdev uuid or
            address, an mdev uuid or guest address used twice, or a malformed or
            duplicated libvirt-mdev metadata element.
    """
    root = parse_xml(xml)
    if root.tag != "domain":
        raise XMLError(f"domain XML has root <{root.tag}>, expected <domain>")
    dom = DomainElement(root)
    name = dom.name
    if not name:
        raise XMLError("domain XML has no <name>")
    controllers = pci_controllers(root)
    hostdevs = [_mdev_hostdev(Hostdev(n), controllers)
                for n in root.iterfind("./devices/hostdev[@type='mdev']")]
    seen: set[str] = set()
    for h in hostdevs:
        if h.uuid in seen:
            raise XMLError(f"domain {name}: mdev {h.uuid} is listed twice")
        seen.add(h.uuid)
        if h.address is not None:
            if h.address in seen:  # the binding key must be unique (libvirt refuses it too)
                raise XMLError(f"domain {name}: two mdevs at guest address {h.address}")
            seen.add(h.address)
    return DomainInfo(name=name, uuid=dom.uuid, hostdevs=hostdevs, annotation=find_annotation(root, name))


def _mdev_hostdev(h: Hostdev, controllers: Mapping[int, Controller]) -> MdevHostdev:
    uuid = h.uuid
    if uuid is None:
        raise XMLError("mdev <hostdev> has no <source><address uuid=…/>")
    addr = element_address(h)
    idstr = vfio_idstr(addr, controllers) if addr is not None else None
    return MdevHostdev(uuid=uuid, model=h.model, guest_address=addr, idstr=idstr)
