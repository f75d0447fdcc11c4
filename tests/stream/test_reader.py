"""The parser on hand-built streams: events, byte identity at any chunking, errors."""
from __future__ import annotations

import random

import pytest

from libvirt_mdev.errors import StreamError, UnsupportedStream, UsageError
from libvirt_mdev.stream import (
    NEED_DATA,
    Eof,
    RamRecords,
    SectionHeader,
    StreamEnd,
    StreamParser,
    VMDescription,
)
from libvirt_mdev.stream.wire import BE64, MigCommand, RamFlag, VfioFlag
from libvirt_mdev.stream.writer import (
    encode_command,
    encode_eof,
    encode_file_header,
    encode_footer,
    encode_section_part,
    encode_section_start,
    encode_vfio_block,
    encode_vfio_marker,
)

from .builders import PAGE, full, ram_pages, ram_setup, small_stream


def parse(data: bytes, chunks: list[int] | None = None) -> list:
    """All events of *data*, fed in the given chunk sizes (default: whole)."""
    p = StreamParser()
    out = []
    pos = 0
    sizes = iter(chunks or [len(data)])
    while True:
        ev = p.next_event()
        if ev is NEED_DATA:
            if p.done:
                return out
            n = next(sizes, None) or len(data)
            piece = data[pos:pos + n]
            pos += len(piece)
            p.feed(piece)
            continue
        out.append(ev)
        # raw views are valid until the next feed: copy now
        object.__setattr__(ev, "raw", bytes(ev.raw))


def reassembled(events) -> bytes:
    return b"".join(bytes(e.raw) for e in events)


def test_events_of_a_small_stream():
    data = small_stream()
    evs = parse(data)
    headers = [(e.type.name, e.section_id, e.idstr) for e in evs if isinstance(e, SectionHeader)]
    assert headers == [("SECTION_START", 2, "ram"), ("SECTION_PART", 2, "ram"), ("SECTION_END", 2, "ram"),
                       ("SECTION_FULL", 0, "timer"), ("SECTION_FULL", 5, "cpu"),
                       ("SECTION_FULL", 9, "0000:00:02.0/virtio-net")]
    ram = [e for e in evs if isinstance(e, RamRecords)]
    assert sum(e.pages for e in ram) == 5 and sum(e.zero_pages for e in ram) == 7
    assert isinstance(evs[-1], StreamEnd) and isinstance(evs[-2], VMDescription) and isinstance(evs[-3], Eof)
    cpu_body = [e for e in evs if getattr(e, "what", "") == "vmstate" and e.section_id == 5]
    assert sum(len(e.raw) for e in cpu_body) == 49  # the fake footer inside stayed in the body


@pytest.mark.parametrize("how", ["whole", "bytewise", "random"])
def test_reassembly_is_byte_identical_at_any_chunking(how):
    data = small_stream()
    chunks = {"whole": None, "bytewise": [1] * len(data),
              "random": [random.Random(4).randint(1, 5000) for _ in range(len(data))]}[how]
    evs = parse(data, chunks)
    assert reassembled(evs) == data
    assert [type(e) for e in evs if not isinstance(e, RamRecords) and getattr(e, "what", "") != "vmstate"] == \
        [type(e) for e in parse(data) if not isinstance(e, RamRecords) and getattr(e, "what", "") != "vmstate"]


def test_every_truncation_is_a_stream_error_with_offset():
    data = small_stream(vmdesc=False)
    for cut in range(0, len(data) - 1, 97):
        with pytest.raises(StreamError) as ei:
            parse(data[:cut])
        assert ei.value.offset is not None and ei.value.offset <= cut
        assert "at byte" in str(ei.value)


def test_truncated_right_after_eof_is_complete():
    data = small_stream(vmdesc=False)
    assert isinstance(parse(data)[-1], StreamEnd)


def test_error_is_sticky_and_feed_after_eof_is_misuse():
    p = StreamParser()
    p.feed(b"XXXXXXXXXXXX")
    with pytest.raises(StreamError):
        p.next_event()
    with pytest.raises(StreamError):
        p.next_event()
    p2 = StreamParser()
    p2.feed(b"")
    with pytest.raises(UsageError):
        p2.feed(b"x")


