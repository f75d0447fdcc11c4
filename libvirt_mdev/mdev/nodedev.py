"""Which mdevs a (possibly remote) host has, and of which type: libvirt node devices.

The CLI (``check``, ``annotate``) talks to hosts through libvirt-python; the hook
never does (it reads sysfs, see :mod:`.sysfs`).  Node device XML for an mdev
(docs/mdev.md)::

    <device>
      <name>mdev_4b20d080_1b54_4048_85b3_a6a62d165c01_0000_af_00_0</name>
      <parent>pci_0000_af_00_0</parent>
      <capability type='mdev'><type id='nvidia-222'/><uuid>4b20d080-…</uuid>…</capability>
    </device>

Names are ``mdev_<uuid>_<parent>`` since libvirt 7.3 and ``mdev_<uuid>`` before; the
``<uuid>`` element may be absent on old libvirt, so the uuid falls back to the name.
Only the ``CAP_MDEV`` flag is passed to ``listAllDevices``: the test driver rejects any
other flag (docs/mdev.md).

Also here: opening a connection and looking up a domain with our one-line errors
(libvirt's default handler, which prints to stderr, is silenced once).
"""
from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import libvirt

from ..errors import ConnectError, MdevError, NotFound, XMLError
from .domain import parse_xml
from .names import is_name, is_uuid
from .sysfs import hex_id

_NAME_UUID_RE = re.compile(r"^mdev_([0-9a-fA-F]{8}(?:_[0-9a-fA-F]{4}){3}_[0-9a-fA-F]{12})(?:_(.+))?$")
_PCI_NAME_RE = re.compile(r"^pci_([0-9a-f]{4})_([0-9a-f]{2})_([0-9a-f]{2})_([0-9a-f])$")


@dataclass(frozen=True)
class NodedevMdev:
    """An mdev as a host's libvirt reports it."""

    uuid: str
    type_id: str
    #: parent device address (``0000:af:00.0``) or libvirt's parent name if not PCI
    parent: str | None
    #: libvirt node device name
    name: str
    active: bool = True


def _silence_default_handler() -> None:
    # Without this libvirt prints every error to stderr ("libvirt: XML Util error : …")
    # on top of the one line we print ourselves.
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)


_silence_default_handler()


def _msg(exc: libvirt.libvirtError) -> str:
    return " ".join((exc.get_error_message() or str(exc)).split())


def open_connection(uri: str, readonly: bool = False) -> libvirt.virConnect:
    """Open *uri*.  Raises :class:`ConnectError` (exit 5) with libvirt's reason."""
    if uri.startswith("test:///") and uri != "test:///default" and not os.path.isfile(uri[7:]):
        # libxml2 inside libvirt would print its own "I/O warning" line on top of ours
        raise ConnectError(f"cannot connect to {uri}: test-driver host file {uri[7:]} does not exist "
                           f"(test:/// URIs need an absolute path)", uri=uri)
    try:
        conn = libvirt.openReadOnly(uri) if readonly else libvirt.open(uri)
    except libvirt.libvirtError as exc:
        raise ConnectError(f"cannot connect to {uri}: {_msg(exc)}; check the URI and that "
                           f"libvirtd runs there", uri=uri) from None
    if conn is None:  # pragma: no cover - old bindings returned None
        raise ConnectError(f"cannot connect to {uri}", uri=uri)
    return conn


def lookup_domain(conn: libvirt.virConnect, name: str) -> libvirt.virDomain:
    """The domain *name* (or uuid).  Raises :class:`NotFound` (exit 12)."""
    try:
        if is_uuid(name.lower()):
            return conn.lookupByUUIDString(name)
        return conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            raise NotFound(f"domain {name} not found on {conn.getURI()}; "
                           f"list domains with: virsh -c {conn.getURI()} list --all",
                           domain=name) from None
        raise ConnectError(f"cannot look up domain {name} on {conn.getURI()}: {_msg(exc)}") from None


