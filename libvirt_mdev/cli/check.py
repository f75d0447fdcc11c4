"""``libvirt-mdev check DOMAIN --connect SRC --dest DST``: would this migration be allowed?

The operator's dry run (DESIGN §6).  It applies the same rule as the destination's
hook (:func:`libvirt_mdev.mdev.types.compare`) but reads the destination's mdevs
through libvirt node devices instead of sysfs, so it works from any machine that can
reach both hosts.  Nothing is changed on either host.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional
from urllib.parse import urlsplit

import click

from ..mdev.domain import DomainInfo, parse_domain
from ..mdev.nodedev import NodedevMdev, domain_xml, find_mdev, list_mdevs, lookup_domain, open_connection
from ..mdev.types import CheckResult, DestMdev, DeviceCheck, Verdict, compare
from .context import AppContext, pass_app

HELP = """Dry run: would migrating DOMAIN from SRC to DEST be allowed?

\b
For every mdev hostdev of DOMAIN (as defined on SRC) it shows the guest
address, the source type recorded by `libvirt-mdev annotate`, the type the
mdev with the same uuid has on DEST, and the verdict the destination's hook
would reach:
  match            same type: allowed
  type-mismatch    DEST has the mdev with another type: refused (exit 6)
  missing-on-dest  DEST has no active mdev with that uuid: refused (exit 7)
  not-annotated    no source type recorded: refused when require_annotation
                   is on (default) (exit 8); run `libvirt-mdev annotate`
A domain without mdevs is allowed (verdict no-mdev).  Exit 0 only when the
migration would be allowed; 5 when a host cannot be reached, 12 when DOMAIN
does not exist on SRC, 10 when its XML or our metadata is malformed.
require_annotation is read from this machine's configuration file (the
destination's hook uses the destination's).  When DEST is this machine
(qemu:///...), the trusted store is checked too (shown, not part of the
verdict).

\b
Example (the bundled example hosts):
  libvirt-mdev check demo \\
    --connect test:///$PWD/examples/hosts/source.xml \\
    --dest test:///$PWD/examples/hosts/dest.xml