def _stream_with(*records: bytes, ram: bool = True) -> bytes:
    """header, RAM setup, *records*, RAM completion, EOF.  Records that are FULL sections
    go after the RAM END, where QEMU puts the non-iterable device sections."""
    out = encode_file_header()
    iterative = [r for r in records if r[:1] != b"\x04"]
    full = [r for r in records if r[:1] == b"\x04"]
    if ram:
        out += ram_setup({"pc.ram": 8 * PAGE})
    out += b"".join(iterative)
    if ram:
        out += ram_pages(end=True, pattern="Z")
    return out + b"".join(full) + encode_eof()


def test_unknown_iterative_section_is_refused():
    rec = encode_section_start(7, "block", 0, 1) + b"\x00" * 16 + encode_footer(7)
    with pytest.raises(UnsupportedStream, match="'block'"):
        parse(_stream_with(rec))


def test_part_for_unknown_section_is_refused():
    with pytest.raises(StreamError, match="unknown section id 99"):
        parse(_stream_with(encode_section_part(99) + encode_footer(99)))


def test_wrong_footer_is_refused():
    bad = ram_pages(pattern="Z")[:-5] + encode_footer(3)
    with pytest.raises(StreamError, match="expected footer 7e 00000002"):
        parse(_stream_with(bad))


def test_unknown_ram_flags_and_bad_block_are_refused():
    rec = encode_section_part(2) + BE64.pack(0x400) + encode_footer(2)
    with pytest.raises(StreamError, match="unknown RAM record flags 0x400"):
        parse(_stream_with(rec))
    rec = encode_section_part(2) + BE64.pack(RamFlag.ZERO) + b"\x03foo\x00" + BE64.pack(RamFlag.EOS) + encode_footer(2)
    with pytest.raises(StreamError, match="unknown RAMBlock 'foo'"):
        parse(_stream_with(rec))


def test_postcopy_and_packaged_are_refused():
    with pytest.raises(UnsupportedStream, match="postcopy"):
        parse(_stream_with(encode_command(MigCommand.POSTCOPY_ADVISE, b"\x00" * 16)))
    with pytest.raises(StreamError, match="length 3"):
        parse(_stream_with(encode_command(MigCommand.PING, b"abc")))
    with pytest.raises(UnsupportedStream, match="POSTCOPY_RAM_DISCARD"):
        parse(_stream_with(encode_command(MigCommand.POSTCOPY_RAM_DISCARD, b"\x00\x03abc\x00")))


def test_data_after_the_end_is_refused():
    with pytest.raises(StreamError, match="data after"):
        parse(small_stream() + b"\x00")


def vfio_records(sid: int, state: bytes, idstr: str = "0000:00:05.0/vfio") -> tuple[bytes, bytes, bytes]:
    start = (encode_section_start(sid, idstr, 0, 1) + encode_vfio_marker(VfioFlag.DEV_SETUP_STATE)
             + encode_vfio_marker(VfioFlag.END_OF_STATE) + encode_footer(sid))
    end = (encode_section_part(sid, end=True) + encode_vfio_block(state)
           + encode_vfio_marker(VfioFlag.END_OF_STATE) + encode_footer(sid))
    cfg = (encode_section_start(sid, idstr, 0, 1, full=True) + encode_vfio_marker(VfioFlag.DEV_CONFIG_STATE)
           + b"\xaa" * 64 + encode_vfio_marker(VfioFlag.END_OF_STATE) + encode_footer(sid))
    return start, end, cfg


def test_vfio_blocks_are_reported_exactly():
    state = bytes(range(256)) * 40
    s, e, c = vfio_records(30, state)
    evs = parse(_stream_with(s, e, c), [7] * 100000)
    from libvirt_mdev.stream import VfioBlockData, VfioBlockEnd, VfioConfigData
    assert b"".join(bytes(x.raw) for x in evs if isinstance(x, VfioBlockData)) == state
    assert [x.size for x in evs if isinstance(x, VfioBlockEnd)] == [len(state)]
    assert sum(len(x.raw) for x in evs if isinstance(x, VfioConfigData)) == 64


def test_vfio_block_larger_than_the_stream_is_truncation():
    s, e, c = vfio_records(30, b"x" * 100)
    e = e.replace(BE64.pack(100), BE64.pack(1 << 30), 1)
    with pytest.raises(StreamError, match="stream ends inside a VFIO data block"):
        parse(_stream_with(s, e, c))