def domain_xml(dom: libvirt.virDomain, flags: int = 0) -> str:
    """``dom.XMLDesc(flags)`` with our errors (no secure flags: read-only connections
    may not ask for them, and we need no secrets)."""
    try:
        return str(dom.XMLDesc(flags))
    except libvirt.libvirtError as exc:
        raise ConnectError(f"cannot read the definition of domain {dom.name()}: {_msg(exc)}") from None


def parse_nodedev_mdev(xml: str, active: bool = True) -> NodedevMdev | None:
    """The mdev described by node device *xml*, or ``None`` if it is not an mdev.

    Raises:
        XMLError: malformed XML, or an mdev capability without a usable type/uuid.
    """
    root = parse_xml(xml, "node device XML")
    name = (root.findtext("./name") or "").strip()
    cap = root.find("./capability[@type='mdev']")
    if cap is None:
        return None
    type_el = cap.find("./type")
    type_id = type_el.get("id") if type_el is not None else None
    if not type_id or not is_name(type_id):
        raise XMLError(f"node device {name}: mdev capability without a valid <type id=…/>")
    uuid = (cap.findtext("./uuid") or "").strip().lower()
    m = _NAME_UUID_RE.match(name)
    if not uuid and m:
        uuid = m.group(1).replace("_", "-").lower()
    if not is_uuid(uuid):
        raise XMLError(f"node device {name}: cannot tell the mdev uuid")
    parent_addr = (cap.findtext("./parent_addr") or "").strip() or None
    parent_name = (root.findtext("./parent") or "").strip() or None
    return NodedevMdev(uuid=uuid, type_id=type_id, parent=parent_addr or _parent_address(parent_name),
                       name=name, active=active)


def _parent_address(parent_name: str | None) -> str | None:
    """``pci_0000_af_00_0`` → ``0000:af:00.0`` (the form sysfs and mdevctl use)."""
    if not parent_name:
        return None
    m = _PCI_NAME_RE.match(parent_name)
    if m:
        return f"{m.group(1)}:{m.group(2)}:{m.group(3)}.{m.group(4)}"
    return parent_name


def _node_devices(conn: libvirt.virConnect, cap_flag: int) -> Iterator[tuple[Any, str]]:
    """(node device, its XML) for every node device of *conn* with capability *cap_flag*.

    Raises:
        ConnectError: libvirt failed to list the devices or to read one's XML.
    """
    try:
        devs = conn.listAllDevices(cap_flag)
    except libvirt.libvirtError as exc:
        raise ConnectError(f"cannot list node devices on {conn.getURI()}: {_msg(exc)}") from None
    for dev in devs:
        try:
            xml = dev.XMLDesc(0)
        except libvirt.libvirtError as exc:
            raise ConnectError(f"cannot read node device {dev.name()}: {_msg(exc)}") from None
        yield dev, xml


def list_mdevs(conn: libvirt.virConnect) -> dict[str, list[NodedevMdev]]:
    """Every mdev node device of *conn*, by uuid (one uuid may sit under several parents).

    Raises:
        ConnectError: libvirt failed to list node devices.
        XMLError: a node device's XML is malformed.
    """
    out: dict[str, list[NodedevMdev]] = {}
    for dev, xml in _node_devices(conn, libvirt.VIR_CONNECT_LIST_NODE_DEVICES_CAP_MDEV):
        mdev = parse_nodedev_mdev(xml, active=_is_active(dev))
        if mdev is not None:
            out.setdefault(mdev.uuid, []).append(mdev)
    return out


def _is_active(dev: Any) -> bool:
    """Defined-but-not-started mdevs (mdevctl "defined") cannot receive state."""
    try:
        return bool(dev.isActive())
    except (libvirt.libvirtError, AttributeError):
        return True  # older libvirt lists only active devices


