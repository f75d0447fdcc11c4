"""strip / splice on compressed save images through the CLI (issue 13): the output keeps the
image's format, its device state is exactly accounted for, and splice restores the stream."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from libvirt_mdev.io.compress import compress_args, open_image
from libvirt_mdev.stream import SaveImageHeader, iter_events
from libvirt_mdev.stream.saveimage import encode_header
from libvirt_mdev.stream.wire import SAVE_HEADER_LEN, SaveFormat

from .saveimg import U5, U6, cli, domain_xml, save_image

XML = domain_xml({5: U5, 6: U6}, types={U5: "nvidia-63", U6: "nvidia-63"})


def compressed_copy(raw: Path, fmt: SaveFormat, dst: Path) -> Path:
    """The same image as libvirt writes it with save_image_format = *fmt*."""
    with open(raw, "rb") as fh:
        hdr = next(ev for ev in iter_events(fh) if isinstance(ev, SaveImageHeader))
    data = raw.read_bytes()
    area = data[SAVE_HEADER_LEN:SAVE_HEADER_LEN + hdr.data_len]
    with open(dst, "wb") as out:
        out.write(encode_header(hdr.magic, hdr.data_len, hdr.was_running, int(fmt), hdr.cookie_offset) + area)
        out.flush()
        subprocess.run(compress_args(fmt), input=data[SAVE_HEADER_LEN + hdr.data_len:], stdout=out, check=True)
    return dst


def stream_part(path: Path) -> bytes:
    parts = []
    with open(path, "rb") as raw, open_image(raw) as src:
        while chunk := src.read(1 << 20):
            parts.append(chunk)
    return b"".join(parts)


@pytest.mark.parametrize("fmt", [SaveFormat.GZIP, SaveFormat.ZSTD], ids=lambda f: f.name.lower())
def test_cli_strip_splice_compressed_image(tmp_path: Path, fmt: SaveFormat) -> None:
    raw = save_image(tmp_path / "vm.save", XML)
    img = compressed_copy(raw, fmt, tmp_path / f"vm.{fmt.name.lower()}")
    cfg = tmp_path / "lm.conf"
    cfg.write_text(f"[libvirt-mdev]\nstore = {tmp_path / 'store'}\nruntime_dir = {tmp_path / 'run'}\n")
    r = cli("strip", str(img), str(tmp_path / "stripped"), "--json", config=cfg)
    assert r.returncode == 0, r.stderr
    devices = json.loads(r.stdout)["devices"]
    assert len(devices) == 2
    stripped = (tmp_path / "stripped").read_bytes()
    assert stripped[:SAVE_HEADER_LEN] == img.read_bytes()[:SAVE_HEADER_LEN]   # same header: same format
    r = cli("splice", str(tmp_path / "stripped"), str(tmp_path / "back"), config=cfg)
    assert r.returncode == 0, r.stderr
    original = stream_part(img)
    # read through the decompressor, the image is the raw image's stream
    assert original[SAVE_HEADER_LEN + 16:] == raw.read_bytes()[SAVE_HEADER_LEN + 16:]
    assert stream_part(tmp_path / "back") == original          # splice: the decompressed stream is identical
