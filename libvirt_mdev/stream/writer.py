"""Writing streams: re-emitting parsed events, and encoding new records.

Re-emitting an event writes its ``raw`` bytes, so parse → write is the identity.  New
records (the filter's token records, the synthetic VFIO sections of tests and
examples) are built by the ``encode_*`` functions, which are the only place that lays
out bytes, using the constants of :mod:`wire`.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import BinaryIO

from .events import Bytes, Event
from .wire import (
    BE16,
    BE32,
    BE64,
    FILE_HEADER,
    QEMU_VM_FILE_MAGIC,
    QEMU_VM_FILE_VERSION,
    MigCommand,
    SectionType,
    VfioFlag,
)

#: writes smaller than this are gathered; larger ones go straight to the file
_GATHER = 256 << 10


class StreamWriter:
    """Write events (or bytes) to a binary file object, gathering small pieces.

    Call :meth:`flush` (or use as a context manager) before the file is used.
    """

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._pending = bytearray()
        self.written = 0

    def write(self, event: Event) -> None:
        self.write_bytes(event.raw)

    def write_all(self, events: Iterable[Event]) -> None:
        for ev in events:
            self.write_bytes(ev.raw)

    def write_bytes(self, data: Bytes) -> None:
        n = len(data)
        if not n:
            return
        self.written += n
        if n < _GATHER:
            self._pending += data
            if len(self._pending) >= _GATHER:
                self._drain()
            return
        self._drain()
        self._out.write(data)

    def _drain(self) -> None:
        if self._pending:
            self._out.write(self._pending)
            self._pending = bytearray()

    def flush(self) -> None:
        self._drain()
        self._out.flush()

    def __enter__(self) -> StreamWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()


# -- encoders --------------------------------------------------------------------------


def encode_file_header() -> bytes:
    return FILE_HEADER.pack(QEMU_VM_FILE_MAGIC, QEMU_VM_FILE_VERSION)


def encode_configuration(machine_type: str) -> bytes:
    name = machine_type.encode()
    return bytes([SectionType.CONFIGURATION]) + BE32.pack(len(name)) + name


def encode_section_start(section_id: int, idstr: str, instance_id: int, version_id: int,
                         full: bool = False) -> bytes:
    """START (or FULL) header: type, be32 id, counted idstr, be32 instance, be32 version."""
    name = idstr.encode()
    if not 0 < len(name) < 256:
        raise ValueError(f"idstr of {len(name)} bytes")
    rtype = SectionType.SECTION_FULL if full else SectionType.SECTION_START
    return (bytes([rtype]) + BE32.pack(section_id) + bytes([len(name)]) + name
            + BE32.pack(instance_id) + BE32.pack(version_id))


def encode_section_part(section_id: int, end: bool = False) -> bytes:
    rtype = SectionType.SECTION_END if end else SectionType.SECTION_PART
    return bytes([rtype]) + BE32.pack(section_id)


def encode_footer(section_id: int) -> bytes:
    return bytes([SectionType.SECTION_FOOTER]) + BE32.pack(section_id)


def encode_command(command: MigCommand, data: bytes = b"") -> bytes:
    return bytes([SectionType.COMMAND]) + BE16.pack(command) + BE16.pack(len(data)) + data


def encode_eof() -> bytes:
    return bytes([SectionType.EOF])


def encode_vmdesc(json_bytes: bytes) -> bytes:
    return bytes([SectionType.VMDESCRIPTION]) + BE32.pack(len(json_bytes)) + json_bytes


def encode_vfio_marker(flag: VfioFlag) -> bytes:
    return BE64.pack(flag)


def encode_vfio_block_header(size: int) -> bytes:
    """``DEV_DATA_STATE`` + be64 size (the data follows)."""
    return BE64.pack(VfioFlag.DEV_DATA_STATE) + BE64.pack(size)


def encode_vfio_block(data: Bytes) -> bytes:
    return encode_vfio_block_header(len(data)) + bytes(data)
