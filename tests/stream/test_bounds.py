"""Issue 12/13 stream items that need no QEMU: early-setup sections parsed exactly (and
crafted ones refused), iterative sections of unknown handlers refused whatever their
name, unfinished save images refused, and the vmdesc checked in bounded memory and
without recursion, measured in fresh child processes (VmHWM)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from libvirt_mdev.errors import StreamError, UnsupportedStream
from libvirt_mdev.stream import Opaque, SectionFull
from libvirt_mdev.stream.early import virtio_mem_bitmap_len
from libvirt_mdev.stream.saveimage import encode_header
from libvirt_mdev.stream.vmdesc import check_vmdesc
from libvirt_mdev.stream.wire import MAX_VMDESC_DEPTH, VIRTIO_MEM_EARLY_FIXED, VfioFlag
from libvirt_mdev.stream.writer import (
    encode_eof,
    encode_file_header,
    encode_footer,
    encode_section_start,
    encode_vfio_marker,
    encode_vmdesc,
)

from .builders import PAGE, full, ram_pages, ram_setup, small_stream
from .test_reader import parse, reassembled

EARLY = "0000:00:01.0/virtio-mem-device-early"


def early_body(region: int = 512 << 20, block: int = 2 << 20, bitmap: bytes | None = None) -> bytes:
    fixed = VIRTIO_MEM_EARLY_FIXED.pack(1 << 32, region, block, 0, 64 << 20)
    if bitmap is None:
        bitmap = b"\xff" * 4 + b"\0" * (virtio_mem_bitmap_len(region, block) - 4)
    return fixed + bitmap


def stream_with_early(body: bytes, version: int = 1, sid: int = 37) -> bytes:
    """QEMU 10's order: RAM START, then the early-setup FULL, then iterations."""
    return (encode_file_header() + ram_setup({"pc.ram": 8 * PAGE})
            + full(sid, EARLY, body, version=version)
            + ram_pages(end=True, pattern="PZ") + full(3, "timer", b"\0" * 24) + encode_eof())


def test_virtio_mem_early_section_is_exact():
    data = stream_with_early(early_body())
    evs = parse(data, [7] * 100000)
    assert reassembled(evs) == data
    pieces = [e for e in evs if isinstance(e, Opaque) and e.what == "virtio-mem-early"]
    assert sum(len(e.raw) for e in pieces) == len(early_body())


@pytest.mark.parametrize("body,version,match", [
    (early_body() + b"\0", 1, "footer"),                        # one byte more than QEMU reads
    (early_body()[:-1], 1, "footer"),                            # one byte less
    (early_body() + bytes.fromhex("7e00000025") + b"\0", 1, "footer|after EOF"),  # a fake footer + EOF
    (early_body(block=3 << 20), 1, "power-of-two"),
    (early_body(region=(512 << 20) + 4096), 1, "power-of-two"),
    (early_body(region=1 << 50, block=1 << 20, bitmap=b""), 1, "bitmap of"),
    (early_body(), 2, "version 2"),
])
def test_crafted_early_sections_are_refused(body, version, match):
    with pytest.raises(StreamError, match=match):
        parse(stream_with_early(body, version))


def test_hidden_vfio_section_cannot_ride_in_an_early_section():
    """A VFIO START hidden after the fields QEMU reads: the footer must follow at once."""
    hidden = (encode_section_start(99, "0000:00:05.0/vfio", 0, 1) + encode_vfio_marker(VfioFlag.DEV_SETUP_STATE)
              + encode_vfio_marker(VfioFlag.END_OF_STATE) + encode_footer(99))
    with pytest.raises(StreamError, match="footer"):
        parse(stream_with_early(early_body() + hidden))


def test_unknown_early_setup_section_keeps_its_refusal():
    data = (encode_file_header() + ram_setup({"pc.ram": 8 * PAGE}) + full(40, "0000:00:02.0/other-early", b"\1" * 8)
            + ram_pages(end=True) + encode_eof())
    with pytest.raises(UnsupportedStream, match="early-setup vmstate whose layout"):
        parse(data)


