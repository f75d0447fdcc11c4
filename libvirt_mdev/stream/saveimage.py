"""libvirt's save-image wrapper (``virsh save`` / managed save), docs/stream-format.md "Containers".

Layout: a 92-byte header written in host byte order (little-endian on x86), then
``data_len`` bytes holding the domain XML (NUL-terminated), an optional cookie XML
(NUL-terminated) and zero padding, then QEMU's migration stream.  libvirt writes the
magic ``LibvirtQemudPart`` first and rewrites it to ``LibvirtQemudSave`` when the
save finished, so a ``Part`` image is an incomplete one: refused (QEMU may have been
killed half-way; ``virsh restore`` refuses it too).

The ``format`` field says what follows the XML area (qemu_saveimage.c):

* raw: QEMU's migration stream, as written;
* gzip, bzip2, xz, lzop, zstd: that stream piped through the tool of that name (``-c``);
  the parser sees it only through libvirt_mdev.io.compress, which runs the same tool
  with ``-dc`` and feeds the parser the header plus the decompressed stream
  (``StreamParser(decompressed=True)``);
* sparse (libvirt >= 10.x): a mapped-ram stream written by QEMU at fixed file offsets
  right after the XML area, not compressed; parsed in place (ram.py, mapped-ram).
"""
from __future__ import annotations

from collections.abc import Generator

from ..errors import StreamError, UnsupportedStream
from ._util import need
from .buffer import Input
from .events import NEED_DATA, SaveImageHeader, Step
from .wire import (
    FILE_HEADER,
    MAX_SAVE_DATA_LEN,
    QEMU_VM_FILE_MAGIC,
    SAVE_HEADER,
    SAVE_HEADER_LEN,
    SAVE_MAGIC_COMPLETE,
    SAVE_MAGIC_PARTIAL,
    SAVE_VERSION,
    SaveFormat,
)

SAVE_MAGICS = (SAVE_MAGIC_COMPLETE, SAVE_MAGIC_PARTIAL)


def _swap32(v: int) -> int:
    return int.from_bytes(v.to_bytes(4, "little"), "big")


def decode_header(raw: bytes, offset: int = 0) -> tuple[bytes, int, int, int, int, int]:
    """(magic, version, data_len, was_running, format, cookie_offset) of a header."""
    magic, version, data_len, was_running, fmt, cookie_off, _unused = SAVE_HEADER.unpack(raw)
    if magic not in SAVE_MAGICS:
        raise StreamError("not a libvirt save image (bad magic)", offset=offset)
    if version > SAVE_VERSION:
        # libvirt byte-swaps the fields when version reads > 2 (image from the other endianness)
        version, data_len, was_running, fmt, cookie_off = (
            _swap32(version), _swap32(data_len), _swap32(was_running), _swap32(fmt), _swap32(cookie_off))
    if version != SAVE_VERSION:
        raise UnsupportedStream(f"libvirt save image version {version} (only {SAVE_VERSION} is known)",
                                offset=offset + 16)
    return magic, version, data_len, was_running, fmt, cookie_off


#: the program libvirt runs for each compressed format (save_image_format in qemu.conf)
COMPRESSORS: dict[SaveFormat, str] = {SaveFormat.GZIP: "gzip", SaveFormat.BZIP2: "bzip2", SaveFormat.XZ: "xz",
                                      SaveFormat.LZOP: "lzop", SaveFormat.ZSTD: "zstd"}


def read_save_image(inp: Input) -> Generator[Step, None, SaveImageHeader]:
    off = inp.offset
    raw = yield from need(inp, SAVE_HEADER_LEN, "libvirt save-image header")
    magic, version, data_len, was_running, fmt, cookie_off = decode_header(bytes(raw), off)
    if magic == SAVE_MAGIC_PARTIAL:
        raise UnsupportedStream("unfinished save image (magic LibvirtQemudPart): libvirt never completed this "
                                "save, so the state in it may be partial; save the domain again", offset=off)
    if data_len > MAX_SAVE_DATA_LEN:
        raise StreamError(f"save-image XML area of {data_len} bytes", offset=off + 20)
    if cookie_off > data_len:
        raise StreamError(f"save-image cookie offset {cookie_off} beyond the XML area", offset=off + 32)
    try:
        fmt_name = SaveFormat(fmt)
    except ValueError:
        raise StreamError(f"unknown save-image format {fmt}", offset=off + 28) from None
    data = yield from need(inp, data_len, "save-image XML")
    tool = COMPRESSORS.get(fmt_name)
    if tool is not None:
        # presented decompressed (io.compress) the stream starts with QEVM, which no
        # compressor's output does; still compressed, it is refused with the way out
        while (head := inp.peek(4)) is None and not inp.eof:
            yield NEED_DATA
        if head != FILE_HEADER.pack(QEMU_VM_FILE_MAGIC, 0)[:4]:
            raise UnsupportedStream(f"save image is {fmt_name.name.lower()}-compressed; read it through "
                                    f"libvirt_mdev.io.compress.open_image (the libvirt-mdev commands do), which "
                                    f"runs `{tool} -dc` as libvirt does", offset=off + 28)
    data_b = bytes(data)
    xml_len = cookie_off if cookie_off else data_len
    xml = data_b[:xml_len].split(b"\0", 1)[0]
    cookie = data_b[xml_len:].split(b"\0", 1)[0] if cookie_off else b""
    return SaveImageHeader(off, memoryview(bytes(raw) + data_b), magic, version, data_len,
                           was_running, fmt, cookie_off, xml, cookie)


def encode_header(magic: bytes, data_len: int, was_running: int, fmt: int, cookie_offset: int) -> bytes:
    """A version-2 little-endian header (what libvirt writes on x86)."""
    return SAVE_HEADER.pack(magic, SAVE_VERSION, data_len, was_running, fmt, cookie_offset, b"\0" * 56)
