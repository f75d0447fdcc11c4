"""``libvirt-mdev sign IN OUT``: sign a save image's device state on its source host.

Where the signatures live (docs/saveimages.md): *inside the image*, as the same signed
records a signing proxy adds to a live migration (``libvirt-mdev/signed-statement``
sections, :mod:`libvirt_mdev.sign.record`): a ``hello`` after the CONFIGURATION (the
image id, the domain uuid, this host, the key), a ``device`` statement after each VFIO
device's state (idstr, instance id, mdev uuid and type from the image's domain XML,
length, SHA-256) and a ``config`` statement after its config section.  Not in the
manifests: a manifest is named by the SHA-256 of its own bytes and tokens name
manifests, and the destination's manifests do not exist yet.  The destination's
verifying ``splice`` checks the records, writes the signature into each manifest it
creates (so ``load`` verifies again) and removes the records from its output.  QEMU
refuses an image that still carries them: a signed image that bypassed ``splice``
cannot be restored (fail closed).

IN may be a stripped image: its token records are resolved in this host's store first
(OUT then carries the state inline, as a self-contained image for another host).
"""
from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import click

from ..errors import SignatureError
from ..filter import Binding, FilterOptions, StreamFilter, bindings_from_domain_xml
from ..io.drive import iter_events
from ..store import Store
from ..stream import NEED_DATA, SaveImageHeader, StreamParser
from ..stream.events import Bytes
from .context import AppContext, pass_app
from .filtercmd import check_options, open_io


class _Signer:
    """Re-parses the filter's output and signs it on the way to *out* (constant memory)."""

    def __init__(self, layer: Any, ctx: Any, fixed: dict[str, Binding] | None) -> None:
        self.parser = StreamParser()
        self.layer, self.ctx, self.fixed = layer, ctx, fixed

    def write(self, data: Bytes) -> None:
        if not data:
            return  # b"" would say "end of input" to the parser: that is end()'s job
        self.parser.feed(bytes(data))  # the filter's views are only valid until its next read
        self._drain()

    def end(self) -> None:
        self.parser.feed(b"")
        self._drain()

    def _drain(self) -> None:
        while True:
            ev = self.parser.next_event()
            if ev is NEED_DATA:
                return
            if type(ev) is SaveImageHeader and self.fixed is None:
                bindings, _name, uuid = bindings_from_domain_xml(ev.xml)
                self.ctx.bindings = bindings
                self.ctx.domain_uuid = self.ctx.domain_uuid or uuid
            self.layer.process(ev)


@click.command("sign")
@click.argument("source", metavar="IN")
@click.argument("output", metavar="OUT")
@click.option("--key", "key_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Private key (default: the configured host_key, made by 'libvirt-mdev keygen').")
@click.option("--store", "store_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Trusted store for the token records of a stripped IN (default: the configured store).")
@click.option("--domain-xml", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Domain XML naming the mdev hostdevs (default: the XML inside the save image).")
@click.option("--json", "as_json", is_flag=True, help="Print the signed statements as JSON (OUT must be a file).")
@pass_app
def sign(app: AppContext, source: str, output: str, key_path: Path | None, store_dir: Path | None,
         domain_xml: Path | None, as_json: bool) -> int:
    """Sign the VFIO device state of save image IN with this host's key; write OUT.

    Verify and restore OUT on the destination with `libvirt-mdev splice OUT VERIFIED`
    (trusted_keys there must list this host's public key), then `virsh restore VERIFIED`.
    """
    check_options(source, output, as_json)
    try:
        from ..sign.keys import load_signing_key
        from ..sign.layers import SignContext, SignLayer
    except ImportError:
        raise SignatureError("signing needs the 'cryptography' package (pip install 'libvirt-mdev[sign]')") from None
    key = load_signing_key(key_path or app.config.host_key, uid=os.geteuid())
    host = socket.gethostname().split(".")[0] or "localhost"
    fixed = None
    domain_uuid = None
    if domain_xml is not None:
        fixed, _name, domain_uuid = bindings_from_domain_xml(domain_xml.read_bytes())
    ctx = SignContext(key=key, source_host=host, domain_uuid=domain_uuid, bindings=fixed)
    with Store.open(store_dir or app.config.store, create=True) as store, open_io(source, output) as (src, out):
        layer = SignLayer(ctx, out.write)
        signer = _Signer(layer, ctx, fixed)
        parser = StreamParser()
        # (without --domain-xml both are None: the save image's own domain binds)
        opts = FilterOptions(mode="splice", accept_tokens=True, stream_kind="copy", accept_at_end=False,
                             holder=os.path.abspath(output) if output != "-" else "stdout",
                             bindings=fixed, domain_uuid=domain_uuid)
        with StreamFilter(store, parser, opts, signer.write) as flt:
            for ev in iter_events(src, parser):
                flt.process(ev)
            signer.end()
            if ctx.domain_uuid is None:
                raise SignatureError(f"{source}: no domain uuid (not a save image?); pass --domain-xml")
            out.commit()
            flt.accept()
    devices = [s for s in layer.signed if s["kind"] == "device"]
    if as_json:
        app.emit_json({"output": output, "key_id": key.key_id, "image_id": ctx.migration_id,
                       "statements": layer.signed})
    else:
        echo = click.echo if output != "-" else (lambda s: click.echo(s, err=True))
        for s in devices:
            echo(f"signed {s['idstr']} mdev={s['mdev_uuid'] or '-'} type={s['mdev_type'] or '-'} "
                 f"bytes={s['length']} sha256={s['sha256']}")
        echo(f"signed image {ctx.migration_id} of domain {ctx.domain_uuid} with key {key.key_id}: "
             f"{len(devices)} device state(s)")
    return 0


cli = sign
