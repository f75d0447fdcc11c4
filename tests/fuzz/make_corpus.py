"""Build the seed corpora of the atheris harnesses from a real QEMU migration stream.

Usage::

    python3 -m tests.fuzz.make_corpus OUTDIR [--stream REAL_STREAM]

Without ``--stream`` a real stream is made first: QEMU 7.2 (TCG, 256 MiB, the harness's
device set) migrated to a file over QMP, as the ``real_qmp_stream`` fixture does.

Seeds must be small (the fuzzer mutates every byte of them), so the real stream is cut
down while keeping its framing real:

* ``elided``: every record of the real stream, with each RAM section's page records
  cut after the first few KiB (the RAM payload stays well-formed: a prefix of whole
  records, then QEMU's own EOS).  All the real device sections (FULL vmstate bodies
  with their footer-lookalike bytes), the configuration and the vmdesc stay as QEMU
  wrote them.
* ``elided`` with synthetic VFIO devices injected (v1 and v2 framing, small states),
  so the VFIO grammar is in the corpus;
* a libvirt save image wrapping the injected stream (the ``save-image`` target);
* prefixes of the real stream (truncations) and windows of it.

Layout: ``OUTDIR/<target>/<name>`` for targets stream, saveimage, filter, token, domain.
The stream target's inputs start with one chunking-selector byte (targets.run_stream).
"""
from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from libvirt_mdev.stream import RamEos, RamRecords, SectionFooter, SectionHeader, VMDescription, iter_events
from libvirt_mdev.stream.saveimage import encode_header
from libvirt_mdev.stream.wire import BE64, SAVE_MAGIC_COMPLETE, RamFlag, SaveFormat, SectionType
from libvirt_mdev.stream.writer import encode_vmdesc
from testkit.synth import SyntheticVfioDevice, inject

REPO = Path(__file__).resolve().parents[2]
#: bytes of RAM records kept per RAM section in the elided stream
KEEP_RAM = 6 << 10

DOMAIN_XML = b"""<domain type='kvm'><name>fuzz</name><uuid>0f3e2b44-91aa-4b8f-8a1c-2a9c1d7e5b10</uuid>
<memory unit='KiB'>262144</memory><os><type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type></os>
<devices><hostdev mode='subsystem' type='mdev' model='vfio-pci'><source>
<address uuid='4b20d080-1b54-4048-85b3-a6a62d165c01'/></source>
<address type='pci' domain='0x0000' bus='0x00' slot='0x05' function='0x0'/></hostdev>
<hostdev mode='subsystem' type='mdev' model='vfio-pci'><source>
<address uuid='4b20d080-1b54-4048-85b3-a6a62d165c02'/></source>
<address type='pci' domain='0x0000' bus='0x00' slot='0x06' function='0x0'/></hostdev>
</devices></domain>"""


def elide(real: Path, keep: int = KEEP_RAM) -> bytes:
    """The real stream with each RAM section's page records cut after *keep* bytes."""
    out = io.BytesIO()
    kept = 0
    cutting = False
    with open(real, "rb") as fh:
        for ev in iter_events(fh):
            if isinstance(ev, SectionHeader):
                kept, cutting = 0, False
            elif isinstance(ev, RamEos):
                cutting = False
            elif isinstance(ev, RamRecords):
                # only stop at the start of a record (a body continuation has records == 0)
                if not cutting and ev.records and kept >= keep:
                    cutting = True
                if cutting:
                    continue
                raw = bytes(ev.raw)
                if ev.records > 1:
                    # a fast-path run of CONTINUE zero/full pages: keep whole records only
                    raw = _cut_run(raw, keep - kept)
                    cutting = len(raw) < len(ev.raw)
                kept += len(raw)
                out.write(raw)
                continue
            out.write(ev.raw)
    return out.getvalue()


def _drop_sections(stream: bytes, hold: Callable[[SectionHeader], bool],
                   keep: Callable[[SectionHeader, int], bool]) -> bytes:
    """*stream* with a tiny vmdesc, and without each section that *hold* picks (by its header) and *keep* then
    rejects (by its header and its size in bytes, header to footer)."""
    out = io.BytesIO()
    held: list[bytes] | None = None
    header: SectionHeader | None = None
    for ev in iter_events(io.BytesIO(stream)):
        raw = bytes(ev.raw)
        if isinstance(ev, SectionHeader) and hold(ev):
            header, held = ev, []
        if isinstance(ev, VMDescription):
            raw = encode_vmdesc(b'{"page_size":4096,"devices":[]}')
        if held is None:
            out.write(raw)
            continue
        held.append(raw)
        if isinstance(ev, SectionFooter):
            assert header is not None
            if keep(header, sum(map(len, held))):
                out.write(b"".join(held))
            held = None
    return out.getvalue()


def mini(stream: bytes, max_full: int = 600) -> bytes:
    """*stream* without FULL sections bigger than *max_full* bytes and with a tiny
    vmdesc: a seed of a few KiB that libFuzzer can mutate quickly."""
    return _drop_sections(stream, lambda h: h.type == SectionType.SECTION_FULL and h.kind != "vfio",
                          lambda h, size: size <= max_full)


def micro(stream: bytes, max_full: int = 200) -> bytes:
    """Only the file header, configuration, VFIO sections, other sections of at most
    *max_full* bytes (RAM setup and page-less RAM parts, small vmstate), EOF and a
    tiny vmdesc: a seed of a few hundred bytes."""
    return _drop_sections(stream, lambda h: True, lambda h, size: h.kind == "vfio" or size <= max_full)


