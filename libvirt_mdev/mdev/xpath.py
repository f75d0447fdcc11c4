"""The XPath layer: declared, read-only XML properties and a hardened parser.

Readers are declared as XPaths on one small class per element (virt-manager's
``XMLProperty`` idea), so every XPath lives in one place and a test can check that
each declared one is read (``XPathProp.registry``).  Every parse error is an
:class:`~libvirt_mdev.errors.XMLError` (one line).

Only this module, :mod:`.topology`, :mod:`.annotation`, :mod:`.domain` and
:mod:`.metadata_edit` import lxml; the hook's no-op path imports none of them.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, ClassVar, Generic, TypeVar, overload

from lxml import etree

from ..errors import XMLError
from .names import is_name, is_uuid

XMLInput = bytes | str
T = TypeVar("T")


class XPathProp(Generic[T]):
    """A read-only attribute: the first result of *xpath* on the element, converted.

    Missing → ``None``; a value the converter rejects → :class:`XMLError` naming the
    element and the value.
    """

    #: every property declared, so a test can check each one is exercised
    registry: ClassVar[list[XPathProp[Any]]] = []

    def __init__(self, xpath: str, conv: Callable[[str], T] | None = None) -> None:
        self.xpath = xpath
        self.conv = conv
        self.name = xpath
        self.owner = ""
        self._compiled = etree.XPath(xpath, smart_strings=False)
        XPathProp.registry.append(self)

    def __set_name__(self, owner: type, name: str) -> None:
        self.name, self.owner = name, owner.__name__

    @overload
    def __get__(self, obj: None, objtype: Any = None) -> XPathProp[T]: ...
    @overload
    def __get__(self, obj: XMLElement, objtype: Any = None) -> T | None: ...

    def __get__(self, obj: XMLElement | None, objtype: Any = None) -> Any:
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


# --------------------------------------------------------------------------- converters
def pci_int(text: str) -> int:
    """libvirt writes address parts as ``0x05`` (and accepts ``5``)."""
    return int(text, 0)


def uuid_value(text: str) -> str:
    low = text.lower()
    if not is_uuid(low):
        raise ValueError(text)
    return low


def name_value(text: str) -> str:
    if not is_name(text):
        raise ValueError(text)
    return text


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


def local_name(node: etree._Element) -> str:
    return etree.QName(node).localname if isinstance(node.tag, str) else ""
