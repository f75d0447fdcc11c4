"""``libvirt-mdev check DOMAIN --connect SRC --dest DST``: would this migration be allowed?

The operator's and the orchestrator's dry run (docs/check.md).  It applies the same
rule as the destination's hook (:func:`libvirt_mdev.mdev.types.compare`, reached
through :mod:`libvirt_mdev.mdev.dryrun`) but reads the destination's mdevs through
libvirt node devices instead of sysfs, so it works from any machine that can reach
both hosts.  Nothing is changed on either host.  With several ``--dest`` it is the
placement query (:mod:`libvirt_mdev.cli.place`).
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import click

from ..errors import UsageError
from ..mdev.dryrun import DestReport, DeviceReport, SourceView, evaluate, read_dest, read_source
from ..mdev.policy import DriverVersionRule, MatchPolicy
from ..mdev.sysfs import SysfsEnv
from .context import AppContext, pass_app

SCHEMA = "libvirt-mdev/check/2"

HELP = """Dry run: would migrating DOMAIN from SRC to DEST be allowed?

\b
For every mdev hostdev of DOMAIN it shows the guest address, the mdev the
destination would use, the type the source really has now (SRC's node
devices), the type recorded by `libvirt-mdev annotate`, the destination's
type, and the verdict that would really decide:
  match            allowed
  type-mismatch    DEST's mdev has another type: refused (exit 6)
  driver-mismatch  vendor driver version rule fails (exit 6)
  parent-mismatch  parent device model rule fails (exit 6)
  missing-on-dest  DEST has no active mdev with that uuid: refused (exit 7)
  not-annotated    no source type recorded: refused when require_annotation
                   is on (default) (exit 8); run `libvirt-mdev annotate`
A mismatch or a missing mdev is reported even when the annotation is also
missing (both facts are listed; the exit code is the most serious).  A
domain without mdevs is allowed (verdict no-mdev).

\b
Orchestrators that give the guest another mdev on DEST (OpenStack Nova,
KubeVirt): --dest-xml FILE checks the destination XML you will pass to
libvirt (devices are paired by guest PCI address).  When DEST has no usable
mdev, the free mdevs of the source's type on DEST and the parents'
available_instances are listed (what to remap to, or create with mdevctl).

\b
Several --dest: ask them all at once (placement, same as `libvirt-mdev place`).
Exit 0 only when the migration would be allowed; 5 when a host cannot be
reached, 12 when DOMAIN does not exist on SRC, 10 when an XML is malformed.
require_annotation and the match_* policy are read from this machine's
configuration file (the destination's hook uses the destination's).
JSON schema: docs/check.md.

\b
Example (the bundled example hosts):
  libvirt-mdev check demo \\
    --connect test:///$PWD/examples/hosts/source.xml \\
    --dest test:///$PWD/examples/hosts/dest.xml
