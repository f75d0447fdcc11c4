"""``libvirt-mdev store list|verify|gc``: look after the trusted store.

``list`` shows every stored state (and entries that cannot be trusted, with why);
``verify`` re-hashes states against their manifests (exit 4 if any fails);
``gc`` removes temp files of dead writers, states whose migration ended more than
``retention`` seconds ago, and unreferenced state files; it never removes an unspent
state a stripped save image needs (``--dry-run`` says what it would remove);
``remove`` is the admin's explicit removal of named states.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from ..errors import MdevError, StoreError, StoreIntegrityError, UsageError
from ..store import Store
from ..store.gc import expiry
from ..store.manifest import HEX64_RE, is_uuid
from ..store.store import Entry
from .context import AppContext, pass_app

_STORE_OPT = click.option("--store", "store_dir", type=click.Path(path_type=Path), default=None,
                          help="Trusted store directory (default: the configured store).")
_JSON_OPT = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")


def show(what: str, items: list[str]) -> None:
    click.echo(f"{what}: {len(items)}")


def _open(app: AppContext, store_dir: Path | None) -> Store:
    return Store.open(store_dir if store_dir is not None else app.config.store)


@click.group("store")
def store() -> None:
    """List, verify and garbage-collect the trusted store."""


@store.command("list")
@_STORE_OPT
@_JSON_OPT
@pass_app
def list_cmd(app: AppContext, store_dir: Path | None, as_json: bool) -> int:
    """List stored device states, oldest first."""
    retention = app.config.retention
    with _open(app, store_dir) as st:
        entries = st.list()
        root = str(st.root)
    if as_json:
        app.emit_json({"store": root, "states": [dict(e.to_json(), held_by=held_by(e, retention))
                                                  for e in entries]})
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
        click.echo(f"{e.id[:16]}  {e.status:<8}  {when}  {m.length:>12}  "
                   f"mdev {m.mdev_uuid or '-'}  type {m.mdev_type or '-'}  {m.idstr}  "
                   f"domain {m.domain_name or '-'}  held by: {held_by(e, retention)}")
    return 0


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))


def held_by(e: Entry, retention: int) -> str:
    """What keeps the state of *e* in the store, in words (``store list``)."""
    if e.manifest is None:
        return "nothing (untrusted; 'store remove' it after a look)"
    s = e.stream
    if s is not None and s.state == "refused":
        return f"nothing: its stream was refused ({s.reason}); gc removes it after {_when(s.decided or 0)} + retention"
    if s is not None and s.state == "open":
        return "its stream, still being filtered (not loadable until accepted)"
    end = expiry(e, retention)
    if e.spent:
        return f"nothing: token spent; gc removes it after {_when(end or 0)}"
    if end is None and s is not None:
        return f"save image {s.holder or '?'} (until its token is spent or 'store remove')"
    what = f"{s.kind} {s.holder}" if s is not None and s.holder else "its migration"
    return f"{what}: retention until {_when(end or 0)}"


@store.command("verify")
@click.argument("ids", nargs=-1, metavar="[MANIFEST_ID]...")
@_STORE_OPT
@_JSON_OPT
@pass_app
def verify_cmd(app: AppContext, ids: tuple[str, ...], store_dir: Path | None,
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
@click.option("--dry-run", is_flag=True, help="Only say what would be removed; change nothing.")
@_STORE_OPT
@_JSON_OPT
@pass_app
def gc_cmd(app: AppContext, retention: int | None, domain_uuid: str | None, dry_run: bool,
           store_dir: Path | None, as_json: bool) -> int:
    """Remove dead writers' temp files and states that are no longer needed.

    Retention applies to live-migration state; a stripped save image's state stays
    until its token is spent or an admin runs `store remove`.
    """
    if domain_uuid is not None and not is_uuid(domain_uuid):
        raise UsageError(f"--domain {domain_uuid!r} is not a lowercase UUID")
    keep = retention if retention is not None else app.config.retention
    with _open(app, store_dir) as st:
        rep = st.gc(keep, domain_uuid=domain_uuid, dry_run=dry_run)
    # armed migrations whose QEMU never came or is gone (libvirt_mdev/store/pending.py)
    stale = _expire_pending(app, dry_run)
    if as_json:
        app.emit_json({**rep.to_json(), "stale_pending": stale})
    else:
        if stale:
            show("stale pending records" + (" (would remove)" if dry_run else " removed"), stale)
        if dry_run:
            click.echo("dry run: nothing changed; a real run would remove:")
            for mid in rep.removed_manifests:
                click.echo(f"  state {mid}")
        if rep.kept_for_images:
            show("kept for stripped save images", rep.kept_for_images)
        if rep.refused_streams:
            show("unfinished streams marked refused", rep.refused_streams)
        show("removed temp files", rep.removed_temp)
        show("removed manifests", rep.removed_manifests)
        show("removed states", rep.removed_states)
        show("removed spent markers", rep.removed_markers)
        if rep.skipped_busy:
            show("temp files of live writers kept", rep.skipped_busy)
        for p in rep.problems:
            click.echo(f"problem: {p}", err=True)
    return 0


@store.command("remove")
@click.argument("ids", nargs=-1, required=True, metavar="MANIFEST_ID...")
@_STORE_OPT
@_JSON_OPT
@pass_app
def remove_cmd(app: AppContext, ids: tuple[str, ...], store_dir: Path | None, as_json: bool) -> int:
    """Remove stored states by manifest id (e.g. of a stripped image you deleted)."""
    bad = [i for i in ids if not HEX64_RE.match(i)]
    if bad:
        raise UsageError(f"{bad[0]!r} is not a manifest id (64 lowercase hex digits; see 'store list --json')")
    with _open(app, store_dir) as st:
        removed = [i for i in ids if st.remove(i)]
        rep = st.gc(app.config.retention, domain_uuid="00000000-0000-0000-0000-000000000000")
    missing = sorted(set(ids) - set(removed))
    if as_json:
        app.emit_json({"removed": removed, "missing": missing, "removed_states": rep.removed_states})
    else:
        show("removed", removed)
        for m in missing:
            click.echo(f"not in the store: {m}", err=True)
    return 0


cli = store


def _expire_pending(app: AppContext, dry_run: bool) -> list[str]:
    """Stale pending records (gc's part of their expiry); a runtime dir that does not
    exist yet has none."""
    from ..store.pending import expire_pending

    if not app.config.runtime_dir.exists():
        return []
    try:
        gone = expire_pending(app.config.runtime_dir, dry_run=dry_run)
    except MdevError as exc:  # the store's gc is done; say why the pending part was not
        click.echo(f"problem: pending records not checked: {exc.message}", err=True)
        return []
    return [f"{r.domain_name} ({r.domain_uuid}) migration {r.migration_id}" for r in gone]