def _cut_run(run: bytes, budget: int, page_bits: int = 12) -> bytes:
    """The leading whole records of a run of CONTINUE zero (9 bytes) / page records."""
    pos = 0
    while pos < len(run) and pos < max(budget, 1):
        (v,) = BE64.unpack_from(run, pos)
        pos += 9 if v & RamFlag.ZERO else 8 + (1 << page_bits)
    return run[:pos]


def small_devices() -> list[SyntheticVfioDevice]:
    return [SyntheticVfioDevice(idstr="0000:00:05.0/vfio", precopy_size=300, stopcopy_size=700,
                                block_size=256, config_size=64, seed=3, marker=b"STATE-A"),
            SyntheticVfioDevice(idstr="0000:00:06.0/vfio", stopcopy_size=200, framing="v2",
                                block_size=128, config_size=40, seed=4, marker=b"STATE-B")]


def with_devices(stream: bytes, devices: list[SyntheticVfioDevice]) -> bytes:
    with tempfile.NamedTemporaryFile(suffix=".stream") as src:
        src.write(stream)
        src.flush()
        out = io.BytesIO()
        inject(src.name, out, devices)
        return out.getvalue()


def save_image(stream: bytes, xml: bytes = DOMAIN_XML) -> bytes:
    area = xml + b"\0"
    area += b"\0" * (-len(area) % 512)
    return encode_header(SAVE_MAGIC_COMPLETE, len(area), 1, SaveFormat.RAW, 0) + area + stream


def make_real_stream(workdir: Path) -> Path:
    """A raw QEMU migration stream of a running TCG VM (needs qemu-system-x86_64)."""
    sys.path.insert(0, str(REPO))
    from tests.harness.qemu_vm import QemuVM
    path = workdir / "real.stream"
    with QemuVM(workdir, name="corpus-src", memory_mib=256) as vm:
        time.sleep(0.5)
        vm.migrate_to_file(path)
    return path


def build(outdir: Path, real: Path) -> dict[str, int]:
    """Write every corpus; returns the number of seeds per target."""
    raw = real.read_bytes()
    el = elide(real)
    inj1 = with_devices(el, small_devices())
    inj2 = with_devices(el, small_devices()[1:])
    seeds: dict[str, dict[str, bytes]] = {t: {} for t in ("stream", "saveimage", "filter", "token", "domain")}
    small = elide(real, 0)
    mini_el = mini(small)
    streams = {"elided": el, "vfio2": inj1, "vfio1": inj2, "mini": mini_el,
               "mini-vfio2": mini(with_devices(small, small_devices())),
               "mini-vfio1": mini(with_devices(small, small_devices()[1:]))}
    tiny = [SyntheticVfioDevice(idstr="0000:00:05.0/vfio", precopy_size=24, stopcopy_size=40, block_size=16,
                                config_size=12, seed=5),
            SyntheticVfioDevice(idstr="vfio", instance_id=1, stopcopy_size=20, framing="v2", block_size=8,
                                config_size=8, seed=6)]
    streams["micro"] = micro(mini_el)
    streams["micro-vfio2"] = micro(with_devices(small, tiny))
    streams["micro-vfio1"] = micro(with_devices(small, tiny[1:]))
    streams["vfio-only"] = micro(with_devices(small, tiny), max_full=0)
    for n in (16, 64, 300, 1024, 4096):
        streams[f"prefix-{n}"] = raw[:n]
    for name, data in streams.items():
        for sel in (0, 3, 9):  # whole, 2-byte and 64-byte chunks (targets._CHUNKS)
            seeds["stream"][f"{name}-c{sel}"] = bytes([sel]) + data
    seeds["stream"]["saveimage-c0"] = b"\0" + save_image(inj1)
    seeds["saveimage"] = {"vfio": save_image(inj1), "plain": save_image(el, b"<domain><name>x</name></domain>"),
                          "header-only": save_image(b"")[:92]}
    seeds["filter"] = {"vfio2": inj1, "vfio1": inj2, "elided": el, "saveimage": save_image(inj1),
                       "mini-vfio2": streams["mini-vfio2"], "mini-vfio1": streams["mini-vfio1"]}
    seeds["saveimage"]["mini-vfio"] = save_image(streams["mini-vfio2"], DOMAIN_XML)
    seeds["token"] = {"good-shape": b"mdev-state-v1:" + b"0" * 64, "bad": b"mdev-state-v1:../../etc/passwd",
                      "empty": b""}
    seeds["domain"] = {"mdev": DOMAIN_XML}
    for p in sorted((REPO / "examples" / "hosts").glob("*.xml")):
        seeds["domain"][p.stem] = p.read_bytes()
    counts = {}
    for target, items in seeds.items():
        d = outdir / target
        d.mkdir(parents=True, exist_ok=True)
        for name, data in items.items():
            (d / name).write_bytes(data)
        counts[target] = len(items)
    return counts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--stream", type=Path, help="a real QEMU migration stream (default: make one with QEMU)")
    args = ap.parse_args(argv)
    real = args.stream
    if real is None:
        work = Path(tempfile.mkdtemp(prefix="lm-corpus-"))
        real = make_real_stream(work)
    counts = build(args.outdir, real)
    for target, n in counts.items():
        print(f"{target}: {n} seeds in {args.outdir / target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
