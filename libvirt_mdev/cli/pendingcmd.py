"""``libvirt-mdev pending list|clear``: the armed incoming migrations (pending records).

The ``migrate begin`` hook arms each incoming migration with a pending record; the proxy
serves it and removes it.  A migration that fails between the two can leave one behind
(:mod:`libvirt_mdev.store.pending` explains when a record is *stale*).  These commands
show them and remove them; ``store gc`` removes the stale ones too.
"""
from __future__ import annotations

import time
from typing import Any

import click

from ..errors import NotFound, UsageError
from ..store.pending import (
    PENDING_GRACE,
    is_stale,
    list_pending,
    qemu_start_times,
    remove_pending,
)
from .context import AppContext, pass_app


@click.group("pending")
def pending() -> None:
    """List or clear armed incoming migrations (pending records of the migrate-begin hook)."""


def _rows(app: AppContext) -> list[dict[str, Any]]:
    now = time.time()
    qemus = qemu_start_times()
    out = []
    for r in list_pending(app.config.runtime_dir):
        out.append({**r.to_dict(), "age": max(0, int(now - r.created)),
                    "state": "stale" if is_stale(r, qemus, now) else "live"})
    return out


@pending.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object on stdout.")
@pass_app
def list_cmd(app: AppContext, as_json: bool) -> None:
    """Show each armed migration: domain, migration id, age, live or stale, and its mdevs.

    A record is stale when no QEMU of its domain, started after it, runs on this host
    and it is older than the grace period: no migration can use it any more.
    """
    rows = _rows(app)
    if as_json:
        app.emit_json({"runtime_dir": str(app.config.runtime_dir), "grace_seconds": PENDING_GRACE,
                       "pending": rows})
        return
    if not rows:
        click.echo(f"no armed incoming migrations in {app.config.runtime_dir}")
    for r in rows:
        devs = ", ".join(f"{d['mdev_uuid']}={d['idstr']}:{d['type'] or '-'}" for d in r["devices"]) or "none"
        click.echo(f"{r['domain_name']} ({r['domain_uuid']}) migration {r['migration_id']}: {r['state']}, "
                   f"armed {r['age']}s ago, mdevs: {devs}")


@pending.command("clear")
@click.argument("domain", metavar="[DOMAIN]", required=False)
@click.option("--stale", is_flag=True, help="Remove every stale record (what 'store gc' removes).")
@click.option("--all", "all_", is_flag=True, help="Remove every record, live ones too.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object on stdout.")
@pass_app
def clear_cmd(app: AppContext, domain: str | None, stale: bool, all_: bool, as_json: bool) -> None:
    """Remove the record of DOMAIN (name or uuid), or --stale ones, or --all.

    Removing a live record makes the proxy refuse that domain's incoming migration.
    """
    if sum((domain is not None, stale, all_)) != 1:
        raise UsageError("say which records to clear: a DOMAIN (name or uuid), --stale or --all")
    rows = _rows(app)
    if domain is not None:
        chosen = [r for r in rows if domain in (r["domain_uuid"], r["domain_name"])]
        if not chosen:
            raise NotFound(f"no armed incoming migration of domain {domain} in {app.config.runtime_dir} "
                           f"(see: libvirt-mdev pending list)")
    else:
        chosen = [r for r in rows if all_ or r["state"] == "stale"]
    removed = [r for r in chosen if remove_pending(app.config.runtime_dir, r["domain_uuid"])]
    if as_json:
        app.emit_json({"removed": removed})
        return
    for r in removed:
        click.echo(f"removed: {r['domain_name']} ({r['domain_uuid']}) migration {r['migration_id']} ({r['state']})")
    if not removed:
        click.echo("nothing to remove")


cli = pending

__all__ = ["cli", "pending"]