"""


def policy_options(f: Any) -> Any:
    f = click.option("--match-parent-model/--no-match-parent-model", "match_parent_model", default=None,
                     help="Require the same parent device model (default: config match_parent_model).")(f)
    f = click.option("--match-driver-version", "match_driver_version", default=None,
                     type=click.Choice([r.value for r in DriverVersionRule]),
                     help="Vendor driver version rule (default: config match_driver_version, else off).")(f)
    f = click.option("--dest-sysfs", "dest_sysfs", type=click.Path(file_okay=False, exists=True, path_type=Path),
                     default=None, help="The destination's sysfs (running on the destination: /sys): adds the "
                                        "vendor driver version, which libvirt does not report.")(f)
    return f


def dryrun_options(dest_help: str, dest_xml_help: str) -> Callable[[Any], Any]:
    """The options ``check`` and ``place`` share: source, destinations, destination XML, policy, --json."""
    def apply(f: Any) -> Any:
        f = click.option("--json", "as_json", is_flag=True,
                         help="Print the result as JSON on stdout (docs/check.md).")(f)
        f = policy_options(f)
        f = click.option("--dest-xml", "dest_xml", type=click.Path(dir_okay=False, exists=True, path_type=Path),
                         default=None, help=dest_xml_help)(f)
        f = click.option("--dest", "-d", "dest_uris", required=True, multiple=True, metavar="DEST", help=dest_help)(f)
        f = click.option("--connect", "-c", "src_uri", required=True, metavar="SRC",
                         help="libvirt URI of the source host (where DOMAIN runs or is defined).")(f)
        return f
    return apply


def resolve_policy(app: AppContext, driver_version: str | None, parent_model: bool | None) -> MatchPolicy:
    """Options override the configuration file."""
    base = MatchPolicy.from_config(app.config)
    return MatchPolicy.parse(driver_version if driver_version is not None else base.driver_version,
                             parent_model if parent_model is not None else base.parent_model)


@click.command("check", help=HELP)
@click.argument("domain")
@dryrun_options("libvirt URI of the destination host (repeat for placement).",
                "The destination domain XML an orchestrator passes to libvirt (virsh migrate --xml).")
@pass_app
def check(app: AppContext, domain: str, src_uri: str, dest_uris: tuple[str, ...], dest_xml: Path | None,
          dest_sysfs: Path | None, match_driver_version: str | None, match_parent_model: bool | None,
          as_json: bool) -> None:
    policy = resolve_policy(app, match_driver_version, match_parent_model)
    if len(dest_uris) > 1:
        if dest_sysfs is not None:
            raise UsageError("--dest-sysfs describes one destination: give exactly one --dest with it")
        from .place import run_placement

        run_placement(app, domain, src_uri, dest_uris, dest_xml, policy, as_json)
        return
    dest_uri = dest_uris[0]
    source = read_source(src_uri, domain)
    xml = dest_xml.read_bytes() if dest_xml is not None else None
    dest = read_dest(dest_uri, SysfsEnv(dest_sysfs) if dest_sysfs else None)
    report = evaluate(source, dest, dest_xml=xml, require_annotation=app.config.require_annotation,
                      policy=policy)
    store = store_readiness(dest_uri, app.config.store)
    notes = list(report.notes)
    if store["ready"] is False:
        notes.append(f"the destination store is not usable: {store['detail']}")
    if as_json:
        app.emit_json(to_json(report, source, store, notes, dest_xml, policy, app.config.require_annotation))
    else:
        click.echo(render(report, source, store, notes, dest_xml, policy))
    click.get_current_context().exit(report.exit_code)


def store_readiness(dest_uri: str, root: Path) -> dict[str, Any]:
    """Whether the destination's trusted store can be opened — knowable only when the
    destination is this machine (``qemu:///…`` without a host); ``ready`` is ``None``
    otherwise.  Informative: the verdict and exit code do not depend on it."""
    parts = urlsplit(dest_uri)
    driver, _, transport = parts.scheme.partition("+")
    if driver != "qemu" or parts.hostname or transport not in ("", "unix"):
        return {"ready": None, "detail": "not known from here; on the destination run: "
                                         "libvirt-mdev store verify"}
    from ..errors import StoreError
    from ..store.store import Store

    try:
        Store.open(root).close()
    except StoreError as exc:
        return {"ready": False, "detail": exc.message}
    return {"ready": True, "detail": f"{root} is owned by root with mode 0700"}


# --------------------------------------------------------------------------- JSON
def report_json(report: DestReport) -> dict[str, Any]:
    """The per-destination part of the JSON (shared with ``place``; docs/check.md)."""
    gate = report.gate
    refusal = gate.first_refusal() if gate else None
    return {"dest": report.dest, "allowed": report.allowed, "verdict": report.verdict,
            "exit_code": report.exit_code,
            "gate_verdict": gate.verdict.value if gate else None,
            "gate_reason": refusal.reason(report.dest) if refusal else None,
            "can_take": report.can_take, "how": report.how, "remap": report.remap, "why": report.why,
            "remap_plan": report.plan or None,
            "devices": [d.to_json() for d in report.devices], "policy_unchecked": report.unchecked,
            "notes": report.notes, "error": report.error}


def to_json(report: DestReport, source: SourceView, store: dict[str, Any], notes: list[str],
            dest_xml: Path | None, policy: MatchPolicy, require_annotation: bool) -> dict[str, Any]:
    ann = source.info.annotation
    out: dict[str, Any] = {"schema": SCHEMA, "domain": source.info.name, "domain_uuid": source.info.uuid,
                           "source": source.uri, "dest_xml": str(dest_xml) if dest_xml else None,
                           "annotated": ann is not None, "annotation_host": ann.host if ann else None,
                           "require_annotation": require_annotation, "policy": policy.to_json()}
    out.update(report_json(report))
    out["notes"] = notes
    out["store"] = store
    out["reason"] = None if report.allowed else report.why
    return out


# --------------------------------------------------------------------------- text
_COLUMNS = ("GUEST ADDR", "MDEV UUID", "SOURCE TYPE", "ANNOTATED", "DEST TYPE", "ON DEST", "VERDICT")


def _row(d: DeviceReport) -> tuple[str, ...]:
    g = d.gate
    verdict = ", ".join(v.value for v in d.problems) or d.verdict.value
    return (g.guest_address or "-", g.uuid, d.live_type or "(unknown)", g.source_type or "(none)",
            g.dest_type or "-", "yes" if g.present else "no", verdict)


def _details(d: DeviceReport) -> list[str]:
    out = []
    g = d.gate
    if d.source_uuid != g.uuid:
        out.append(f"    source mdev {d.source_uuid} (paired by {g.matched_by or 'guest address'})")
    if g.detail:
        out.append(f"    {g.detail}")
    if d.free or d.parents:
        free = ", ".join(f"{m.uuid} ({m.parent})" for m in d.free) or "none"
        out.append(f"    free {d.wanted_type} mdevs on dest: {free}")
        for parent, n in d.parents:
            out.append(f"    parent {parent}: available_instances {n if n is not None else 'unknown'} for "
                       f"{d.wanted_type}" + (" (can create)" if n else ""))
    elif d.problems and any(p.value in ("missing-on-dest", "type-mismatch") for p in d.problems) and d.wanted_type:
        out.append(f"    no free {d.wanted_type} mdev on dest and no parent offers {d.wanted_type}")
    return out


def table(devices: list[DeviceReport]) -> list[str]:
    rows = [_COLUMNS] + [_row(d) for d in devices]
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(rows[0], widths, strict=True)).rstrip()]
    for d, r in zip(devices, rows[1:], strict=True):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        lines += _details(d)
    return lines


def render(report: DestReport, source: SourceView, store: dict[str, Any], notes: list[str],
           dest_xml: Path | None, policy: MatchPolicy) -> str:
    info, ann = source.info, source.info.annotation
    lines = [f"domain:    {info.name}" + (f" ({info.uuid})" if info.uuid else ""),
             f"source:    {source.uri}", f"dest:      {report.dest}"]
    if dest_xml is not None:
        lines.append(f"dest xml:  {dest_xml}")
    lines += ["annotated: " + (f"yes (by {ann.host})" if ann and ann.host else "yes" if ann else "no"),
              f"policy:    {policy.describe()}", ""]
    if report.devices:
        lines += table(report.devices)
    else:
        lines.append("no mdev hostdevs: nothing to check (verdict no-mdev)")
    lines.append("")
    lines.append(f"dest store: {'ready' if store['ready'] else 'not ready' if store['ready'] is False else 'unknown'}"
                 f" ({store['detail']})")
    lines += [f"note: {n}" for n in notes]
    gate = report.gate
    if gate is not None and report.devices and gate.verdict.value != report.verdict:
        lines.append(f"hook now: {'allowed' if gate.allowed else 'refused'} ({gate.verdict.value}) — "
                     f"the row verdicts above are what decides once that is fixed")
    if report.allowed:
        lines.append(f"result: allowed ({report.verdict})")
    else:
        lines.append(f"result: refused ({report.verdict}, exit {report.exit_code}): {report.why}")
        if report.can_take:
            lines.append(f"orchestrator: can take it with another mdev here: {report.plan}")
    return "\n".join(lines)