def test_vfio_unknown_tag_is_refused():
    s, e, c = vfio_records(30, b"x")
    bad = e.replace(encode_vfio_marker(VfioFlag.END_OF_STATE), BE64.pack(0xFFFFFFFFEF1000FF), 1)
    with pytest.raises(StreamError, match="unknown VFIO tag 0xffffffffef1000ff"):
        parse(_stream_with(s, bad, c))


def _bare_full(sid: int = 30) -> bytes:
    """QEMU 10's FULL section of a device with multifd device-state transfer: no config."""
    return (encode_section_start(sid, "0000:00:05.0/vfio", 0, 1, full=True)
            + encode_vfio_marker(VfioFlag.END_OF_STATE) + encode_footer(sid))


def _parsed_multifd_transfer_stream() -> StreamParser:
    """A parser that has read all of a live stream in which device 30's state travels on the side channels
    (its FULL section: _bare_full)."""
    s, e, _c = vfio_records(30, b"")
    p = StreamParser()
    p.feed(_stream_with(s, e, _bare_full()))
    p.feed(b"")
    while p.next_event() is not NEED_DATA:
        pass
    return p


def test_a_config_section_without_config_marks_multifd_transfer_in_a_live_stream():
    """The state and config of such a device travel on the side channels (filtered there,
    live/devstate.py); the main channel only records that they do, and that it is v2."""
    p = _parsed_multifd_transfer_stream()
    assert p.done and p.framing[30].multifd_transfer
    assert p.vfio_framing(30) == "v2"


def test_a_config_section_without_config_is_refused_in_a_save_image():
    """A save image cannot carry multifd device state: the state is missing."""
    from libvirt_mdev.stream.saveimage import encode_header
    s, e, _c = vfio_records(30, b"")
    area = b"<domain><name>g1</name></domain>\0" + b"\0" * 64
    data = encode_header(b"LibvirtQemudSave", len(area), 1, 0, 0) + area + _stream_with(s, e, _bare_full())
    with pytest.raises(UnsupportedStream, match="save image cannot carry"):
        parse(data)
    lr = _stream_with(s, e, _bare_full()).replace(_bare_full(), _bare_full()[:-13]
                                                   + encode_vfio_marker(VfioFlag.DEV_CONFIG_LOAD_READY)
                                                   + encode_footer(30))
    with pytest.raises(UnsupportedStream, match="DEV_CONFIG_LOAD_READY"):
        parse(lr)


def test_vfio_data_in_a_full_section_is_refused():
    """QEMU's loader would read DATA_STATE blocks in a FULL section too; QEMU never writes
    them there, so they are refused rather than passed."""
    s, e, _c = vfio_records(31, b"x", idstr="0000:00:07.0/vfio")
    rec = (encode_section_start(31, "0000:00:07.0/vfio", 0, 1, full=True) + encode_vfio_block(b"evil")
           + encode_vfio_marker(VfioFlag.DEV_CONFIG_STATE) + b"\x01" * 8
           + encode_vfio_marker(VfioFlag.END_OF_STATE) + encode_footer(31))
    with pytest.raises(StreamError, match="device data inside the config"):
        parse(_stream_with(s, e, rec))


def test_hidden_vfio_section_inside_a_vmstate_body_is_refused():
    """The divergence attack: a fake footer + plausible record inside a device body would
    let QEMU read a real VFIO section where we see opaque bytes.  The body guard refuses
    bodies that carry a VFIO section header or a VFIO PART/END."""
    s, e, c = vfio_records(30, b"x")
    hidden = vfio_records(40, b"payload", idstr="0000:00:09.0/vfio")[0]
    body = b"\x00" * 10 + encode_footer(5) + full(6, "fake", b"\x11" * 4)[:-5] + hidden + b"\x22" * 8
    with pytest.raises(StreamError, match="VFIO section header .*hidden inside the body"):
        parse(_stream_with(s, e, full(5, "serial", body), c))
    part = encode_section_part(30, end=True) + encode_vfio_block(b"more")
    with pytest.raises(StreamError, match="PART/END record of VFIO section id 30 is hidden"):
        parse(_stream_with(s, e, full(5, "serial", b"\x00" * 7 + part + b"\x00" * 3), c))


