"""``libvirt-mdev inspect PATH``: what is in a migration stream or save image."""
from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, BinaryIO

import click

from ..errors import NotFound, UsageError
from ..io.compress import open_image
from ..io.drive import ByteSource, iter_events
from ..stream import StreamParser
from ..summary import StreamSummary, Summarizer
from .context import AppContext, pass_app

if TYPE_CHECKING:
    from click._termui_impl import ProgressBar


def open_input(path: str) -> BinaryIO:
    """*path* opened for binary reading; ``-`` is standard input."""
    if path == "-":
        return sys.stdin.buffer
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise NotFound(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{path}: is a directory, expected a stream or save image") from None
    except OSError as exc:
        raise UsageError(f"{path}: cannot open: {exc.strerror}") from None


def progress_reader(app: AppContext, src: ByteSource | BinaryIO, label: str) -> Iterator[Callable[[int], None] | None]:
    """A progress callback drawing a bar on a terminal, or None when not on one."""
    if not app.progress_enabled():
        yield None
        return
    try:
        total = os.fstat(src.fileno()).st_size or None
    except (OSError, ValueError):
        total = None
    progress: ProgressBar[int] = click.progressbar(length=total, label=label, file=sys.stderr)
    with progress as bar:
        yield bar.update


def summarize(app: AppContext, path: str) -> StreamSummary:
    raw = open_input(path)
    parser = StreamParser()
    summ = Summarizer()
    with raw:
        for progress in progress_reader(app, raw, "inspect"):
            # a compressed save image is read through libvirt's own decompressor
            with open_image(raw) as src:
                for ev in iter_events(src, parser, progress=progress):
                    summ.add(ev)
    return summ.finish(parser)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def print_table(s: StreamSummary, all_sections: bool) -> None:
    echo = click.echo
    echo(f"kind:          {s.kind}")
    if s.kind == "save-image":
        echo(f"domain:        {s.domain_name or '?'}  uuid {s.domain_uuid or '?'}"
             f"{'' if s.save_image_complete else '  (INCOMPLETE: LibvirtQemudPart)'}")
    echo(f"size:          {s.size} bytes ({_human(s.size)})")
    echo(f"machine:       {s.machine_type or '?'}"
         + (f"  capabilities: {', '.join(s.capabilities)}" if s.capabilities else ""))
    echo(f"ram:           {s.ram_records} records, {s.ram_pages} pages, {s.ram_zero_pages} zero pages")
    echo(f"sections:      {len(s.sections)} records, {len({r.section_id for r in s.sections})} ids"
         f"; vmdesc {f'{s.vmdesc_bytes} bytes' if s.vmdesc_bytes is not None else 'absent'}")
    echo("")
    if s.vfio:
        echo(f"{'VFIO DEVICE (idstr)':32} {'INST':>4} {'ID':>5} {'STATE BYTES':>14} {'BLOCKS':>7} "
             f"{'TOKENS':>6} {'CONFIG':>7} FRAMING")
        for d in s.vfio:
            echo(f"{d.idstr:32} {d.instance_id:>4} {d.section_id:>5} {d.state_bytes:>14} {d.blocks:>7} "
                 f"{d.token_records:>6} {d.config_bytes:>7} {d.framing}")
        if any(d.token_records for d in s.vfio):
            echo("(TOKENS: device state was stripped into the store; `libvirt-mdev splice` puts it back)")
    else:
        echo("VFIO devices:  none")
    echo("")
    rows = s.sections if all_sections else [r for r in s.sections if r.type in ("START", "FULL")]
    echo(f"{'TYPE':5} {'ID':>5} {'IDSTR':34} {'INST':>4} {'VER':>4} {'OFFSET':>12} {'LENGTH':>12}")
    for r in rows:
        echo(f"{r.type:5} {r.section_id:>5} {r.idstr[:34]:34} {r.instance_id:>4} {r.version_id:>4} "
             f"{r.offset:>12} {r.length:>12}")
    if not all_sections and len(rows) != len(s.sections):
        echo(f"({len(s.sections) - len(rows)} PART/END records not shown; use --all)")


@click.command("inspect")
@click.argument("path", metavar="PATH")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of the table.")
@click.option("--all", "all_sections", is_flag=True, help="List PART and END records too.")
@pass_app
def inspect(app: AppContext, path: str, as_json: bool, all_sections: bool) -> None:
    """List the sections and VFIO devices of a migration stream or save image.

    PATH is a raw QEMU migration stream (QMP `migrate` to a file, mapped-ram
    included) or a libvirt save image (`virsh save`, managed save) in any
    --image-format: raw, sparse, or gzip/bzip2/xz/lzop/zstd (read through that
    program, as libvirt does); `-` reads standard input.  The whole
    stream is parsed exactly as the filter would: a malformed, truncated or unsafe
    stream is an error (exit 3) naming the byte offset.  Nothing is written.

    JSON fields: kind ("stream" | "save-image"), size, machine_type, sections
    (type, section_id, idstr, instance_id, version_id, offset, length), vfio
    (idstr, instance_id, section_id, state_bytes, blocks, config_bytes, framing),
    and for save images domain_name, domain_uuid, save_image_complete.
    """
    summary = summarize(app, path)
    if as_json:
        app.emit_json(summary.to_json())
    else:
        print_table(summary, all_sections)
