"""Editing our ``<metadata>`` element: build it, merge it, put it into domain XML.

Edits are made in place and serialized once, so everything else in a definition —
other metadata, attribute order, whitespace, comments — comes out as it went in.
"""
from __future__ import annotations

from lxml import etree

from ..errors import XMLError
from .annotation import METADATA_KEY, METADATA_NS, METADATA_ROOT
from .model import Annotation
from .xpath import XMLInput, local_name, parse_xml

#: attribute name in the XML -> AnnotatedMdev field, in the order they are written
_DEVICE_ATTRS = (("address", "guest_address"), ("uuid", "uuid"), ("type", "type_id"), ("parent", "parent"),
                 ("device_api", "device_api"), ("driver", "driver"), ("driver_version", "driver_version"),
                 ("parent_model", "parent_model"))


def _domain_root(xml: XMLInput) -> etree._Element:
    root = parse_xml(xml)
    if root.tag != "domain":
        raise XMLError(f"domain XML has root <{root.tag}>, expected <domain>")
    return root


def merge_annotations(old: Annotation | None, new: Annotation) -> Annotation:
    """*new* wins per uuid and per guest address; the rest of *old* is kept (another
    host may have added it).  An old entry for an address *new* describes is dropped:
    two entries for one address would make the binding ambiguous."""
    taken = {d.guest_address for d in new.devices.values() if d.guest_address}
    devices = {u: d for u, d in (old.devices.items() if old else ()) if d.guest_address not in taken}
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
        for attr, fieldname in _DEVICE_ATTRS:
            value = getattr(dev, fieldname)
            if value:
                child.set(attr, value)
    return root


def annotation_xml(annotation: Annotation, qualified: bool = False) -> str:
    """The element as text.  Unqualified is what ``dom.setMetadata(ELEMENT, xml,
    METADATA_KEY, METADATA_NS)`` wants (libvirt applies the namespace itself)."""
    return str(etree.tostring(_build_element(annotation, qualified), encoding="unicode"))


def set_annotation(xml: XMLInput, annotation: Annotation | None) -> bytes:
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
        if local_name(child) in ("name", "uuid", "genid", "title", "description"):
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
    out = bytes(etree.tostring(root.getroottree(), encoding="UTF-8", xml_declaration=declared))
    trailing = data[len(data.rstrip()):]  # lxml drops the whitespace after the root
    return out.rstrip() + trailing