def test_section_order_rules():
    s, e, c = vfio_records(30, b"x")
    with pytest.raises(StreamError, match="second FULL"):
        parse(_stream_with(s, e, full(5, "serial", b"\x01"), full(5, "serial", b"\x01")))
    with pytest.raises(StreamError, match="appears with section id"):
        parse(_stream_with(s, e, full(5, "serial", b"\x01"), full(6, "serial", b"\x01")))
    with pytest.raises(StreamError, match="without the device's setup"):
        parse(_stream_with(c))
    with pytest.raises(StreamError, match="FULL section for the iterative handler 'ram'"):
        parse(_stream_with(full(9, "ram", b""), ram=False))
    early = encode_file_header() + ram_setup({"pc.ram": 8 * PAGE}) + full(5, "serial", b"\x01") + encode_eof()
    with pytest.raises(UnsupportedStream, match="early-setup"):
        parse(early)
    late = (encode_file_header() + ram_setup({"pc.ram": 8 * PAGE}) + ram_pages(end=True, pattern="Z")
            + full(5, "serial", b"\x01") + ram_pages(pattern="Z") + encode_eof())
    with pytest.raises(StreamError, match="after the END of section ram"):
        parse(late)
    # an iterable still open when the device sections begin is refused too (early-setup rule),
    # and a START after them
    late_start = (encode_file_header() + full(5, "serial", b"\x01") + ram_setup({"pc.ram": 8 * PAGE})
                  + encode_eof())
    with pytest.raises(StreamError, match="after the non-iterable device sections began"):
        parse(late_start)


def test_vmdesc_must_be_json():
    from libvirt_mdev.stream.writer import encode_vmdesc
    with pytest.raises(StreamError, match="not valid JSON"):
        parse(small_stream(vmdesc=False) + encode_vmdesc(b"{\x00\x01 not json"))


def test_save_image_header_is_parsed():
    from libvirt_mdev.stream import SaveImageHeader
    from libvirt_mdev.stream.saveimage import encode_header
    xml = b"<domain><name>g1</name><uuid>6a2f1c8e-0000-4000-8000-000000000001</uuid></domain>\0"
    area = xml + b"\0" * 100
    data = encode_header(b"LibvirtQemudSave", len(area), 1, 0, 0) + area + small_stream()
    evs = parse(data, [13] * 10000)
    hdr = evs[0]
    assert isinstance(hdr, SaveImageHeader) and hdr.complete and hdr.xml == xml[:-1]
    assert reassembled(evs) == data
    gz = encode_header(b"LibvirtQemudSave", len(area), 1, 1, 0) + area
    with pytest.raises(UnsupportedStream, match="gzip"):
        parse(gz)


def test_our_own_records_are_exact_and_outside_the_order_rules():
    """libvirt-mdev/... FULL records (signed statements) may sit between iterative
    sections; their ASCII body cannot hide a binary record."""
    ours = full(0xFFFFFFF0, "libvirt-mdev/signed-statement", b"LMDS1\n{\"a\":1}\nQUJD")
    data = (encode_file_header() + ours + ram_setup({"pc.ram": 8 * PAGE}) + ours
            + ram_pages(end=True, pattern="Z") + ours + encode_eof())
    evs = parse(data)
    assert [e.kind for e in evs if isinstance(e, SectionHeader)].count("libvirt-mdev") == 3
    assert reassembled(evs) == data
    binary = full(0xFFFFFFF0, "libvirt-mdev/signed-statement", b"LMDS1\n\x00\x01\xfe")
    with pytest.raises(StreamError, match="non-ASCII"):
        parse(encode_file_header() + binary + encode_eof())
    s, _e, _c = vfio_records(30, b"x")
    hiding = full(0xFFFFFFF0, "libvirt-mdev/signed-statement", b"LMDS1\n" + s)
    with pytest.raises(StreamError, match="hidden|non-ASCII"):
        parse(encode_file_header() + hiding + encode_eof())
    clash = full(2, "libvirt-mdev/x", b"ok")
    with pytest.raises(StreamError, match="with the id of section ram"):
        parse(encode_file_header() + ram_setup({"pc.ram": 8 * PAGE}) + clash + encode_eof())


def test_reports_name_a_device_whose_state_travels_on_multifd_channels():
    p = _parsed_multifd_transfer_stream()
    assert p.framing_of(30) == "v2+multifd"
