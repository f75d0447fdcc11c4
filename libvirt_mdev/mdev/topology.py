"""Guest PCI topology → QEMU's VFIO section idstr.

The guest PCI address is what survives a migration: libvirt's ABI-stability check
forbids a hook or a destination XML to change it, while the host mdev uuid may be
rewritten freely (docs/orchestrators.md).  It also names the device's section in the
stream: ``<root bus path>`` then ``:SS.F`` per level from the root to the device,
then ``/vfio`` — ``0000:00:05.0/vfio`` on the root bus, ``0000:00:02.0:00.0/vfio``
behind a root port at 02.0.  Bridges are found through the domain's
``<controller type='pci' index=N>`` elements (bus N is that controller's secondary
bus); a pci/pcie expander bus starts a new root ``DDDD:<busNr>``.
"""
from __future__ import annotations

from collections.abc import Mapping

from lxml import etree

from .model import GuestAddress
from .xpath import XMLElement, XPathProp, pci_int

#: a pci/pcie expander bus starts a new PCI root whose number is its ``<target busNr>``
_EXPANDER_MODELS = frozenset({"pci-expander-bus", "pcie-expander-bus"})
_MAX_BRIDGE_DEPTH = 32


class PciAddressElement(XMLElement):
    domain = XPathProp("./address[@type='pci']/@domain", pci_int)
    bus = XPathProp("./address[@type='pci']/@bus", pci_int)
    slot = XPathProp("./address[@type='pci']/@slot", pci_int)
    function = XPathProp("./address[@type='pci']/@function", pci_int)
    has_pci = XPathProp[bool]("boolean(./address[@type='pci'])")


class Controller(PciAddressElement):
    """``<controller type='pci'>``: its index is the number of the bus it provides."""

    XML_NAME = "controller"
    index = XPathProp("./@index", pci_int)
    model = XPathProp[str]("./@model")
    bus_nr = XPathProp("./target/@busNr", pci_int)


def guest_address_value(text: str) -> str:
    """Converter for annotation attributes: a canonical guest address string."""
    return str(GuestAddress.parse(text))


def element_address(elem: PciAddressElement) -> GuestAddress | None:
    if not elem.has_pci:
        return None
    return GuestAddress(elem.domain or 0, elem.bus or 0, elem.slot or 0, elem.function or 0)


def pci_controllers(root: etree._Element) -> dict[int, Controller]:
    out: dict[int, Controller] = {}
    for node in root.iterfind("./devices/controller[@type='pci']"):
        ctl = Controller(node)
        if ctl.index is not None:
            out[ctl.index] = ctl
    return out


def vfio_idstr(addr: GuestAddress, controllers: Mapping[int, Controller]) -> str | None:
    """QEMU's VFIO section idstr for a device at *addr*.

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
