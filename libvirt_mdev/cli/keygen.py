"""``libvirt-mdev keygen [--out DIR]``: create this host's Ed25519 signing key pair.

The private key goes to ``DIR/host.key`` (default: the configured ``host_key``),
0600 root inside a 0700 root directory, written atomically; the public key to
``DIR/host.pub``.  Copy ``host.pub`` to each destination host and list it there in
``trusted_keys``.  The public key line and the key id are printed.
"""
from __future__ import annotations

import os
from pathlib import Path

import click

from ..configfile import DEFAULT_HOST_KEY
from ..errors import AlreadyExists
from ..sign.keys import generate_key, write_key_pair
from ..store.acl import SecureDir
from .context import AppContext, pass_app


@click.command("keygen")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory for host.key and host.pub (default: the directory of the configured "
                   f"host_key, {os.path.dirname(DEFAULT_HOST_KEY)}).")
@click.option("--comment", default=None, help="Comment on the public key line (default: the host name).")
@click.option("--force", is_flag=True, help="Replace an existing key pair (sources signed with the old "
              "key are no longer trusted by destinations that were given the new public key).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_app
def keygen(app: AppContext, out_dir: Path | None, comment: str | None, force: bool,
           as_json: bool) -> int:
    """Create this host's signing key pair (for signed device state)."""
    name = app.config.host_key.name
    directory = out_dir if out_dir is not None else app.config.host_key.parent
    _check_target(directory, name, force)
    key = generate_key(comment if comment is not None else os.uname().nodename)
    priv, pub = write_key_pair(key, directory, name, uid=os.geteuid(), force=force)
    if as_json:
        app.emit_json({"key_id": key.key_id, "private_key": str(priv), "public_key": str(pub),
                       "public_key_line": key.public.to_text().strip()})
    else:
        click.echo(key.public.to_text(), nl=False)
        click.echo(f"key id {key.key_id}: private key {priv}, public key {pub} "
                   f"(copy it to each destination and list it in trusted_keys)", err=True)
    return 0


def _check_target(directory: Path, name: str, force: bool) -> None:
    """Refuse before generating anything: the directory must be root's 0700 directory
    (created if missing) and, without --force, hold no key yet.  An existing key is a
    plain refusal (exit 1) naming --force, not a signature failure."""
    with SecureDir.open(directory, create=True, uid=os.geteuid(), what="host key") as d:
        if d.exists(name) and not force:
            raise AlreadyExists(f"{d.describe(name)} already exists; keep it, or pass --force to replace it "
                                f"(destinations trust only the public key they were given)")


cli = keygen
