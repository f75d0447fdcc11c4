"""The codec on streams the QEMU on PATH writes at test time: virtio-mem (early-setup
section), mapped-ram (one and several channels), xbzrle, return path with switchover-ack,
q35 and pc; then synthetic VFIO devices injected in QEMU's exact framing (v2, with
DEV_INIT_DATA_SENT) and accounted for exactly; then every libvirt save format made from a
real stream, stripped and spliced through libvirt_mdev.io.compress.

Features are probed on the QEMU itself: on Debian 12's QEMU 7.2 (no virtio-mem
early-setup, no mapped-ram, no switchover-ack) those tests skip.
"""
from __future__ import annotations

import hashlib
import io
import subprocess
from pathlib import Path

import pytest

from libvirt_mdev.errors import UnsupportedStream
from libvirt_mdev.io.compress import ImageSink, compress_args, open_image
from libvirt_mdev.store import Store
from libvirt_mdev.stream import Command, Opaque, SectionFull, SectionHeader, StreamParser, StreamWriter, iter_events
from libvirt_mdev.stream.saveimage import encode_header
from libvirt_mdev.stream.wire import MigCommand, SaveFormat, SectionType
from libvirt_mdev.summary import Summarizer
from testkit.synth import SyntheticVfioDevice, inject

from .qemu_now import Guest, has_device, live_stream_of, qemu_binary, run_filter, stream_of, virtio_mem_args
from .test_real_streams import _check_accounting

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(qemu_binary() is None, reason="no qemu-system-x86_64")]

_CAPS: dict[str, set[str]] = {}


