"""``libvirt-mdev annotate DOMAIN``: record the source mdev types in the domain's metadata.

Why: the destination's hook must know which type each mdev had on the source, and
it may not ask libvirt (deadlock, docs/hook.md).  Metadata travels inside the
migration XML and the save image, so the hook reads it from stdin.  Written with
``virDomainSetMetadata`` into the persistent definition and, when the domain runs,
into the live one (the live copy is what a migration sends).
"""
from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click
import libvirt

from ..errors import ConnectError, MdevMissing, UsageError
from ..mdev.domain import METADATA_KEY, METADATA_NS, AnnotatedMdev, Annotation, DomainInfo, annotation_xml, parse_domain
from ..mdev.names import is_name, is_uuid
from ..mdev.nodedev import (
    NodedevMdev,
    NodedevParent,
    domain_xml,
    find_mdev,
    list_mdevs,
    list_parents,
    lookup_domain,
    open_connection,
)
from ..mdev.sysfs import SysfsEnv
from .context import AppContext, pass_app

HELP = """Record DOMAIN's source mdev types in its metadata.

\b
Run on the source host (or with --connect SRC) before migrating or saving.
For each mdev hostdev it records, under the device's guest PCI address
(what a migration cannot change, whatever mdev uuid the destination uses):
the type, parent, parent model (PCI vendor:device) and, read from this
host's sysfs, the vendor driver and its module version.  They go into the
domain's <metadata> element (namespace urn:libvirt-mdev:metadata:1), in the
persistent definition and, when the domain runs, in the live one.  The
destination's hook compares these with its own mdevs (and, if configured,
the driver version and parent model rules) and refuses on mismatch.

\b
An mdev that is not active on this host (a shut-off domain whose mdev is
not created) can be given explicitly: --type UUID=TYPE (repeatable).
Exit 0 on success, 7 if an mdev's type cannot be found, 5 / 12 when the
host or the domain cannot be reached.
"""


@click.command("annotate", help=HELP)
@click.argument("domain")
@click.option("--connect", "-c", "uri", default=None, metavar="URI",
              help="libvirt URI of the source host (default: libvirt's default URI).")
@click.option("--type", "-t", "overrides", multiple=True, metavar="UUID=TYPE",
              help="Use TYPE for mdev UUID instead of asking the host (repeatable).")