"""


@click.command("check", help=HELP)
@click.argument("domain")
@click.option("--connect", "-c", "src_uri", required=True, metavar="SRC",
              help="libvirt URI of the source host (where DOMAIN runs or is defined).")
@click.option("--dest", "-d", "dest_uri", required=True, metavar="DEST",
              help="libvirt URI of the destination host.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")
@pass_app
def check(app: AppContext, domain: str, src_uri: str, dest_uri: str, as_json: bool) -> None:
    require = app.config.require_annotation
    src = open_connection(src_uri, readonly=True)
    dest = open_connection(dest_uri, readonly=True)
    dom = lookup_domain(src, domain)
    info = parse_domain(domain_xml(dom))
    dest_mdevs = list_mdevs(dest) if info.hostdevs else {}
    src_mdevs = list_mdevs(src) if info.hostdevs else {}

    def lookup(uuid: str) -> Optional[DestMdev]:
        m = find_mdev(dest_mdevs, uuid, dest_uri)
        return DestMdev(m.type_id, m.parent) if m else None

    result = compare(info, lookup, require_annotation=require)
    live = {h.uuid: find_mdev(src_mdevs, h.uuid, src_uri) for h in info.hostdevs}
    notes = _notes(result, live)
    store = store_readiness(dest_uri, app.config.store)
    if store["ready"] is False:
        notes.append(f"the destination store is not usable: {store['detail']}")
    if as_json:
        app.emit_json(to_json(result, info, live, store, notes, src_uri, dest_uri))
    else:
        click.echo(render_table(result, info, store, notes, src_uri, dest_uri))
    click.get_current_context().exit(result.exit_code)


def store_readiness(dest_uri: str, root: Path) -> dict[str, Any]:
    """Whether the destination's trusted store can be opened — knowable only when the
    destination is this machine (``qemu:///…`` without a host); ``ready`` is ``None``
    otherwise.  Informative: the verdict and exit code do not depend on it."""
    parts = urlsplit(dest_uri)
    driver, _, transport = parts.scheme.partition("+")
    if driver != "qemu" or parts.hostname or transport not in ("", "unix"):
        return {"ready": None, "detail": f"not known from here; on the destination run: "
                                         f"libvirt-mdev store verify"}
    from ..errors import StoreError
    from ..store.store import Store

    try:
        Store.open(root).close()
    except StoreError as exc:
        return {"ready": False, "detail": exc.message}
    return {"ready": True, "detail": f"{root} is owned by root with mode 0700"}


def _notes(result: CheckResult, live: dict[str, Optional[NodedevMdev]]) -> list[str]:
    """Warnings that do not change the verdict but an operator should see."""
    out: list[str] = []
    for d in result.devices:
        m = live.get(d.uuid)
        if d.source_type and m is not None and m.type_id != d.source_type:
            out.append(f"mdev {d.uuid}: annotated type {d.source_type} but the source now has "
                       f"{m.type_id}; re-run libvirt-mdev annotate")
        if d.verdict is Verdict.NOT_ANNOTATED and m is not None:
            out.append(f"mdev {d.uuid}: the source has type {m.type_id} but it is not recorded; "
                       f"run libvirt-mdev annotate {result.domain} --connect SRC")
    if not result.require_annotation and any(d.verdict is Verdict.NOT_ANNOTATED for d in result.devices):
        out.append("require_annotation is off: unannotated mdevs are not checked")
    return out


def to_json(result: CheckResult, info: DomainInfo, live: dict[str, Optional[NodedevMdev]],
            store: dict[str, Any], notes: list[str], src_uri: str, dest_uri: str) -> dict[str, Any]:
    devices = []
    for d in result.devices:
        row = d.to_json()
        m = live.get(d.uuid)
        row["source_live_type"] = m.type_id if m else None
        devices.append(row)
    ann = info.annotation
    refusal = result.first_refusal()
    return {"domain": result.domain, "domain_uuid": result.domain_uuid,
            "source": src_uri, "dest": dest_uri,
            "allowed": result.allowed, "verdict": result.verdict.value, "exit_code": result.exit_code,
            "annotated": result.annotated,
            "annotation_host": ann.host if ann else None,
            "require_annotation": result.require_annotation,
            "devices": devices, "store": store, "notes": notes,
            "reason": refusal.reason(dest_uri) if refusal else None}


_COLUMNS = ("MDEV UUID", "GUEST ADDR", "SOURCE TYPE", "DEST TYPE", "ON DEST", "VERDICT")


def _row(d: DeviceCheck) -> tuple[str, ...]:
    return (d.uuid, d.guest_address or "-", d.source_type or "(none)", d.dest_type or "-",
            "yes" if d.present else "no", d.verdict.value)


def render_table(result: CheckResult, info: DomainInfo, store: dict[str, Any], notes: list[str],
                 src_uri: str, dest_uri: str) -> str:
    ann = info.annotation
    lines = [f"domain:    {result.domain}" + (f" ({result.domain_uuid})" if result.domain_uuid else ""),
             f"source:    {src_uri}", f"dest:      {dest_uri}",
             "annotated: " + (f"yes (by {ann.host})" if ann and ann.host else "yes" if ann else "no"), ""]
    if result.devices:
        rows = [_COLUMNS] + [_row(d) for d in result.devices]
        widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    else:
        lines.append("no mdev hostdevs: nothing to check (verdict no-mdev)")
    lines.append("")
    lines.append(f"dest store: {'ready' if store['ready'] else 'not ready' if store['ready'] is False else 'unknown'}"
                 f" ({store['detail']})")
    lines += [f"note: {n}" for n in notes]
    refusal = result.first_refusal()
    if result.allowed:
        lines.append(f"result: allowed ({result.verdict.value})")
    else:
        lines.append(f"result: refused ({result.verdict.value}, exit {result.exit_code}): "
                     f"{refusal.reason('the destination') if refusal else ''}")
    return "\n".join(lines)
