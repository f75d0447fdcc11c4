"""``libvirt-mdev strip`` and ``libvirt-mdev splice``: the filter on files and pipes.

Order of work, so that nothing a refusal touches stays usable (issue 11/12):

1. every option is checked before anything is opened or stored (:func:`check_options`);
2. the stream runs through the filter (behind the signature layer when signatures are
   required or trusted keys are configured), its states stored *held*;
3. with ``require_signature``, every device's state must carry a verified source
   signature (:func:`check_signed`);
4. the output is committed (fsync, rename), then the stream is accepted: only now are
   its states loadable.  Any failure before that marks the stream refused first, then
   the one-line error is printed.
5. a splice of a save image into a regular file leaves a restore permit
   (:mod:`libvirt_mdev.store.permit`) for the ``restore begin`` hook.

All input and output opening is in :func:`open_io` (one small function: compressed
formats hook in there).
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from ..errors import SignatureError, UsageError
from ..filter import DeviceResult, FilterOptions, StreamFilter, bindings_from_domain_xml
from ..io.compress import ImageSink, open_image
from ..io.drive import ByteSource, iter_events
from ..store import Store, parse_token
from ..store.output import AtomicOutput, open_output
from ..stream import EventConsumer, StreamParser
from ..stream.events import Bytes
from .context import AppContext, pass_app
from .inspect import open_input, progress_reader

#: a save image is restored days after it was signed: no freshness limit (rollback to an
#: older signed image of the same domain stays possible; docs/saveimages.md)
IMAGE_MAX_AGE = 100 * 365 * 86400


def _common(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--json", "as_json", is_flag=True,
                     help="Print the result as JSON on stdout (OUT must then be a file).")(f)
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


def check_options(source: str, output: str, as_json: bool) -> None:
    """Refuse incompatible options before any work (nothing read, stored or written).

    Raises:
        UsageError: ``--json`` with OUT ``-``; IN and OUT the same file.
    """
    if as_json and output == "-":
        raise UsageError("--json needs OUT to be a file (stdout carries the stream); "
                         "name an output file or drop --json")
    output_kind(output)
    if source != "-" and output != "-":
        try:
            a, b = os.stat(source), os.stat(output)
        except OSError:
            return
        if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino):
            raise UsageError(f"IN and OUT are the same file ({output}); write to another file")


def output_kind(path: str) -> str:
    """How OUT is written: ``stdout``; ``file`` (a new or regular file, replaced atomically);
    ``direct`` (an existing FIFO or character device: written in place, never renamed over).

    Raises:
        UsageError: OUT is a symlink (never followed into a rename), a directory, a socket or
            a block device.
    """
    if path == "-":
        return "stdout"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "file"
    except OSError as exc:
        raise UsageError(f"OUT {path}: {exc.strerror}") from None
    if stat.S_ISREG(st.st_mode):
        return "file"
    if stat.S_ISFIFO(st.st_mode) or stat.S_ISCHR(st.st_mode):
        return "direct"
    what = ("a symlink (a symbolic link is never followed into a rename)" if stat.S_ISLNK(st.st_mode)
            else "not a regular file, FIFO or character device")
    raise UsageError(f"OUT {path} is {what}; name a regular file (or '-' for stdout)")


class Output:
    """Where the filtered stream goes: stdout, an existing FIFO or character device (written
    directly), or a file that appears only when complete — opened by
    :func:`~libvirt_mdev.store.output.open_output`, the one place that creates user-named
    files, after :func:`output_kind` applied this command's stricter rules.

    Hashes what it writes (the restore permit records it)."""

    def __init__(self, path: str) -> None:
        self.path = path
        output_kind(path)
        self._out = open_output(path)
        self._hash = hashlib.sha256()
        self.ino: int | None = None

    def write(self, data: Bytes) -> None:
        self._hash.update(data)
        self._out.write(data)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    @property
    def regular_file(self) -> bool:
        return isinstance(self._out, AtomicOutput)

    def commit(self) -> None:
        if isinstance(self._out, AtomicOutput) and self._out.fd is not None:
            self.ino = os.fstat(self._out.fd).st_ino
        self._out.commit()

    def abort(self) -> None:
        self._out.abort()


@contextmanager
def open_io(source: str, output: str) -> Iterator[tuple[ByteSource, Output]]:
    """Open IN for reading and OUT for writing; OUT is dropped unless committed."""
    raw = open_input(source)
    with raw, open_image(raw) as src:
        out = Output(output)
        try:
            yield src, out
        except BaseException:
            out.abort()
            raise


def verify_policy(app: AppContext) -> Any:
    """The signature policy for offline tools (None only without the 'cryptography' package
    and with nothing to verify).

    Without trusted keys the layer still removes signed records (unverified, as nothing is
    required), so a signed image spliced on such a host stays restorable.  ``require`` is
    enforced by :func:`check_signed` after the run rather than by the layer, because a
    stripped image carries no statements: its states' signatures are in their manifests.
    """
    cfg = app.config
    if cfg.require_signature and not cfg.trusted_keys:
        raise SignatureError(f"require_signature is on but trusted_keys is empty in {cfg.source}: "
                             f"list the source hosts' public key files")
    try:
        from ..sign.keys import TrustedKeys
        from ..sign.layers import VerifyPolicy
    except ImportError:
        if not cfg.require_signature and not cfg.trusted_keys:
            return None
        raise SignatureError("signatures need the 'cryptography' package "
                             "(pip install 'libvirt-mdev[sign]')") from None
    return VerifyPolicy(TrustedKeys.from_files(cfg.trusted_keys), require=False, max_age=IMAGE_MAX_AGE)


def check_signed(store: Store, flt: StreamFilter, layer: Any, policy: Any, require: bool) -> str | None:
    """With *require*: every device state carries a source signature that verifies.

    Returns the signer's key id (None when nothing was signed).
    Raises:
        SignatureError: unsigned image, unsigned device state, or a bad signature.
    """
    hello = layer.hello if layer is not None else None
    signers = set()
    for r in flt.results:
        m = store.manifest(parse_token(r.token))
        if m.signature is None:
            if require:
                raise SignatureError(f"VFIO device {r.idstr}: its state carries no source signature and "
                                     f"require_signature is on; sign the save image on its source host "
                                     f"with 'libvirt-mdev sign IN OUT'; refusing")
            continue
        if policy is not None and policy.active:
            from ..sign.keys import verify_manifest
            verify_manifest(m, policy.trusted)
        signers.add(m.signer)
    if require and hello is None and not flt.results:
        raise SignatureError("the save image carries no signed statement and require_signature is on; "
                             "sign it on its source host with 'libvirt-mdev sign IN OUT'; refusing")
    if hello is not None:
        return str(hello["signer"])
    return signers.pop() if len(signers) == 1 else None


def run_filter(app: AppContext, mode: str, source: str, output: str, store_dir: Path | None,
               domain_xml: Path | None, migration_id: str | None, no_verify: bool,
               as_json: bool = False, permit: bool | None = None) -> list[DeviceResult]:
    check_options(source, output, as_json)
    store_root = store_dir or app.config.store
    holder = os.path.abspath(output) if output != "-" else "stdout"
    opts = FilterOptions(mode=mode, accept_tokens=mode == "splice", verify=not no_verify,
                         stream_kind="image" if mode == "token" else "copy", holder=holder,
                         accept_at_end=False)
    if migration_id:
        opts = dataclasses.replace(opts, migration_id=migration_id)
    if domain_xml is not None:
        bindings, name, uuid = bindings_from_domain_xml(domain_xml.read_bytes())
        opts = dataclasses.replace(opts, bindings=bindings, domain_name=name, domain_uuid=uuid)
    policy = verify_policy(app)
    with Store.open(store_root, create=True) as store, open_io(source, output) as (src, out):
        parser = StreamParser()
        # a compressed save image is written back in its own format (libvirt_mdev/io/compress.py)
        sink = ImageSink(out.write)
        with StreamFilter(store, parser, opts, sink.write) as flt:
            layer = None
            front: EventConsumer = flt
            if policy is not None:
                from ..sign.layers import VerifyLayer
                front = layer = VerifyLayer(flt, policy)
            for progress in progress_reader(app, src, "strip" if mode == "token" else "splice"):
                for ev in iter_events(src, parser, progress=progress):
                    front.process(ev)
            if layer is not None:
                layer.finish()
            signer = check_signed(store, flt, layer, policy, app.config.require_signature)
            sink.close()
            out.commit()
            flt.accept()
        # by default only for domains with mdevs: the restore hook asks for no other permit
        wanted = permit if permit is not None else bool(flt.bindings)
        if mode == "splice" and wanted and parser.kind == "save-image" and out.regular_file and flt.domain_uuid:
            _permit(app, flt.domain_uuid, out, signer)
        return flt.results


def _permit(app: AppContext, domain_uuid: str, out: Output, signer: str | None) -> None:
    from ..store.permit import write_permit
    try:
        st = os.lstat(out.path)
    except OSError as exc:
        raise UsageError(f"{out.path}: {exc.strerror} right after it was written; no restore permit written") from None
    if st.st_ino != out.ino:
        raise UsageError(f"{out.path} was replaced while it was written; no restore permit written")
    p = write_permit(app.config, domain_uuid, out.path, out.sha256, signer=signer)
    click.echo(f"restore permit for domain {domain_uuid}: {out.path} (signed by {signer or 'nobody'}), "
               f"valid until {p.expires} (unix time)", err=True)


def _report(app: AppContext, mode: str, output: str, results: list[DeviceResult], as_json: bool) -> None:
    if as_json:
        app.emit_json({"mode": mode, "output": output, "devices": [r.to_json() for r in results]})
        return
    def echo(line: str) -> None:
        click.echo(line, err=output == "-")  # with OUT '-', stdout carries the stream
    if not results:
        echo(f"{mode}: no VFIO device state in the stream")
    for r in results:
        echo(f"{r.idstr} mdev={r.mdev_uuid or '-'} type={r.mdev_type or '-'} bytes={r.length} "
             f"sha256={r.sha256} token={r.token}")


@click.command("strip")
@_common
@pass_app
def strip(app: AppContext, source: str, output: str, store_dir: Path | None, domain_xml: Path | None,
          migration_id: str | None, no_verify: bool, as_json: bool) -> None:
    """Move every VFIO device's state out of a stream into the trusted store.

    IN is a QEMU migration stream or a libvirt save image (`-` = stdin); OUT gets the
    same stream with each device-state block replaced by a small token record
    (`-` = stdout).  OUT appears only when complete.  Prints one line (or JSON
    object) per device: mdev, type, bytes, sha256 and its load token.  Use
    `libvirt-mdev splice` to put the state back, or `libvirt-mdev load` to deliver it.
    The states stay in the store until their tokens are spent or `store remove`.
    """
    results = run_filter(app, "token", source, output, store_dir, domain_xml, migration_id, no_verify, as_json)
    _report(app, "strip", output, results, as_json)


@click.command("splice")
@_common
@click.option("--permit/--no-permit", default=None,
              help="Write a restore permit for OUT (default: when the image's domain has mdev hostdevs).")
@pass_app
def splice(app: AppContext, source: str, output: str, store_dir: Path | None, domain_xml: Path | None,
           migration_id: str | None, no_verify: bool, as_json: bool, permit: bool | None) -> None:
    """Store and verify every VFIO device's state, and write the stream back.

    On a stream that still carries its device state, every byte of it is stored,
    hashed and re-verified, and OUT is byte-identical to IN.  On a stream made by
    `strip`, each token record is resolved in the store, the state is re-hashed, and
    the original blocks are written back: OUT is byte-identical to the stream that
    was stripped.  A missing, tampered or mismatched state is an error (exit 4).
    Signed images (`libvirt-mdev sign`) are verified against trusted_keys and their
    signed records removed; with require_signature, unsigned ones are refused (exit 11).
    A save image spliced into a file gets a restore permit for the restore hook.
    """
    results = run_filter(app, "splice", source, output, store_dir, domain_xml, migration_id, no_verify, as_json,
                         permit)
    _report(app, "splice", output, results, as_json)
