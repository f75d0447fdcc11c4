"""``libvirt-mdev load TOKEN --mdev UUID``: the reference loader.

It stands in for the kernel interface the seed proposes (a vendor driver resolving
a token like a firmware name): resolve the token inside the trusted store, check
the files' owner/mode, re-hash the state, compare the manifest's source mdev type
with the live type of the destination mdev, spend the token, then deliver — print
the state file's path, or write the verified bytes to ``--sink``.

The token is spent *before* delivery: of two concurrent loaders only one gets the
state, and a failed delivery needs a new migration (fail closed, never replay).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

import click

from ..errors import SignatureError, TypeMismatch
from ..mdev.sysfs import SysfsEnv
from ..store import Manifest, Store, resolve_token, spend_token
from ..store.acl import open_sink, write_all
from .context import AppContext, pass_app

CHUNK = 1 << 20


def dest_mdev_type(sysfs_root: Path, mdev_uuid: str) -> str:
    """The live type of *mdev_uuid* on this host (sysfs, as the hook reads it).

    Raises:
        MdevMissing: no such active mdev under *sysfs_root*.
        MdevError: its type cannot be read.
    """
    return SysfsEnv(sysfs_root).mdev(mdev_uuid).type_id


def check_signature(m: Manifest, require: bool, trusted_keys: Sequence[Path]) -> Optional[str]:
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
        from ..sign import TrustedKeys, verify_manifest
    except ImportError:
        raise SignatureError("require_signature is on but the 'cryptography' package is not "
                             "installed (pip install 'libvirt-mdev[sign]'); refusing") from None
    verify_manifest(m, TrustedKeys.from_files(trusted_keys))
    return m.signer


def load_state(store: Store, token: str, mdev_uuid: str, sysfs_root: Path,
               sink: Optional[Path], *, require_signature: bool = False,
               trusted_keys: Sequence[Path] = ()) -> dict[str, Any]:
    """Do the whole load; returns what ``--json`` prints.

    Raises:
        TokenError, StoreAccessError, StoreIntegrityError, StoreError, MdevMissing,
        TypeMismatch, SignatureError.  Any other exception is a bug.
    """
    m = resolve_token(store, token, mdev_uuid)
    m, fd = store.open_verified(m.id)
    try:
        signer = check_signature(m, require_signature, trusted_keys)
        dest_type = dest_mdev_type(sysfs_root, mdev_uuid)
        if m.mdev_type is None:
            raise TypeMismatch(f"state for mdev {mdev_uuid} records no source mdev type; "
                               f"refusing to load it into type {dest_type}")
        if m.mdev_type != dest_type:
            raise TypeMismatch(f"state for mdev {mdev_uuid} was saved from type {m.mdev_type}, "
                               f"but the mdev here has type {dest_type}; refusing to load it")
        spend_token(store, token, mdev_uuid)
        out: dict[str, Any] = {"token": token, "mdev_uuid": mdev_uuid, "manifest_id": m.id,
                               "sha256": m.sha256, "length": m.length,
                               "source_type": m.mdev_type, "dest_type": dest_type,
                               "path": str(store.root / m.state_name), "signer": signer}
        if sink is not None:
            out["sink"] = str(sink)
            out["bytes_written"] = _copy_to_sink(fd, sink)
    finally:
        os.close(fd)
    return out


def _copy_to_sink(fd: int, sink: Path) -> int:
    out = open_sink(sink)
    total = 0
    try:
        while True:
            b = os.read(fd, CHUNK)
            if not b:
                break
            total += write_all(out, b, f"sink {sink}")
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
def load(app: AppContext, token: str, mdev_uuid: str, store_dir: Optional[Path],
         sink: Optional[Path], sysfs_root: Optional[Path], as_json: bool) -> int:
    """Resolve TOKEN in the trusted store, verify it and deliver the state for --mdev."""
    root = store_dir if store_dir is not None else app.config.store
    sysfs = sysfs_root if sysfs_root is not None else app.config.sysfs_root
    with Store.open(root) as store:
        out = load_state(store, token, mdev_uuid, sysfs, sink,
                         require_signature=app.config.require_signature,
                         trusted_keys=app.config.trusted_keys)
    if as_json:
        app.emit_json(out)
    elif sink is None:
        click.echo(out["path"])
    else:
        click.echo(f"loaded {out['bytes_written']} bytes of state (sha256 {out['sha256']}) "
                   f"into {sink}", err=True)
    return 0


cli = load
