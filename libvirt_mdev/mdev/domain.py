"""Domain XML: the mdev hostdevs a domain uses, and our own ``<metadata>`` element.

This is the only module that imports lxml.  Readers are declared as XPaths on one
small class per element (virt-manager's ``XMLProperty`` idea, STYLE.md §3/§8), so
every XPath lives in one place.

What we read (LIBVIRT.md §3)::

    <hostdev mode='subsystem' type='mdev' model='vfio-pci'>
      <source><address uuid='4b20d080-1b54-4048-85b3-a6a62d165c01'/></source>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x05' function='0x0'/>
    </hostdev>

The guest PCI address gives the VFIO section idstr QEMU uses in the migration stream
(FORMAT.md §5.1): ``<root bus path>`` then ``:SS.F`` per level from the root to the
device, then ``/vfio`` — ``0000:00:05.0/vfio`` on the root bus,
``0000:00:02.0:00.0/vfio`` behind a root port at 02.0.  Bridges are found through the
domain's ``<controller type='pci' index=N>`` elements (bus N is that controller's
secondary bus); a pci/pcie expander bus starts a new root ``DDDD:<busNr>``.

Our metadata (namespace :data:`METADATA_NS`, prefix :data:`METADATA_KEY`), written on
the source by ``libvirt-mdev annotate`` through ``virDomainSetMetadata``; it travels in
the migration XML and in save images (LIBVIRT.md §3)::

    <metadata>
      <mdev:migration xmlns:mdev="urn:libvirt-mdev:metadata:1" host="src.example" time="2026-12-01T13:00:00Z">
        <mdev:device uuid="4b20d080-…" type="nvidia-222" parent="0000:af:00.0" device_api="vfio-pci"/>
      </mdev:migration>
    </metadata>

``host``, ``time``, ``parent`` and ``device_api`` are informative; ``uuid`` and ``type``
are required.  libvirt's ``metadata()`` API returns the element *without* its
namespace, and ``setMetadata`` applies the namespace to the whole snippet, so the
reader accepts children in our namespace or in none.

Every parse error is an :class:`~libvirt_mdev.errors.XMLError` (one line); any other
exception escaping from here is a bug.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Generic, Mapping, Optional, TypeVar, Union, overload

from lxml import etree

from ..errors import XMLError
from .names import is_name, is_uuid

METADATA_NS = "urn:libvirt-mdev:metadata:1"
METADATA_KEY = "mdev"
METADATA_ROOT = "migration"

#: a pci/pcie expander bus starts a new PCI root whose number is its ``<target busNr>``
_EXPANDER_MODELS = frozenset({"pci-expander-bus", "pcie-expander-bus"})
_MAX_BRIDGE_DEPTH = 32

XMLInput = Union[bytes, str]
T = TypeVar("T")


# --------------------------------------------------------------------------- XPath layer
class XPathProp(Generic[T]):
    """A read-only attribute: the first result of *xpath* on the element, converted.

    Missing → ``None``; a value the converter rejects → :class:`XMLError` naming the
    element and the value.
    """

    #: every property declared, so a test can check each one is exercised
    registry: ClassVar[list["XPathProp[Any]"]] = []

    def __init__(self, xpath: str, conv: Optional[Callable[[str], T]] = None) -> None:
        self.xpath = xpath
        self.conv = conv
        self.name = xpath
        self.owner = ""
        self._compiled = etree.XPath(xpath, smart_strings=False)
        XPathProp.registry.append(self)

    def __set_name__(self, owner: type, name: str) -> None:
        self.name, self.owner = name, owner.__name__

    @overload
    def __get__(self, obj: None, objtype: Any = None) -> "XPathProp[T]": ...
    @overload
    def __get__(self, obj: "XMLElement", objtype: Any = None) -> Optional[T]: ...

    def __get__(self, obj: Optional["XMLElement"], objtype: Any = None) -> Any:
        if obj is None:
            return self
        found: Any = self._compiled(obj.node)
        if isinstance(found, bool):  # boolean(...) XPaths
            return found
        if not found:
            return None
        text = str(found[0]).strip()
        if self.conv is None:
            return text
        try:
            return self.conv(text)
        except ValueError:
            raise XMLError(f"<{obj.node.tag}> {self.xpath}: invalid value {text!r}") from None


class XMLElement:
    """One lxml element; subclasses declare :class:`XPathProp` attributes."""

    def __init__(self, node: etree._Element) -> None:
        self.node = node


def _pci_int(text: str) -> int:
    """libvirt writes address parts as ``0x05`` (and accepts ``5``)."""
    return int(text, 0)


def _uuid(text: str) -> str:
    low = text.lower()
    if not is_uuid(low):
        raise ValueError(text)
    return low


def _name(text: str) -> str:
    if not is_name(text):
        raise ValueError(text)
    return text


class _PciAddress(XMLElement):
    domain = XPathProp("./address[@type='pci']/@domain", _pci_int)
    bus = XPathProp("./address[@type='pci']/@bus", _pci_int)
    slot = XPathProp("./address[@type='pci']/@slot", _pci_int)
    function = XPathProp("./address[@type='pci']/@function", _pci_int)
    has_pci = XPathProp[bool]("boolean(./address[@type='pci'])")


class Hostdev(_PciAddress):
    """``<hostdev>``; the ``source`` uuid exists for ``type='mdev'`` only."""

    XML_NAME = "hostdev"
    mode = XPathProp[str]("./@mode")
    type = XPathProp[str]("./@type")
    model = XPathProp[str]("./@model")
    uuid = XPathProp("./source/address/@uuid", _uuid)


class Controller(_PciAddress):
    """``<controller type='pci'>``: its index is the number of the bus it provides."""

    XML_NAME = "controller"
    index = XPathProp("./@index", _pci_int)
    model = XPathProp[str]("./@model")
    bus_nr = XPathProp("./target/@busNr", _pci_int)


class DomainElement(XMLElement):
    XML_NAME = "domain"
    name = XPathProp[str]("./name/text()")
    uuid = XPathProp("./uuid/text()", _uuid)


class AnnotatedDeviceElement(XMLElement):
    uuid = XPathProp("./@uuid", _uuid)
    type_id = XPathProp("./@type", _name)
    parent = XPathProp("./@parent", _name)
    device_api = XPathProp("./@device_api", _name)


# --------------------------------------------------------------------------- data
@dataclass(frozen=True)
class GuestAddress:
    """A guest PCI address as libvirt writes it."""

    domain: int
    bus: int
    slot: int
    function: int

    def __str__(self) -> str:
        return f"{self.domain:04x}:{self.bus:02x}:{self.slot:02x}.{self.function:x}"


@dataclass(frozen=True)
class MdevHostdev:
    """One mdev the domain uses: host uuid, model, guest address and stream idstr.

    ``guest_address``/``idstr`` are ``None`` when the XML gives no PCI address (libvirt
    assigns one on define; ``virsh dumpxml`` always has it) or a bus we cannot place.
    """

    uuid: str
    model: Optional[str]
    guest_address: Optional[GuestAddress]
    idstr: Optional[str]


@dataclass(frozen=True)
class AnnotatedMdev:
    """What the source recorded about one mdev in our metadata."""

    uuid: str
    type_id: str
    parent: Optional[str] = None
    device_api: Optional[str] = None


@dataclass(frozen=True)
class Annotation:
    """Our metadata element: the source type (and parent) per mdev uuid."""

    devices: Mapping[str, AnnotatedMdev] = field(default_factory=dict)
    host: Optional[str] = None
    time: Optional[str] = None

    def get(self, uuid: str) -> Optional[AnnotatedMdev]:
        return self.devices.get(uuid.lower())


@dataclass(frozen=True)
class DomainInfo:
    name: str
    uuid: Optional[str]
    hostdevs: list[MdevHostdev]
    annotation: Optional[Annotation]

    def hostdev(self, uuid: str) -> Optional[MdevHostdev]:
        return next((h for h in self.hostdevs if h.uuid == uuid.lower()), None)


# --------------------------------------------------------------------------- parsing
def _parser() -> etree.XMLParser:
    # Domain XML reaches the hook from a migration peer: no entities, no network, no huge trees.
    return etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False,
                           remove_blank_text=False, load_dtd=False)


def parse_xml(xml: XMLInput, what: str = "domain XML") -> etree._Element:
    """Parse *xml* into an element; :class:`XMLError` (one line) if it is not XML."""
    data = xml.encode("utf-8") if isinstance(xml, str) else bytes(xml)
    if not data.strip():
        raise XMLError(f"{what} is empty")
    try:
        return etree.fromstring(data, _parser())
    except etree.XMLSyntaxError as exc:
        text = re.sub(r" \(<string>, line \d+\)$", "", str(exc))
        raise XMLError(f"{what} is not well-formed: {text}") from None


def _domain_root(xml: XMLInput) -> etree._Element:
    root = parse_xml(xml)
    if root.tag != "domain":
        raise XMLError(f"domain XML has root <{root.tag}>, expected <domain>")
    return root


def parse_domain(xml: XMLInput) -> DomainInfo:
    """The facts libvirt-mdev needs from a domain definition.

    Raises:
        XMLError: not XML, not a ``<domain>``, no ``<name>``, a malformed mdev uuid or
            address, or a malformed/duplicated libvirt-mdev metadata element.
    """
    root = _domain_root(xml)
    dom = DomainElement(root)
    name = dom.name
    if not name:
        raise XMLError("domain XML has no <name>")
    controllers = _pci_controllers(root)
    hostdevs = [_mdev_hostdev(Hostdev(n), controllers)
                for n in root.iterfind("./devices/hostdev[@type='mdev']")]
    seen: set[str] = set()
    for h in hostdevs:
        if h.uuid in seen:
            raise XMLError(f"domain {name}: mdev {h.uuid} is listed twice")
        seen.add(h.uuid)
    return DomainInfo(name=name, uuid=dom.uuid, hostdevs=hostdevs,
                      annotation=_find_annotation(root, name))


def _pci_controllers(root: etree._Element) -> dict[int, Controller]:
    out: dict[int, Controller] = {}
    for node in root.iterfind("./devices/controller[@type='pci']"):
        ctl = Controller(node)
        if ctl.index is not None:
            out[ctl.index] = ctl
    return out


def _mdev_hostdev(h: Hostdev, controllers: Mapping[int, Controller]) -> MdevHostdev:
    uuid = h.uuid
    if uuid is None:
        raise XMLError("mdev <hostdev> has no <source><address uuid=…/>")
    addr: Optional[GuestAddress] = None
    if h.has_pci:
        addr = GuestAddress(h.domain or 0, h.bus or 0, h.slot or 0, h.function or 0)
    idstr = vfio_idstr(addr, controllers) if addr is not None else None
    return MdevHostdev(uuid=uuid, model=h.model, guest_address=addr, idstr=idstr)


def vfio_idstr(addr: GuestAddress, controllers: Mapping[int, Controller]) -> Optional[str]:
    """QEMU's VFIO section idstr for a device at *addr* (FORMAT.md §5.1).

    Walks from the device's bus up to a root through the controllers; ``None`` if a
    bus on the way has no controller (user-written XML before libvirt filled it in).
    """
    levels: list[str] = []
    bus, slot, function = addr.bus, addr.slot, addr.function
    for _ in range(_MAX_BRIDGE_DEPTH):
        levels.insert(0, f"{slot:02x}.{function:x}")
        if bus == 0:
            return f"{addr.domain:04x}:00:" + ":".join(levels) + "/vfio"
        ctl = controllers.get(bus)
        if ctl is None:
            return None
        if ctl.model in _EXPANDER_MODELS:
            nr = ctl.bus_nr if ctl.bus_nr is not None else bus
            return f"{addr.domain:04x}:{nr:02x}:" + ":".join(levels) + "/vfio"
        if not ctl.has_pci or ctl.slot is None:
            return None
        bus, slot, function = ctl.bus or 0, ctl.slot, ctl.function or 0
    return None  # a cycle in the controller graph: refuse to guess


def _local(node: etree._Element) -> str:
    return etree.QName(node).localname if isinstance(node.tag, str) else ""


def _ours(node: etree._Element) -> bool:
    """A child of our element: in our namespace, or in none (libvirt's metadata() form)."""
    ns = etree.QName(node).namespace if isinstance(node.tag, str) else "?"
    return ns in (None, METADATA_NS)


def _find_annotation(root: etree._Element, domain_name: str) -> Optional[Annotation]:
    found = root.findall(f"./metadata/{{{METADATA_NS}}}{METADATA_ROOT}")
    if not found:
        return None
    if len(found) > 1:
        raise XMLError(f"domain {domain_name}: more than one libvirt-mdev metadata element")
    return annotation_from_element(found[0])


def annotation_from_element(elem: etree._Element) -> Annotation:
    """Read our element (qualified, or unqualified as ``dom.metadata()`` returns it)."""
    devices: dict[str, AnnotatedMdev] = {}
    for child in elem:
        if not _ours(child) or _local(child) != "device":
            continue
        d = AnnotatedDeviceElement(child)
        if d.uuid is None or d.type_id is None:
            raise XMLError("libvirt-mdev metadata: <device> needs uuid and type attributes")
        if d.uuid in devices:
            raise XMLError(f"libvirt-mdev metadata: mdev {d.uuid} is annotated twice")
        devices[d.uuid] = AnnotatedMdev(d.uuid, d.type_id, d.parent, d.device_api)
    return Annotation(devices=devices, host=elem.get("host"), time=elem.get("time"))


def parse_annotation(xml: XMLInput) -> Annotation:
    """Parse the string ``dom.metadata(ELEMENT, METADATA_NS)`` returns."""
    elem = parse_xml(xml, "libvirt-mdev metadata")
    if _local(elem) != METADATA_ROOT:
        raise XMLError(f"libvirt-mdev metadata has root <{_local(elem)}>, expected <{METADATA_ROOT}>")
    return annotation_from_element(elem)


# --------------------------------------------------------------------------- building
def merge_annotations(old: Optional[Annotation], new: Annotation) -> Annotation:
    """*new* wins per uuid; uuids only in *old* are kept (another host may have added them)."""
    devices = dict(old.devices) if old else {}
    devices.update(new.devices)
    return Annotation(devices=devices, host=new.host or (old.host if old else None),
                      time=new.time or (old.time if old else None))


def _build_element(annotation: Annotation, qualified: bool) -> etree._Element:
    def tag(local: str) -> str:
        return f"{{{METADATA_NS}}}{local}" if qualified else local

    nsmap = {METADATA_KEY: METADATA_NS} if qualified else None
    root = etree.Element(tag(METADATA_ROOT), nsmap=nsmap)
    for key in ("host", "time"):
        value = getattr(annotation, key)
        if value:
            root.set(key, value)
    for uuid in sorted(annotation.devices):
        dev = annotation.devices[uuid]
        child = etree.SubElement(root, tag("device"))
        child.set("uuid", dev.uuid)
        child.set("type", dev.type_id)
        if dev.parent:
            child.set("parent", dev.parent)
        if dev.device_api:
            child.set("device_api", dev.device_api)
    return root


def annotation_xml(annotation: Annotation, qualified: bool = False) -> str:
    """The element as text.  Unqualified is what ``dom.setMetadata(ELEMENT, xml,
    METADATA_KEY, METADATA_NS)`` wants (libvirt applies the namespace itself)."""
    return etree.tostring(_build_element(annotation, qualified), encoding="unicode")


def set_annotation(xml: XMLInput, annotation: Optional[Annotation]) -> bytes:
    """Domain XML with our metadata element replaced by *annotation* (``None`` removes it).

    Edited in place and serialized once: everything else — other metadata, attribute
    order, whitespace, comments — comes out as it went in (lxml writes attribute
    values in double quotes, as libvirt does).

    Raises:
        XMLError: *xml* is not a domain definition.
    """
    root = _domain_root(xml)
    meta = root.find("./metadata")
    if meta is not None:
        for old in meta.findall(f"./{{{METADATA_NS}}}{METADATA_ROOT}"):
            _remove_keep_tail(old)
        if annotation is None and len(meta) == 0 and not (meta.text or "").strip():
            _remove_keep_tail(meta)  # nothing else lived there: leave no empty <metadata>
            meta = None
    if annotation is not None:
        if meta is None:
            meta = _insert_metadata(root)
        elem = _build_element(annotation, qualified=True)
        outer = _indent(root)
        indent = outer + "  "
        if len(meta):  # the last child's tail is the whitespace before </metadata>
            elem.tail = meta[-1].tail
            meta[-1].tail = indent
        else:
            elem.tail = meta.text if meta.text and not meta.text.strip() else outer
            meta.text = indent
        for child in elem:
            child.tail = indent + "  "
        if len(elem):
            elem.text = indent + "  "
            elem[-1].tail = indent
        meta.append(elem)
    return _serialize(root, xml)


def _remove_keep_tail(node: etree._Element) -> None:
    parent = node.getparent()
    if parent is None:
        raise XMLError("cannot remove the root element")  # never: we only remove children
    prev = node.getprevious()
    if prev is not None:
        prev.tail = node.tail
    else:
        parent.text = node.tail
    parent.remove(node)


def _indent(root: etree._Element) -> str:
    """The whitespace before a child of <domain> ("\\n  " in libvirt's output)."""
    return root.text if root.text and not root.text.strip() else "\n  "


def _insert_metadata(root: etree._Element) -> etree._Element:
    """A new ``<metadata>`` after name/uuid/genid/title/description, as libvirt orders it."""
    meta = etree.Element("metadata")
    anchor = None
    for child in root:
        if _local(child) in ("name", "uuid", "genid", "title", "description"):
            anchor = child
    indent = _indent(root)
    if anchor is None:
        meta.tail = root.text
        root.text = indent
        root.insert(0, meta)
    else:
        meta.tail = anchor.tail
        anchor.tail = indent
        anchor.addnext(meta)
    meta.text = indent  # whitespace before </metadata>
    return meta


def _serialize(root: etree._Element, original: XMLInput) -> bytes:
    data = original.encode("utf-8") if isinstance(original, str) else bytes(original)
    declared = data.lstrip()[:5] == b"<?xml"
    out = etree.tostring(root.getroottree(), encoding="UTF-8", xml_declaration=declared)
    trailing = data[len(data.rstrip()):]  # lxml drops the whitespace after the root
    return out.rstrip() + trailing