def find_mdev(mdevs: dict[str, list[NodedevMdev]], uuid: str, host: str,
              include_inactive: bool = False) -> NodedevMdev | None:
    """The active mdev *uuid* in a :func:`list_mdevs` result, or ``None``.

    With *include_inactive*, a defined-only mdev counts too (``annotate`` of a shut-off
    domain: the definition still names the type).

    Raises:
        MdevError: the uuid is active under two parents with different types (ambiguous;
            refuse rather than pick one).
    """
    cands = [m for m in mdevs.get(uuid.lower(), []) if m.active or include_inactive]
    if len({m.type_id for m in cands}) > 1:
        raise MdevError(f"mdev {uuid} is active more than once on {host} with different types "
                        f"({', '.join(sorted(m.type_id for m in cands))}); remove the stale one with mdevctl")
    return cands[0] if cands else None


@dataclass(frozen=True)
class NodedevParent:
    """A device that can host mdevs, as libvirt reports it (``mdev_types`` capability)."""

    name: str
    #: PCI address (``0000:3b:00.0``) or libvirt's name if not PCI
    address: str
    #: PCI ``vendor:device`` (``10de:1eb8``), the policy's parent model
    model: str | None
    driver: str | None
    #: type id -> available_instances (``None`` when libvirt does not say)
    available: dict[str, int | None]


def parse_nodedev_parent(xml: str) -> NodedevParent | None:
    """The mdev parent described by node device *xml*, or ``None`` if it offers no mdev types.

    Raises:
        XMLError: malformed XML.
    """
    root = parse_xml(xml, "node device XML")
    name = (root.findtext("./name") or "").strip()
    types = root.find(".//capability[@type='mdev_types']")
    if types is None:
        return None
    available: dict[str, int | None] = {}
    for t in types.iterfind("./type"):
        tid = t.get("id") or ""
        if not is_name(tid):
            raise XMLError(f"node device {name}: mdev type without a valid id")
        text = (t.findtext("./availableInstances") or "").strip()
        available[tid] = int(text) if text.isdigit() else None
    vendor = root.find("./capability[@type='pci']/vendor")
    product = root.find("./capability[@type='pci']/product")
    model = None
    if vendor is not None and product is not None and vendor.get("id") and product.get("id"):
        model = f"{hex_id(vendor.get('id') or '')}:{hex_id(product.get('id') or '')}"
    driver = (root.findtext("./driver/name") or "").strip() or None
    return NodedevParent(name=name, address=_parent_address(name) or name, model=model, driver=driver,
                         available=available)


def list_parents(conn: libvirt.virConnect) -> dict[str, NodedevParent]:
    """Every mdev parent of *conn*, by address (``CAP_MDEV_TYPES``: the test driver takes it).

    Raises:
        ConnectError: libvirt failed to list node devices.
        XMLError: a node device's XML is malformed.
    """
    out: dict[str, NodedevParent] = {}
    for _dev, xml in _node_devices(conn, libvirt.VIR_CONNECT_LIST_NODE_DEVICES_CAP_MDEV_TYPES):
        parent = parse_nodedev_parent(xml)
        if parent is not None:
            out[parent.address] = parent
    return out


def mdevs_in_use(conn: libvirt.virConnect) -> dict[str, str]:
    """mdev uuid -> name of the domain (running or defined) on *conn* whose XML names it.

    An mdev a defined domain names is not free for another guest, even while that
    domain is shut off.

    Raises:
        ConnectError: libvirt failed to list domains or read one.
    """
    from .domain import parse_domain  # lxml: only the CLI gets here

    try:
        doms = conn.listAllDomains(0)
    except libvirt.libvirtError as exc:
        raise ConnectError(f"cannot list domains on {conn.getURI()}: {_msg(exc)}") from None
    out: dict[str, str] = {}
    for dom in doms:
        try:
            info = parse_domain(domain_xml(dom))
        except XMLError:
            continue  # a domain we cannot read names no mdev we could offer with confidence
        for h in info.hostdevs:
            out.setdefault(h.uuid, info.name)
    return out
