"""``libvirt-mdev place DOMAIN --connect SRC --dest URI --dest URI …``: which hosts can take it?

Placement for schedulers and operators (docs/check.md): the dry run of ``check``
against many destinations at once.  The source is read once; every destination is
asked in its own thread over its own libvirt connection (libvirt connections are not
shared between threads here, and libvirt-python releases the GIL while it waits), so
the wall time is about that of the slowest host, not the sum.  An unreachable or
broken destination is a row saying so, never an abort.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import click

from ..mdev.dryrun import DestReport, SourceView, evaluate_uri, read_source
from ..mdev.policy import MatchPolicy
from .check import dryrun_options, report_json, resolve_policy
from .context import AppContext, pass_app

SCHEMA = "libvirt-mdev/place/1"
#: at most this many destinations are asked at the same time
MAX_WORKERS = 16

HELP = """Ask many destinations which of them can take DOMAIN's mdevs, and why not.

\b
Each DEST is asked concurrently (one thread and one libvirt connection per
destination) with the same rule as `libvirt-mdev check`.  One row per
destination:
  CAN TAKE  yes     the migration would be allowed as the XML stands
            remap   not as named, but free mdevs of the source's types exist
                    there (an orchestrator gives the guest those)
            create  as remap, after creating mdevs (parents have
                    available_instances; mdevctl start ...)
            no      see WHY (type or driver mismatch, no capacity, not
                    annotated, unreachable host, ...)
Exit 0 when at least one destination can take the domain, 1 when none can;
5 / 12 / 10 when the source cannot be read.  --json: docs/check.md.
"""


def place_all(source: SourceView, uris: Sequence[str], ask: Callable[..., DestReport],
              workers: int = MAX_WORKERS, **kwargs: Any) -> list[tuple[DestReport, float]]:
    """Every destination's report and its seconds, in the order given, asked concurrently."""
    def one(uri: str) -> tuple[DestReport, float]:
        t0 = time.monotonic()
        rep = ask(source, uri, **kwargs)
        return rep, time.monotonic() - t0

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(uris))), thread_name_prefix="place") as pool:
        return list(pool.map(one, uris))


def can_take_label(r: DestReport) -> str:
    if not r.can_take:
        return "no"
    return {"as-is": "yes", "remap": "remap", "remap+create": "create"}.get(r.how or "", "yes")


def run_placement(app: AppContext, domain: str, src_uri: str, dest_uris: Sequence[str], dest_xml: Path | None,
                  policy: MatchPolicy, as_json: bool) -> None:
    source = read_source(src_uri, domain)
    xml = dest_xml.read_bytes() if dest_xml is not None else None
    t0 = time.monotonic()
    rows = place_all(source, list(dest_uris), evaluate_uri, dest_xml=xml,
                     require_annotation=app.config.require_annotation, policy=policy)
    wall = time.monotonic() - t0
    takers = [r.dest for r, _ in rows if r.can_take]
    code = 0 if takers else 1
    if as_json:
        app.emit_json({"schema": SCHEMA, "domain": source.info.name, "domain_uuid": source.info.uuid,
                       "source": src_uri, "dest_xml": str(dest_xml) if dest_xml else None,
                       "policy": policy.to_json(), "require_annotation": app.config.require_annotation,
                       "can_take": takers, "exit_code": code, "seconds": round(wall, 3),
                       "destinations": [{**report_json(r), "label": can_take_label(r), "seconds": round(s, 3)}
                                        for r, s in rows]})
    else:
        click.echo(render(source, [r for r, _ in rows], policy, wall))
    click.get_current_context().exit(code)


def render(source: SourceView, reports: list[DestReport], policy: MatchPolicy, wall: float) -> str:
    head = ("DEST", "CAN TAKE", "VERDICT", "WHY")
    rows = [head] + [(r.dest, can_take_label(r), r.verdict, r.plan if r.can_take and r.plan else r.why)
                     for r in reports]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"domain: {source.info.name}" + (f" ({source.info.uuid})" if source.info.uuid else ""),
             f"source: {source.uri}", f"policy: {policy.describe()}", ""]
    lines += ["  ".join([*(c.ljust(w) for c, w in zip(row[:3], widths, strict=True)), row[3]]).rstrip() for row in rows]
    n_as_is = sum(1 for r in reports if r.can_take and r.how == "as-is")
    n_remap = sum(1 for r in reports if r.can_take and r.how != "as-is")
    lines += ["", (f"result: {n_as_is + n_remap} of {len(reports)} destinations can take {source.info.name} "
                  f"({n_as_is} as-is, {n_remap} with remapping); asked in parallel in {wall:.2f} s")]
    return "\n".join(lines)


@click.command("place", help=HELP)
@click.argument("domain")
@dryrun_options("libvirt URI of a candidate destination (repeat).",
                "A destination domain XML to check on every destination.")
@pass_app
def place(app: AppContext, domain: str, src_uri: str, dest_uris: tuple[str, ...], dest_xml: Path | None,
          dest_sysfs: Path | None, match_driver_version: str | None, match_parent_model: bool | None,
          as_json: bool) -> None:
    if dest_sysfs is not None:
        from ..errors import UsageError

        raise UsageError("--dest-sysfs describes one destination: use it with check, not place")
    policy = resolve_policy(app, match_driver_version, match_parent_model)
    run_placement(app, domain, src_uri, dest_uris, dest_xml, policy, as_json)


cli = place