@pytest.mark.parametrize("idstr", ["libvirt-mdev/signed-statement", "libvirt-mdev/x", "timer", "block"])
def test_iterative_sections_of_unknown_handlers_are_refused(idstr):
    start = encode_section_start(50, idstr, 0, 1) + b"LMDS1\n" + encode_footer(50)
    data = encode_file_header() + start + ram_setup({"pc.ram": 8 * PAGE}) + ram_pages(end=True) + encode_eof()
    with pytest.raises(UnsupportedStream, match=f"iterative section {idstr!r}"):
        parse(data)


def test_unfinished_save_image_is_refused():
    area = b"<domain><name>g</name></domain>\0" + b"\0" * 64
    data = encode_header(b"LibvirtQemudPart", len(area), 1, 0, 0) + area + small_stream()
    with pytest.raises(UnsupportedStream, match="unfinished save image .*LibvirtQemudPart"):
        parse(data)


def test_vmdesc_checker_agrees_with_json_on_small_documents():
    good = [b'{}', b'{"a":[]}', b' {"a" : [1, -2.5e3, true, null, "x\\n", {"b": {}}]} ', b'{"k":"\\u00e9"}',
            json.dumps({"page_size": 4096, "devices": [{"name": "timer", "fields": [{"a": [1, [2, [3]]]}]}]}).encode()]
    bad = [b'', b'[]', b'"x"', b'{', b'{"a":}', b'{"a":1,}', b'{"a" 1}', b'{1:2}', b'{"a":[1 2]}', b'{"a":01}',
           b'{"a":1}{}', b'{"a":[}', b'{"a":]', b'{"a":tru}', b'{"a":"\x01"}', b'{"a":"\xc3\xa9"}', b'{"a":1.}',
           b'{"a":-}', b'{"a":[1,]}', b'{"a":+1}', b'{"a":1e}', b'{"a":{"b"}}']
    for doc in good:
        check_vmdesc(doc)
        assert isinstance(json.loads(doc), dict)
    for doc in bad:
        with pytest.raises(StreamError):
            check_vmdesc(doc)


def test_vmdesc_depth_limit_without_recursion():
    ok = b'{"a":' + b"[" * (MAX_VMDESC_DEPTH - 1) + b"]" * (MAX_VMDESC_DEPTH - 1) + b"}"
    check_vmdesc(ok)
    deep = b'{"a":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    with pytest.raises(StreamError, match=f"deeper than {MAX_VMDESC_DEPTH}"):
        parse(encode_file_header() + encode_eof() + encode_vmdesc(deep))


CHILD = Path(__file__).with_name("vmdesc_child.py")


@pytest.mark.parametrize("shape", ["empty-lists", "deep", "zeros", "objects", "strings", "pairs"])
def test_vmdesc_peak_memory_is_bounded_whatever_the_shape(shape):
    """The largest vmdesc allowed, in each hostile shape, parsed in a fresh process: its
    own peak RSS (VmHWM) stays under 200 MiB (json.loads took 1.7 GB for empty-lists)."""
    out = subprocess.run([sys.executable, str(CHILD), shape, str(64 << 20)], capture_output=True, text=True,
                         timeout=300, cwd=Path(__file__).parents[2], check=False)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["vmhwm"] < 200 << 20, res
    if shape == "deep":
        assert res["outcome"].startswith("refused") and "deeper" in res["outcome"]
    else:
        assert res["outcome"] == "accepted", res


def test_early_section_is_not_a_full_section_in_the_non_iterable_rules():
    """After the early-setup FULL, RAM PART/END are still accepted; after a normal FULL not."""
    evs = parse(stream_with_early(early_body()))
    assert [e.idstr for e in evs if isinstance(e, SectionFull)] == [EARLY, "timer"]
