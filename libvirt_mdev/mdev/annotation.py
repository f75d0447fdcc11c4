"""Reading our ``<metadata>`` element (namespace :data:`METADATA_NS`).

Written on the source by ``libvirt-mdev annotate`` through ``virDomainSetMetadata``;
it travels in the migration XML and in save images::

    <metadata>
      <mdev:migration xmlns:mdev="urn:libvirt-mdev:metadata:1" host="src.example" time="2026-12-01T13:00:00Z">
        <mdev:device address="0000:00:05.0" uuid="4b20d080-…" type="nvidia-222" parent="0000:af:00.0"
                     device_api="vfio-pci" driver="nvidia" driver_version="550.54.14" parent_model="10de:1eb8"/>
      </mdev:migration>
    </metadata>

``uuid`` and ``type`` are required; ``address`` (the guest PCI address, the binding
key — :mod:`.model`) is written by every ``annotate`` since issue 17, and an element
without it is matched by uuid as before.  ``driver_version`` and ``parent_model``
are checked only when the policy asks (:mod:`.policy`); ``host``, ``time``,
``parent`` and ``device_api`` are informative.  libvirt's ``metadata()`` API returns
the element *without* its namespace, and ``setMetadata`` applies the namespace to the
whole snippet, so the reader accepts children in our namespace or in none.
"""
from __future__ import annotations

from lxml import etree

from ..errors import XMLError
from .model import AnnotatedMdev, Annotation
from .topology import guest_address_value
from .xpath import XMLElement, XMLInput, XPathProp, local_name, name_value, parse_xml, uuid_value

METADATA_NS = "urn:libvirt-mdev:metadata:1"
METADATA_KEY = "mdev"
METADATA_ROOT = "migration"


class AnnotatedDeviceElement(XMLElement):
    uuid = XPathProp("./@uuid", uuid_value)
    type_id = XPathProp("./@type", name_value)
    parent = XPathProp("./@parent", name_value)
    device_api = XPathProp("./@device_api", name_value)
    guest_address = XPathProp("./@address", guest_address_value)
    driver = XPathProp("./@driver", name_value)
    driver_version = XPathProp("./@driver_version", name_value)
    parent_model = XPathProp("./@parent_model", name_value)


def _ours(node: etree._Element) -> bool:
    """A child of our element: in our namespace, or in none (libvirt's metadata() form)."""
    ns = etree.QName(node).namespace if isinstance(node.tag, str) else "?"
    return ns in (None, METADATA_NS)


def find_annotation(root: etree._Element, domain_name: str) -> Annotation | None:
    found = root.findall(f"./metadata/{{{METADATA_NS}}}{METADATA_ROOT}")
    if not found:
        return None
    if len(found) > 1:
        raise XMLError(f"domain {domain_name}: more than one libvirt-mdev metadata element")
    return annotation_from_element(found[0])


def annotation_from_element(elem: etree._Element) -> Annotation:
    """Read our element (qualified, or unqualified as ``dom.metadata()`` returns it)."""
    devices: dict[str, AnnotatedMdev] = {}
    addresses: set[str] = set()
    for child in elem:
        if not _ours(child) or local_name(child) != "device":
            continue
        d = AnnotatedDeviceElement(child)
        if d.uuid is None or d.type_id is None:
            raise XMLError("libvirt-mdev metadata: <device> needs uuid and type attributes")
        if d.uuid in devices:
            raise XMLError(f"libvirt-mdev metadata: mdev {d.uuid} is annotated twice")
        addr = d.guest_address
        if addr is not None:
            if addr in addresses:
                raise XMLError(f"libvirt-mdev metadata: guest address {addr} is annotated twice")
            addresses.add(addr)
        devices[d.uuid] = AnnotatedMdev(d.uuid, d.type_id, d.parent, d.device_api, addr,
                                        d.driver, d.driver_version, d.parent_model)
    return Annotation(devices=devices, host=elem.get("host"), time=elem.get("time"))


def parse_annotation(xml: XMLInput) -> Annotation:
    """Parse the string ``dom.metadata(ELEMENT, METADATA_NS)`` returns."""
    elem = parse_xml(xml, "libvirt-mdev metadata")
    if local_name(elem) != METADATA_ROOT:
        raise XMLError(f"libvirt-mdev metadata has root <{local_name(elem)}>, expected <{METADATA_ROOT}>")
    return annotation_from_element(elem)
