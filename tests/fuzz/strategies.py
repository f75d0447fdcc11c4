"""Hypothesis strategies that build VALID QEMU migration streams from the package's own
encoders (libvirt_mdev.stream.writer) plus RAM records, synthetic VFIO sections, FULL
vmstate sections and commands, in the order QEMU's savevm writes them.

A generated stream comes with what it contains (:class:`Built`), so properties can check
the parser saw exactly that, not just that it did not crash.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from hypothesis import strategies as st

from libvirt_mdev.stream.wire import BE32, BE64, CONFIG_SUB_PAGE_BITS, MigCommand, RamFlag, SectionType, VfioFlag
from libvirt_mdev.stream.writer import (
    encode_command,
    encode_configuration,
    encode_eof,
    encode_file_header,
    encode_footer,
    encode_section_part,
    encode_section_start,
    encode_vfio_block,
    encode_vfio_marker,
    encode_vmdesc,
)

RAM_SID = 2
MACHINES = ("pc-i440fx-7.2", "pc-q35-8.2", "pc-q35-10.0", "virt-9.1")
VMSTATE_NAMES = ("timer", "cpu", "0000:00:02.0/virtio-net", "apic", "kvmclock", "fw_cfg", "serial")


@dataclass
class Built:
    """A generated stream and what is in it."""

    data: bytes
    sections: int = 0          # section records (START/PART/END/FULL)
    commands: int = 0
    vfio_blocks: list[int] = field(default_factory=list)  # sizes of every VFIO data block, in order
    vfio_state: dict[int, bytes] = field(default_factory=dict)  # section id -> concatenated state
    pages: int = 0
    zero_pages: int = 0
    vmdesc: bool = False


def _subsection(name: str, payload: bytes, version: int = 1) -> bytes:
    raw = name.encode()
    return bytes([SectionType.SUBSECTION, len(raw)]) + raw + BE32.pack(version) + payload


def _no_false_footer(body: bytes, sid: int, terminator: bytes = b"") -> bytes:
    """Break every ``terminator 7e <sid>`` inside *body*, so the only footer is the real one."""
    pat = terminator + encode_footer(sid)
    while pat in body:
        body = body.replace(pat, pat[:-1] + bytes([(pat[-1] + 1) & 0xFF]))
    return body


@st.composite
def ram_records(draw, page_bits: int, block: str) -> tuple[bytes, int, int]:
    """(payload without EOS, pages, zero pages): the first record names the block."""
    page = 1 << page_bits
    out = b""
    pages = zeros = 0
    n = draw(st.integers(0, 6))
    for i in range(n):
        kind = draw(st.sampled_from(["zero", "page"]))
        flags = RamFlag.ZERO if kind == "zero" else RamFlag.PAGE
        addr = draw(st.integers(0, 63)) << page_bits
        if i:
            flags |= RamFlag.CONTINUE
        out += BE64.pack(addr | flags)
        if not i:
            out += bytes([len(block)]) + block.encode()
        if kind == "zero":
            out += b"\0"
            zeros += 1
        else:
            fill = draw(st.binary(min_size=0, max_size=16))
            out += (fill * (page // max(1, len(fill)) + 1))[:page] if fill else bytes(page)
            pages += 1
    return out, pages, zeros


@st.composite
def vmstate_full(draw, sid: int, index: int) -> bytes:
    # QEMU gives each (idstr, instance) one section id: names are distinct per stream
    name = VMSTATE_NAMES[index % len(VMSTATE_NAMES)]
    body = draw(st.binary(max_size=80))
    # bodies full of footer lookalikes of *other* ids and of ours followed by junk
    if draw(st.booleans()):
        body += encode_footer(sid) + b"\x99" + draw(st.binary(max_size=8))
    body = _no_false_footer_strict(body, sid)
    return encode_section_start(sid, name, draw(st.integers(0, 3)), draw(st.integers(1, 20)), full=True) \
        + body + encode_footer(sid)


def _no_false_footer_strict(body: bytes, sid: int) -> bytes:
    """Keep a footer lookalike only when the byte after it cannot start a well-formed
    record (0x99 is no record type), else break it."""
    pat = encode_footer(sid)
    out = bytearray()
    i = 0
    while True:
        j = body.find(pat, i)
        if j < 0:
            out += body[i:]
            return bytes(out)
        after = body[j + 5:j + 6]
        out += body[i:j + 5]
        if after != b"\x99":
            out[-1] ^= 0x01
        i = j + 5


@st.composite
def vfio_device(draw, sid: int, idstr: str, framing: str, parts: int):
    """(records by phase, state bytes, block sizes): start, list of parts, end, full."""
    state = b""
    blocks: list[int] = []
    start = (encode_section_start(sid, idstr, 0, 1) + encode_vfio_marker(VfioFlag.DEV_SETUP_STATE)
             + encode_vfio_marker(VfioFlag.END_OF_STATE) + encode_footer(sid))
    part_recs = []
    for _ in range(parts):
        body = b""
        n = draw(st.integers(0, 2))
        if framing == "v1" and n == 0:
            body += encode_vfio_block(b"")
            blocks.append(0)
        for _ in range(n):
            data = draw(st.binary(min_size=1, max_size=64))
            state += data
            blocks.append(len(data))
            body += encode_vfio_block(data)
        part_recs.append(encode_section_part(sid) + body + encode_vfio_marker(VfioFlag.END_OF_STATE)
                         + encode_footer(sid))
    end = encode_section_part(sid, end=True)
    for _ in range(draw(st.integers(0, 3))):
        # state may itself contain markers and footers: data blocks are length-framed
        data = draw(st.one_of(st.binary(min_size=1, max_size=96),
                              st.just(encode_vfio_marker(VfioFlag.END_OF_STATE) + encode_footer(sid) + b"\0")))
        state += data
        blocks.append(len(data))
        end += encode_vfio_block(data)
    end += encode_vfio_marker(VfioFlag.END_OF_STATE) + encode_footer(sid)
    config = draw(st.binary(max_size=48))
    config = _no_false_footer(config, sid, encode_vfio_marker(VfioFlag.END_OF_STATE))
    full = (encode_section_start(sid, idstr, 0, 1, full=True) + encode_vfio_marker(VfioFlag.DEV_CONFIG_STATE)
            + config + encode_vfio_marker(VfioFlag.END_OF_STATE) + encode_footer(sid))
    if framing == "v2" and draw(st.booleans()):
        # switchover-ack: INIT_DATA_SENT ends one PART payload
        part_recs.append(encode_section_part(sid) + encode_vfio_marker(VfioFlag.DEV_INIT_DATA_SENT)
                         + encode_footer(sid))
    return start, part_recs, end, full, state, blocks


@st.composite
def valid_streams(draw, max_parts: int = 3, max_devices: int = 2) -> Built:
    """A valid QEMU stream in savevm order: header, configuration, RAM + VFIO setup,
    iterations (RAM PARTs interleaved with VFIO PARTs and commands), completion (ENDs),
    FULL sections, EOF, optional vmdesc."""
    b = Built(b"")
    page_bits = draw(st.sampled_from([None, 10, 12]))
    out = encode_file_header()
    conf = encode_configuration(draw(st.sampled_from(MACHINES)))
    if page_bits is not None:
        conf += _subsection(CONFIG_SUB_PAGE_BITS, BE32.pack(page_bits))
    out += conf
    bits = page_bits or 12
    blocks = {"pc.ram": 64 << bits, "vga.vram": 16 << bits}
    setup = BE64.pack(sum(blocks.values()) | RamFlag.MEM_SIZE)
    for name, size in blocks.items():
        setup += bytes([len(name)]) + name.encode() + BE64.pack(size)
    out += encode_section_start(RAM_SID, "ram", 0, 4) + setup + BE64.pack(RamFlag.EOS) + encode_footer(RAM_SID)
    b.sections += 1
    ndev = draw(st.integers(0, max_devices))
    devs = []
    for i in range(ndev):
        sid = 10 + i
        idstr = draw(st.sampled_from([f"0000:00:0{5 + i}.0/vfio", f"0000:01:00.{i}/vfio"]))
        framing = draw(st.sampled_from(["v1", "v2"]))
        devs.append((sid, draw(vfio_device(sid, idstr, framing, max_parts))))
    for _sid, (start, *_rest) in devs:
        out += start
        b.sections += 1
    nparts = draw(st.integers(0, max_parts))
    for k in range(max_parts):
        if k < nparts:
            recs, pages, zeros = draw(ram_records(bits, draw(st.sampled_from(list(blocks)))))
            out += encode_section_part(RAM_SID) + recs + BE64.pack(RamFlag.EOS) + encode_footer(RAM_SID)
            b.sections += 1
            b.pages += pages
            b.zero_pages += zeros
        for _sid, (_s, part_recs, *_r) in devs:
            if k < len(part_recs):
                out += part_recs[k]
                b.sections += 1
        if draw(st.booleans()):
            out += draw(st.sampled_from([encode_command(MigCommand.PING, draw(st.binary(min_size=4, max_size=4))),
                                         encode_command(MigCommand.OPEN_RETURN_PATH),
                                         encode_command(MigCommand.SWITCHOVER_START)]))
            b.commands += 1
    for _sid, (_s, part_recs, *_r) in devs:
        for rec in part_recs[max_parts:]:
            out += rec
            b.sections += 1
    out += encode_section_part(RAM_SID, end=True) + BE64.pack(RamFlag.EOS) + encode_footer(RAM_SID)
    b.sections += 1
    for sid, (_s, _p, end, _f, state, _sizes) in devs:
        out += end
        b.sections += 1
        b.vfio_state[sid] = state
    nfull = draw(st.integers(0, 4))
    for j in range(nfull):
        out += draw(vmstate_full(100 + j, j))
        b.sections += 1
    for _sid, (_s, _p, _e, full, _st, _sizes) in devs:
        out += full
        b.sections += 1
    # block sizes in stream order: every device's PARTs were interleaved per iteration
    b.vfio_blocks = _block_order(devs, max_parts)
    out += encode_eof()
    if draw(st.booleans()):
        out += encode_vmdesc(json.dumps({"page_size": 1 << bits, "devices": []}).encode())
        b.vmdesc = True
    b.data = out
    return b


def _block_order(devs, max_parts: int) -> list[int]:
    """Sizes of the VFIO data blocks in the order they appear in the stream."""
    from libvirt_mdev.stream.wire import VfioFlag as F
    order: list[int] = []
    recs = []
    for k in range(max_parts):
        recs += [p[k] for _sid, (_s, p, *_r) in devs if k < len(p)]
    for _sid, (_s, p, *_r) in devs:
        recs += p[max_parts:]
    recs += [e for _sid, (_s, _p, e, *_r) in devs]
    for rec in recs:
        order += _blocks_in(rec, F)
    return order


def _blocks_in(rec: bytes, flags) -> list[int]:
    """Walk one generated PART/END record's markers (we wrote it, so it is exact)."""
    pos = 5
    sizes = []
    while True:
        (v,) = BE64.unpack_from(rec, pos)
        if v != flags.DEV_DATA_STATE:
            return sizes
        (n,) = BE64.unpack_from(rec, pos + 8)
        sizes.append(n)
        pos += 16 + n


def chunkings(max_chunk: int = 512):
    """How the stream is cut into feeds: lists of chunk sizes (cycled)."""
    return st.lists(st.integers(1, max_chunk), min_size=1, max_size=8)


@st.composite
def mutations(draw, data: bytes) -> bytes:
    """Structural damage: flips, inserts, deletes, duplicated or moved slices, truncation."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        if not buf:
            break
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "dup", "truncate", "be32"]))
        i = draw(st.integers(0, len(buf) - 1))
        if op == "flip":
            buf[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            buf[i] = draw(st.sampled_from([0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, 0x7E, 0xFF]))
        elif op == "insert":
            buf[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del buf[i:i + draw(st.integers(1, 16))]
        elif op == "dup":
            j = draw(st.integers(i, min(len(buf), i + 64)))
            buf[j:j] = buf[i:j]
        elif op == "truncate":
            del buf[i:]
        else:  # a length or id field turned huge
            buf[i:i + 4] = draw(st.sampled_from([b"\xff\xff\xff\xff", b"\x7f\xff\xff\xff", b"\x00\x00\x00\x00"]))
    return bytes(buf)
