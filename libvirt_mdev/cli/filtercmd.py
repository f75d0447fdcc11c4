"""``libvirt-mdev strip`` and ``libvirt-mdev splice``: the filter on files and pipes."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable, Optional

import click

from ..errors import UsageError
from ..filter import DeviceResult, FilterOptions, bindings_from_domain_xml, filter_stream
from ..store import Store
from ..store.acl import AtomicOutput
from .context import AppContext, pass_app
from .inspect import open_input, progress_reader


def _common(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout (OUT must then be a file).")(f)
    f = click.option("--domain-xml", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="Domain XML naming the mdev hostdevs (default: the XML inside a save image). "
                          "With it, state for a device the domain lacks is refused.")(f)
    f = click.option("--migration-id", help="Identifier recorded in each manifest (default: random).")(f)
    f = click.option("--store", "store_dir", type=click.Path(file_okay=False, path_type=Path),
                     help="Trusted store directory (default: 'store' in the configuration file).")(f)
    f = click.option("--no-verify", is_flag=True, help="Skip re-hashing each stored state from disk.")(f)
    f = click.argument("output", metavar="OUT")(f)
    f = click.argument("source", metavar="IN")(f)
    return f


def run_filter(app: AppContext, mode: str, source: str, output: str, store_dir: Optional[Path],
               domain_xml: Optional[Path], migration_id: Optional[str], no_verify: bool) -> list[DeviceResult]:
    store_root = store_dir or app.config.store
    opts = FilterOptions(mode=mode, accept_tokens=mode == "splice", verify=not no_verify)
    if migration_id:
        opts.migration_id = migration_id
    if domain_xml is not None:
        opts.bindings, opts.domain_name, opts.domain_uuid = bindings_from_domain_xml(domain_xml.read_bytes())
    src = open_input(source)
    with Store.open(store_root, create=True) as store, src:
        if output == "-":
            out = sys.stdout.buffer
            for progress in progress_reader(app, src, mode):
                results = filter_stream(src, out.write, store, opts, progress)
            out.flush()
            return results
        with AtomicOutput(output) as dst:
            for progress in progress_reader(app, src, mode):
                results = filter_stream(src, dst.write, store, opts, progress)
        return results


def _report(app: AppContext, mode: str, output: str, results: list[DeviceResult], as_json: bool) -> None:
    if as_json:
        if output == "-":
            raise UsageError("--json needs OUT to be a file (stdout carries the stream)")
        app.emit_json({"mode": mode, "output": output, "devices": [r.to_json() for r in results]})
        return
    if output == "-":
        echo = lambda s: click.echo(s, err=True)  # noqa: E731 - stdout carries the stream
    else:
        echo = click.echo
    if not results:
        echo(f"{mode}: no VFIO device state in the stream")
    for r in results:
        echo(f"{r.idstr} mdev={r.mdev_uuid or '-'} type={r.mdev_type or '-'} bytes={r.length} "
             f"sha256={r.sha256} token={r.token}")


@click.command("strip")
@_common
@pass_app
def strip(app: AppContext, source: str, output: str, store_dir: Optional[Path], domain_xml: Optional[Path],
          migration_id: Optional[str], no_verify: bool, as_json: bool) -> None:
    """Move every VFIO device's state out of a stream into the trusted store.

    IN is a QEMU migration stream or a libvirt save image (`-` = stdin); OUT gets the
    same stream with each device-state block replaced by a small token record
    (`-` = stdout).  OUT appears only when complete.  Prints one line (or JSON
    object) per device: mdev, type, bytes, sha256 and its load token.  Use
    `libvirt-mdev splice` to put the state back, or `libvirt-mdev load` to deliver it.
    """
    results = run_filter(app, "token", source, output, store_dir, domain_xml, migration_id, no_verify)
    _report(app, "strip", output, results, as_json)


@click.command("splice")
@_common
@pass_app
def splice(app: AppContext, source: str, output: str, store_dir: Optional[Path], domain_xml: Optional[Path],
           migration_id: Optional[str], no_verify: bool, as_json: bool) -> None:
    """Store and verify every VFIO device's state, and write the stream back.

    On a stream that still carries its device state, every byte of it is stored,
    hashed and re-verified, and OUT is byte-identical to IN.  On a stream made by
    `strip`, each token record is resolved in the store, the state is re-hashed, and
    the original blocks are written back: OUT is byte-identical to the stream that
    was stripped.  A missing, tampered or mismatched state is an error (exit 4).
    """
    results = run_filter(app, "splice", source, output, store_dir, domain_xml, migration_id, no_verify)
    _report(app, "splice", output, results, as_json)
