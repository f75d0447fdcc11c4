"""``libvirt-mdev store list|verify|gc``: look after the trusted store.

``list`` shows every stored state (and entries that cannot be trusted, with why);
``verify`` re-hashes states against their manifests (exit 4 if any fails);
``gc`` removes temp files of dead writers, states whose migration ended more than
``retention`` seconds ago, and unreferenced state files.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Optional

import click

from ..errors import StoreError, StoreIntegrityError, UsageError
from ..store import Store
from ..store.manifest import is_uuid
from .context import AppContext, pass_app

_STORE_OPT = click.option("--store", "store_dir", type=click.Path(path_type=Path), default=None,
                          help="Trusted store directory (default: the configured store).")
_JSON_OPT = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")


def show(what: str, items: list[str]) -> None:
    click.echo(f"{what}: {len(items)}")


def _open(app: AppContext, store_dir: Optional[Path]) -> Store:
    return Store.open(store_dir if store_dir is not None else app.config.store)


@click.group("store")
def store() -> None:
    """List, verify and garbage-collect the trusted store."""


@store.command("list")
@_STORE_OPT
@_JSON_OPT
@pass_app
def list_cmd(app: AppContext, store_dir: Optional[Path], as_json: bool) -> int:
    """List stored device states, oldest first."""
    with _open(app, store_dir) as st:
        entries = st.list()
        root = str(st.root)
    if as_json:
        app.emit_json({"store": root, "states": [e.to_json() for e in entries]})
        return 0
    if not entries:
        click.echo(f"store {root}: empty")
        return 0
    for e in entries:
        if e.manifest is None:
            click.echo(f"{e.id[:16]}  UNTRUSTED  {e.problem}")
            continue
        m = e.manifest
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(m.created))
        click.echo(f"{e.id[:16]}  {'spent' if e.spent else 'ready'}  {when}  {m.length:>12}  "
                   f"mdev {m.mdev_uuid or '-'}  type {m.mdev_type or '-'}  {m.idstr}  "
                   f"domain {m.domain_name or '-'}")
    return 0


@store.command("verify")
@click.argument("ids", nargs=-1, metavar="[MANIFEST_ID]...")
@_STORE_OPT
@_JSON_OPT
@pass_app
def verify_cmd(app: AppContext, ids: tuple[str, ...], store_dir: Optional[Path],
               as_json: bool) -> int:
    """Re-hash stored states against their manifests (all, or the ids given)."""
    results: list[dict[str, Any]] = []
    with _open(app, store_dir) as st:
        todo = list(ids) or [e.id for e in st.list()]
        for mid in todo:
            try:
                m = st.verify(mid)
                results.append({"id": mid, "ok": True, "sha256": m.sha256, "length": m.length})
            except StoreError as exc:
                results.append({"id": mid, "ok": False, "problem": exc.message})
    bad = [r for r in results if not r["ok"]]
    if as_json:
        app.emit_json({"ok": not bad, "states": results})
    else:
        for r in results:
            click.echo(f"{r['id'][:16]}  " + ("ok" if r["ok"] else f"FAILED  {r['problem']}"))
    if bad:
        if as_json:
            return StoreIntegrityError.exit_code
        raise StoreIntegrityError(f"{len(bad)} of {len(results)} stored states failed "
                                  f"verification (first: {bad[0]['problem']})")
    return 0


@store.command("gc")
@click.option("--retention", type=click.IntRange(min=0), default=None, metavar="SECONDS",
              help="Keep states whose migration ended less than this long ago "
                   "(default: the configured retention).")
@click.option("--domain", "domain_uuid", default=None, metavar="UUID",
              help="Only consider this domain's states.")
@_STORE_OPT
@_JSON_OPT
@pass_app
def gc_cmd(app: AppContext, retention: Optional[int], domain_uuid: Optional[str],
           store_dir: Optional[Path], as_json: bool) -> int:
    """Remove dead writers' temp files and states that are no longer needed."""
    if domain_uuid is not None and not is_uuid(domain_uuid):
        raise UsageError(f"--domain {domain_uuid!r} is not a lowercase UUID")
    keep = retention if retention is not None else app.config.retention
    with _open(app, store_dir) as st:
        rep = st.gc(keep, domain_uuid=domain_uuid)
    if as_json:
        app.emit_json(rep.to_json())
    else:
        show("removed temp files", rep.removed_temp)
        show("removed manifests", rep.removed_manifests)
        show("removed states", rep.removed_states)
        show("removed spent markers", rep.removed_markers)
        if rep.skipped_busy:
            show("temp files of live writers kept", rep.skipped_busy)
        for p in rep.problems:
            click.echo(f"problem: {p}", err=True)
    return 0


cli = store
