"""``libvirt-mdev load TOKEN --mdev UUID``: the reference loader.

It stands in for the kernel interface the seed proposes (a vendor driver resolving
a token like a firmware name): resolve the token inside the trusted store, check
the files' owner/mode, re-hash the state, check the destination mdev that will
really load it — as this host's sysfs shows it now — against the source facts the
manifest records, under the configured match policy (the same rule ``migrate begin``
and the proxy apply: :func:`libvirt_mdev.mdev.gate.recheck`), spend the token, then
deliver — print the state file's path, or write the verified bytes to ``--sink``.

State that came on multifd side channels (manifest framing ``multifd``,
``docs/multifd.md``) is stored as the packets that carried it; ``--sink`` gets what
QEMU's loader would give the driver: the data buffers in index order, without packet
headers or the config packet.

The policy (``match_driver_version``, ``match_parent_model``: :mod:`libvirt_mdev.mdev.policy`)
compares the manifest's ``driver_version`` / ``parent_model`` (the source's, as
``annotate`` recorded them) with the destination's; a rule that is on and cannot be
decided — a manifest stored without those fields, a sysfs that shows no version —
refuses (exit 6, like a type mismatch).

The token is spent *before* delivery: of two concurrent loaders only one gets the
state, and a failed delivery needs a new migration (fail closed, never replay).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from ..errors import SignatureError, StoreIntegrityError, TypeMismatch
from ..io.sizes import CHUNK
from ..mdev.gate import recheck, recorded_source
from ..mdev.policy import MatchPolicy
from ..mdev.types import DeviceCheck
from ..store import Manifest, Store, resolve_token, spend_token
from ..store.acl import write_all
from ..store.output import open_sink
from ..stream.vfio import multifd_state_order
from ..stream.wire import VfioFraming
from .context import AppContext, pass_app


def check_destination(m: Manifest, mdev_uuid: str, sysfs_root: Path, policy: MatchPolicy) -> DeviceCheck:
    """Judge the mdev *mdev_uuid* that will load the state of *m*, as sysfs shows it now.

    Raises:
        TypeMismatch: *m* records no source type; another type; a policy rule fails or
            cannot be decided.
        MdevMissing: no such active mdev under *sysfs_root*.
        MdevError: its sysfs node cannot be read.
    """
    if m.mdev_type is None:
        raise TypeMismatch(f"state for mdev {mdev_uuid} records no source mdev type; refusing to load it",
                           mdev=mdev_uuid)
    src = recorded_source(mdev_uuid, m.mdev_type, m.driver_version, m.parent_model)
    domain = m.domain_name or m.domain_uuid or "(unnamed)"
    return recheck(domain, mdev_uuid, src, sysfs_root, policy, idstr=m.idstr)


def check_signature(m: Manifest, require: bool, trusted_keys: Sequence[Path]) -> str | None:
    """Re-verify the source signature recorded in manifest *m* (issue 8).

    With *require* an unsigned state is refused; without it a signature present is
    still checked when trusted keys are configured.  Returns the signer's key id.

    Raises:
        SignatureError: unsigned (when required), unknown key, or a signature that does
            not cover this manifest's exact fields.
    """
    if not require and (m.signature is None or not trusted_keys):
        return None
    if m.signature is None:
        raise SignatureError(f"state {m.id[:16]}... for mdev {m.mdev_uuid} carries no source "
                             f"signature and require_signature is on; refusing to load it")
    try:
        from ..sign.keys import TrustedKeys, verify_manifest
    except ImportError:
        raise SignatureError("require_signature is on but the 'cryptography' package is not "
                             "installed (pip install 'libvirt-mdev[sign]'); refusing") from None
    verify_manifest(m, TrustedKeys.from_files(trusted_keys))
    return m.signer


def load_state(store: Store, token: str, mdev_uuid: str, sysfs_root: Path,
               sink: Path | None, *, require_signature: bool = False,
               trusted_keys: Sequence[Path] = (), policy: MatchPolicy | None = None) -> dict[str, Any]:
    """Do the whole load under *policy* (default: type only); returns what ``--json`` prints.

    Raises:
        TokenError, StoreAccessError, StoreIntegrityError, StoreError, MdevMissing,
        TypeMismatch, SignatureError.  Any other exception is a bug.
    """
    m = resolve_token(store, token, mdev_uuid)
    m, fd = store.open_verified(m.id)
    try:
        signer = check_signature(m, require_signature, trusted_keys)
        policy = policy or MatchPolicy()
        dest = check_destination(m, mdev_uuid, sysfs_root, policy)
        spend_token(store, token, mdev_uuid)
        out: dict[str, Any] = {"token": token, "mdev_uuid": mdev_uuid, "manifest_id": m.id,
                               "sha256": m.sha256, "length": m.length,
                               "source_type": m.mdev_type, "dest_type": dest.dest_type,
                               "source_driver_version": m.driver_version,
                               "dest_driver_version": dest.dest_driver_version,
                               "source_parent_model": m.parent_model, "dest_parent_model": dest.dest_parent_model,
                               "policy": policy.to_json(),
                               "path": str(store.root / m.state_name), "signer": signer}
        out["framing"] = m.vfio_framing
        if sink is not None:
            out["sink"] = str(sink)
            out["bytes_written"] = _copy_to_sink(fd, sink, _segments(fd, m))
    finally:
        os.close(fd)
    return out


def _segments(fd: int, m: Manifest) -> list[tuple[int, int]]:
    """[(offset, length)] of the state file that make the driver's state, in order."""
    if m.vfio_framing != VfioFraming.MULTIFD:
        return [(0, m.length)]
    return multifd_state_order(lambda off, n: os.pread(fd, n, off), m.length)


def _copy_to_sink(fd: int, sink: Path, segments: Sequence[tuple[int, int]]) -> int:
    out = open_sink(sink)
    total = 0
    try:
        for off, length in segments:
            end = off + length
            while off < end:
                b = os.pread(fd, min(CHUNK, end - off), off)
                if not b:
                    raise StoreIntegrityError(f"state file {fd} is shorter than its manifest says")
                total += write_all(out, b, f"sink {sink}")
                off += len(b)
    finally:
        os.close(out)
    return total


@click.command("load")
@click.argument("token")
@click.option("--mdev", "mdev_uuid", required=True, metavar="UUID",
              help="The destination mdev the state is for (the token is bound to it).")
@click.option("--store", "store_dir", type=click.Path(path_type=Path), default=None,
              help="Trusted store directory (default: the configured store).")
@click.option("--sink", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the verified state bytes here (a file or a vendor sysfs attribute) "
                   "instead of printing the state file's path.")
@click.option("--sysfs-root", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="sysfs mount point (default: the configured sysfs_root, normally /sys).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_app
def load(app: AppContext, token: str, mdev_uuid: str, store_dir: Path | None,
         sink: Path | None, sysfs_root: Path | None, as_json: bool) -> int:
    """Resolve TOKEN in the trusted store, verify it and deliver the state for --mdev."""
    root = store_dir if store_dir is not None else app.config.store
    sysfs = sysfs_root if sysfs_root is not None else app.config.sysfs_root
    with Store.open(root) as store:
        out = load_state(store, token, mdev_uuid, sysfs, sink,
                         require_signature=app.config.require_signature,
                         trusted_keys=app.config.trusted_keys, policy=MatchPolicy.from_config(app.config))
    if as_json:
        app.emit_json(out)
    elif sink is None:
        click.echo(out["path"])
    else:
        click.echo(f"loaded {out['bytes_written']} bytes of state (sha256 {out['sha256']}) "
                   f"into {sink}", err=True)
    return 0


cli = load