@click.option("--sysfs-root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="sysfs of the source host, for the vendor driver version (default: the configured "
                   "sysfs_root; read only when URI names this machine).")
@click.option("--json", "as_json", is_flag=True, help="Print what was written as JSON on stdout.")
@pass_app
def annotate(app: AppContext, domain: str, uri: str | None, overrides: tuple[str, ...],
             sysfs_root: Path | None, as_json: bool) -> None:
    sysfs = None
    if _is_local(uri):
        sysfs = SysfsEnv(sysfs_root if sysfs_root is not None else app.config.sysfs_root)
    out = annotate_domain(_open(uri), domain, _parse_overrides(overrides), sysfs)
    if as_json:
        app.emit_json(out)
    else:
        click.echo(_render(out))


def _is_local(uri: str | None) -> bool:
    """Whether *uri* names this machine, so its sysfs describes the source's devices."""
    return uri is None or not urlsplit(uri).hostname


def annotate_domain(conn: libvirt.virConnect, domain: str,
                    given: dict[str, AnnotatedMdev] | None = None,
                    sysfs: SysfsEnv | None = None) -> dict[str, Any]:
    """Write the annotation of *domain* on *conn*; returns what was written (the JSON).

    A function of its own so tests can run it on one test-driver connection (each
    test:/// connection gets a fresh copy of the host file) and read the result back.
    *sysfs* is the source host's sysfs (vendor driver versions), ``None`` when the
    connection is remote.
    """
    given = given or {}
    dom = lookup_domain(conn, domain)
    defs: list[tuple[str, int, DomainInfo]] = []
    if dom.isActive():
        defs.append(("live", libvirt.VIR_DOMAIN_AFFECT_LIVE, parse_domain(domain_xml(dom))))
    if dom.isPersistent():
        defs.append(("config", libvirt.VIR_DOMAIN_AFFECT_CONFIG,
                     parse_domain(domain_xml(dom, libvirt.VIR_DOMAIN_XML_INACTIVE))))
    uuids = sorted({h.uuid for _, _, info in defs for h in info.hostdevs})
    host_mdevs = list_mdevs(conn) if len(given) < len(uuids) else {}
    parents = list_parents(conn) if uuids else {}
    host = _hostname(conn)
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    resolved = {u: _resolve(u, given, host_mdevs, host, parents, sysfs) for u in uuids}
    addresses = {h.uuid: h.address for _, _, info in defs for h in info.hostdevs}
    written: list[str] = []
    for label, flag, info in defs:
        if not info.hostdevs:
            continue
        ann = Annotation({h.uuid: dataclasses.replace(resolved[h.uuid], guest_address=h.address)
                          for h in info.hostdevs}, host=host, time=now)
        _set_metadata(dom, ann, flag, label)
        written.append(label)
    return {"domain": dom.name(), "uuid": dom.UUIDString(), "written": written,
            "devices": [_dev_json(dataclasses.replace(resolved[u], guest_address=addresses.get(u)), u in given)
                        for u in uuids]}


def _parse_overrides(items: tuple[str, ...]) -> dict[str, AnnotatedMdev]:
    out: dict[str, AnnotatedMdev] = {}
    for item in items:
        uuid, sep, type_id = item.partition("=")
        uuid = uuid.strip().lower()
        if not sep or not is_uuid(uuid) or not is_name(type_id.strip()):
            raise UsageError(f"--type {item!r}: expected UUID=TYPE, e.g. "
                             f"4b20d080-1b54-4048-85b3-a6a62d165c01=nvidia-222")
        out[uuid] = AnnotatedMdev(uuid, type_id.strip())
    return out


def _open(uri: str | None) -> libvirt.virConnect:
    if uri:
        return open_connection(uri)
    try:
        return libvirt.open(None)
    except libvirt.libvirtError as exc:
        raise ConnectError(f"cannot connect to libvirt's default URI: {exc.get_error_message()}; "
                           f"pass --connect URI") from None


def _hostname(conn: libvirt.virConnect) -> str | None:
    try:
        name = conn.getHostname()
    except libvirt.libvirtError:
        return None
    return name if name and is_name(name) else None


def _resolve(uuid: str, given: dict[str, AnnotatedMdev], host_mdevs: dict[str, list[NodedevMdev]],
             host: str | None, parents: dict[str, NodedevParent], sysfs: SysfsEnv | None) -> AnnotatedMdev:
    if uuid in given:
        return given[uuid]
    m = find_mdev(host_mdevs, uuid, host or "this host", include_inactive=True)
    if m is None:
        raise MdevMissing(f"mdev {uuid} is not a node device on {host or 'this host'}, so its type "
                          f"is unknown; create it (mdevctl) or pass --type {uuid}=TYPE", mdev=uuid)
    parent = m.parent if m.parent and is_name(m.parent) else None
    p = parents.get(parent or "")
    driver, version, model = (p.driver, None, p.model) if p else (None, None, None)
    if sysfs is not None and parent:
        facts = sysfs.parent(parent)
        driver, version, model = facts.driver or driver, facts.driver_version, facts.model or model
    return AnnotatedMdev(uuid, m.type_id, parent, None, driver=driver, driver_version=version, parent_model=model)


def _set_metadata(dom: libvirt.virDomain, ann: Annotation, flag: int, label: str) -> None:
    try:
        dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, annotation_xml(ann),
                        METADATA_KEY, METADATA_NS, flag)
    except libvirt.libvirtError as exc:
        raise ConnectError(f"cannot write the {label} metadata of domain {dom.name()}: "
                           f"{' '.join(str(exc.get_error_message()).split())}") from None


def _dev_json(m: AnnotatedMdev, explicit: bool) -> dict[str, Any]:
    return {"uuid": m.uuid, "type": m.type_id, "parent": m.parent, "address": m.guest_address,
            "parent_model": m.parent_model, "driver": m.driver, "driver_version": m.driver_version,
            "from": "--type" if explicit else "nodedev"}


def _render(out: dict[str, Any]) -> str:
    if not out["devices"]:
        return f"domain {out['domain']} has no mdev hostdevs: nothing to annotate"
    lines = [(f"annotated domain {out['domain']} ({', '.join(out['written'])} definition"
             f"{'s' if len(out['written']) > 1 else ''}):")]
    for d in out["devices"]:
        lines.append(f"  {d['address'] or '-'}  {d['uuid']}  type {d['type']}"
                     + (f"  parent {d['parent']}" if d["parent"] else "")
                     + (f"  driver {d['driver'] or '?'} {d['driver_version']}" if d["driver_version"] else "")
                     + ("  (given with --type)" if d["from"] == "--type" else ""))
    return "\n".join(lines)
