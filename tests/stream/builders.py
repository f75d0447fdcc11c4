"""Small hand-built QEMU streams for unit tests (QEMU's framing, made-up content)."""
from __future__ import annotations

import json

from libvirt_mdev.stream.wire import BE64, RamFlag
from libvirt_mdev.stream.writer import (
    encode_configuration,
    encode_eof,
    encode_file_header,
    encode_footer,
    encode_section_part,
    encode_section_start,
    encode_vmdesc,
)

PAGE = 4096


def ram_record(addr: int, flags: int, block: str | None = None, body: bytes = b"") -> bytes:
    out = BE64.pack(addr | flags)
    if block is not None:
        out += bytes([len(block)]) + block.encode()
    return out + body


def ram_setup(blocks: dict[str, int], sid: int = 2) -> bytes:
    total = sum(blocks.values())
    body = BE64.pack(total | RamFlag.MEM_SIZE)
    for name, size in blocks.items():
        body += bytes([len(name)]) + name.encode() + BE64.pack(size)
    body += BE64.pack(RamFlag.EOS)
    return encode_section_start(sid, "ram", 0, 4) + body + encode_footer(sid)


def ram_pages(sid: int = 2, end: bool = False, pattern: str = "PZZP") -> bytes:
    """A PART (or END) with pages: P = full page, Z = zero page, first one names the block."""
    body = b""
    for i, kind in enumerate(pattern):
        flags = RamFlag.PAGE if kind == "P" else RamFlag.ZERO
        fill = bytes([i % 251]) * PAGE if kind == "P" else b"\x00"
        if i == 0:
            body += ram_record(i * PAGE, flags, "pc.ram", fill)
        else:
            body += ram_record(i * PAGE, flags | RamFlag.CONTINUE, None, fill)
    body += BE64.pack(RamFlag.EOS)
    return encode_section_part(sid, end=end) + body + encode_footer(sid)


def full(sid: int, idstr: str, payload: bytes, instance: int = 0, version: int = 1) -> bytes:
    return encode_section_start(sid, idstr, instance, version, full=True) + payload + encode_footer(sid)


def small_stream(vmdesc: bool = True, pattern: str = "PZZPZZZZPP") -> bytes:
    out = encode_file_header() + encode_configuration("pc-i440fx-7.2")
    out += ram_setup({"pc.ram": 64 * PAGE, "vga.vram": 16 * PAGE})
    out += ram_pages(pattern=pattern)
    out += ram_pages(end=True, pattern="ZP")
    out += full(0, "timer", b"\x00" * 20, version=2)
    # a payload that contains a footer-looking pattern followed by junk: must not end the body
    out += full(5, "cpu", b"\x01\x02\x7e\x00\x00\x00\x05\x99\x99" + b"\x03" * 40, version=12)
    out += full(9, "0000:00:02.0/virtio-net", b"\x10" * 33)
    out += encode_eof()
    if vmdesc:
        out += encode_vmdesc(json.dumps({"page_size": PAGE, "devices": []}).encode())
    return out