def qemu_caps(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    if "caps" not in _CAPS:
        with Guest(tmp_path_factory.mktemp("probe"), machine="pc", memory="64M") as g:
            _CAPS["caps"] = g.capabilities()
    return _CAPS["caps"]


def need_cap(tmp_path_factory: pytest.TempPathFactory, *caps: str) -> None:
    missing = [c for c in caps if c not in qemu_caps(tmp_path_factory)]
    if missing:
        pytest.skip(f"this QEMU has no migration capability {', '.join(missing)}")


def need_virtio_mem_early() -> None:
    if not has_device("virtio-mem-pci"):
        pytest.skip("this QEMU has no virtio-mem-pci")


VIRTIO_MEM = {"extra": virtio_mem_args(), "memory": "256M,maxmem=1G"}


def v2_devices(ack: bool = False) -> list[SyntheticVfioDevice]:
    return [SyntheticVfioDevice(idstr="0000:00:05.0/vfio", framing="v2", precopy_size=300_000,
                                stopcopy_size=3_000_017, seed=7, marker=b"MARK-Q10", switchover_ack=ack),
            SyntheticVfioDevice(idstr="0000:00:06.0/vfio", framing="v2", stopcopy_size=1, seed=8,
                                switchover_ack=ack)]


def summary_of(path: Path, framing: str | None = None) -> dict[tuple[str, int], int]:
    s = Summarizer()
    p = StreamParser()
    with open(path, "rb") as fh:
        for ev in iter_events(fh, p):
            s.add(ev)
    devices = s.finish(p).vfio
    if framing is not None:
        assert all(d.framing == framing for d in devices), [d.framing for d in devices]
    return {(d.idstr, d.instance_id): d.state_bytes for d in devices}


def check_injected(path: Path, tmp_path: Path, devs: list[SyntheticVfioDevice], framing: str | None = None) -> Path:
    out = tmp_path / (path.name + ".vfio")
    with open(out, "wb") as fh:
        inject(str(path), fh, devs)
    _check_accounting(out)
    assert summary_of(out, framing) == {(d.idstr, d.instance_id): d.state_bytes for d in devs}
    return out


def passthrough_identical(path: Path) -> None:
    out = io.BytesIO()
    with open(path, "rb") as fh, StreamWriter(out) as w:
        for ev in iter_events(fh, chunk=4093):
            w.write(ev)
    assert out.getvalue() == path.read_bytes()


@pytest.mark.parametrize("machine", ["q35", "pc"])
def test_virtio_mem_guest_stream(machine, tmp_path, tmp_path_factory):
    need_virtio_mem_early()
    path = stream_of(tmp_path / "q", tmp_path / f"vmem-{machine}.stream", machine, **VIRTIO_MEM)
    early = []
    iterative_open = False
    with open(path, "rb") as fh:
        for ev in iter_events(fh):
            if isinstance(ev, SectionHeader) and ev.type == SectionType.SECTION_START:
                iterative_open = True
            if isinstance(ev, SectionFull) and ev.idstr.endswith("/virtio-mem-device-early"):
                early.append((ev.idstr, iterative_open))
            if isinstance(ev, Opaque) and ev.what == "vmstate" and early and len(early) == 1:
                pass
    if not early:
        pytest.skip("this QEMU does not send virtio-mem's early-setup section")
    assert len(early) == 1 and early[0][1], "the early-setup section sits among the setup sections"
    _check_accounting(path)
    passthrough_identical(path)
    check_injected(path, tmp_path, v2_devices())


@pytest.mark.parametrize("channels", [1, 2])
def test_mapped_ram_stream(channels, tmp_path, tmp_path_factory):
    need_cap(tmp_path_factory, "mapped-ram")
    caps = ["mapped-ram"] + (["multifd"] if channels > 1 else [])
    params = {"multifd-channels": channels} if channels > 1 else None
    out = tmp_path / "mr.stream"
    stream_of(tmp_path / "q", out, "q35", caps=caps, params=params, uri=f"file:{out}")
    regions = 0
    pos = 0
    with open(out, "rb") as fh:
        for ev in iter_events(fh):
            assert ev.offset == pos
            pos = ev.end
            if isinstance(ev, Opaque) and ev.what == "mapped-ram":
                regions += len(ev.raw)
    assert pos == out.stat().st_size
    assert regions >= 256 << 20, "the RAMBlocks' bitmaps and pages are skipped exactly"
    _check_accounting(out)


def test_xbzrle_stream(tmp_path, tmp_path_factory):
    need_cap(tmp_path_factory, "xbzrle")
    path = stream_of(tmp_path / "q", tmp_path / "xb.stream", "pc", caps=["xbzrle"], run_for=1.0)
    _check_accounting(path)
    passthrough_identical(path)
    check_injected(path, tmp_path, v2_devices())


def test_return_path_and_switchover_ack(tmp_path, tmp_path_factory):
    """A migration that a real destination QEMU loaded, recorded on the way; then VFIO v2
    devices that end their first PART with DEV_INIT_DATA_SENT, as QEMU does with
    switchover-ack."""
    need_cap(tmp_path_factory, "return-path", "switchover-ack")
    kw = VIRTIO_MEM if has_device("virtio-mem-pci") else {}
    path = live_stream_of(tmp_path / "q", tmp_path / "rp.stream", "q35",
                          caps=["return-path", "switchover-ack"], **kw)  # type: ignore[arg-type]
    with open(path, "rb") as fh:
        cmds = [ev.command for ev in iter_events(fh) if isinstance(ev, Command)]
    assert MigCommand.OPEN_RETURN_PATH in cmds
    _check_accounting(path)
    # DEV_INIT_DATA_SENT is evidence of v2 whatever the machine type
    out = check_injected(path, tmp_path, v2_devices(ack=True), framing="v2")
    raw = out.read_bytes()
    parts = raw.count(bytes.fromhex("ffffffffef100005"))
    assert parts >= 2, "each device's INIT_DATA_SENT is in the stream"


# -- libvirt save formats, made from a real stream -------------------------------------

XML = (b"<domain type='kvm'><name>q10</name><uuid>7b7e1f4e-7d54-4b47-9c5e-000000000010</uuid></domain>\0")
AREA = XML + b"\0" * (4096 - len(XML))


def save_image(stream: Path, fmt: SaveFormat, dst: Path) -> Path:
    """A save image as libvirt writes it: header, XML area, then the stream through
    libvirt's compressor command for *fmt* (qemu_saveimage.c)."""
    with open(dst, "wb") as out:
        out.write(encode_header(b"LibvirtQemudSave", len(AREA), 1, int(fmt), 0) + AREA)
        out.flush()
        with open(stream, "rb") as src:
            if fmt == SaveFormat.RAW:
                out.write(src.read())
            else:
                # through a pipe, as libvirt does (gzip stamps a regular file's mtime, a pipe's as 0)
                subprocess.run(compress_args(fmt), input=src.read(), stdout=out, check=True)
    return dst


def file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while b := fh.read(1 << 20):
            h.update(b)
    return h.hexdigest()


def decompressed(path: Path) -> bytes:
    out = io.BytesIO()
    with open(path, "rb") as raw, open_image(raw) as src:
        while chunk := src.read(1 << 20):
            out.write(chunk)
    return out.getvalue()


COMPRESSED = [SaveFormat.GZIP, SaveFormat.BZIP2, SaveFormat.XZ, SaveFormat.LZOP, SaveFormat.ZSTD]


@pytest.fixture(scope="module")
def injected_stream(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[SyntheticVfioDevice]]:
    d = tmp_path_factory.mktemp("fmt")
    kw = VIRTIO_MEM if has_device("virtio-mem-pci") else {}
    path = stream_of(d / "q", d / "plain.stream", "q35", **kw)  # type: ignore[arg-type]
    devs = v2_devices()
    out = d / "injected.stream"
    with open(out, "wb") as fh:
        inject(str(path), fh, devs)
    return out, devs


@pytest.mark.parametrize("fmt", COMPRESSED, ids=lambda f: f.name.lower())
def test_compressed_save_image_strip_splice(fmt, injected_stream, tmp_path):
    stream, devs = injected_stream
    image = save_image(stream, fmt, tmp_path / f"img.{fmt.name.lower()}")
    # refused as stored, with the way out; read through the tool, every device accounted for
    with pytest.raises(UnsupportedStream, match=f"{fmt.name.lower()}-compressed"), open(image, "rb") as fh:
        for _ in iter_events(fh):
            pass
    s = Summarizer()
    p = StreamParser()
    with open(image, "rb") as raw, open_image(raw) as src:
        for ev in iter_events(src, p):
            s.add(ev)
    summ = s.finish(p)
    assert summ.kind == "save-image" and summ.domain_name == "q10"
    assert {(d.idstr, d.instance_id): d.state_bytes for d in summ.vfio} == {
        (d.idstr, d.instance_id): d.state_bytes for d in devs}
    # a validating copy through the same tools is byte-identical
    copy = tmp_path / "copy"
    with open(image, "rb") as raw, open_image(raw) as src, open(copy, "wb") as out:
        sink = ImageSink(out.write)
        with StreamWriter(sink) as w:
            for ev in iter_events(src):
                w.write(ev)
        sink.close()
    if fmt == SaveFormat.LZOP:
        # lzop stamps the current time into its header even for a pipe: equal once decompressed
        assert decompressed(copy) == decompressed(image)
    else:
        assert copy.read_bytes() == image.read_bytes()
    # strip then splice: the image keeps its format and decompresses to the original stream
    with Store.open(tmp_path / "store", create=True) as store:
        stripped, spliced = tmp_path / "stripped", tmp_path / "spliced"
        res = run_filter(image, stripped, store, "token")
        assert sorted(r.length for r in res) == sorted(d.state_bytes for d in devs)
        assert stripped.read_bytes()[:92] == image.read_bytes()[:92]
        assert b"MARK-Q10" not in decompressed(stripped)
        run_filter(stripped, spliced, store, "splice")
    assert spliced.read_bytes()[:92] == image.read_bytes()[:92]
    assert hashlib.sha256(decompressed(spliced)).digest() == hashlib.sha256(decompressed(image)).digest()
    # the tool itself (what virsh restore runs) agrees
    tail = spliced.read_bytes()[92 + len(AREA):]
    plain = subprocess.run([*compress_args(fmt)[:1], "-dc"], input=tail, capture_output=True, check=True).stdout
    assert plain == stream.read_bytes()


def test_sparse_save_image_is_inspected(tmp_path, tmp_path_factory):
    """libvirt's sparse format: header and XML, then QEMU's mapped-ram stream written at
    the file offset right after them (offsets in the stream are absolute)."""
    need_cap(tmp_path_factory, "mapped-ram")
    image = tmp_path / "sparse.save"
    head = encode_header(b"LibvirtQemudSave", len(AREA), 1, int(SaveFormat.SPARSE), 0) + AREA
    # QEMU truncates a file: target, so the header goes in afterwards (libvirt passes an fd instead)
    stream_of(tmp_path / "q", image, "q35", caps=["mapped-ram"], uri=f"file:{image},offset={len(head)}")
    with open(image, "r+b") as fh:
        assert fh.read(len(head)) == b"\0" * len(head)
        fh.seek(0)
        fh.write(head)
    s = Summarizer()
    p = StreamParser()
    with open(image, "rb") as fh:
        for ev in iter_events(fh, p):
            s.add(ev)
    summ = s.finish(p)
    assert summ.kind == "save-image" and "mapped-ram" in summ.capabilities
    # strip and splice keep it byte-identical and sparse
    with Store.open(tmp_path / "store", create=True) as store:
        run_filter(image, tmp_path / "st", store, "token")
        run_filter(tmp_path / "st", tmp_path / "sp", store, "splice")
    assert file_sha(tmp_path / "sp") == file_sha(image)
    assert (tmp_path / "sp").stat().st_blocks * 512 < (16 << 20) < image.stat().st_size
    # a sparse header on a sequential stream (or the reverse) is refused
    bad = tmp_path / "bad.save"
    save_image(stream_of(tmp_path / "q", tmp_path / "seq.stream", "pc"), SaveFormat.RAW, bad)
    data = bytearray(bad.read_bytes())
    data[28:32] = int(SaveFormat.SPARSE).to_bytes(4, "little")
    with pytest.raises(Exception, match="mapped-ram"):
        for _ in iter_events(io.BytesIO(bytes(data))):
            pass
