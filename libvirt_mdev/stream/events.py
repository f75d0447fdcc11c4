"""What the stream parser hands back: one frozen dataclass per kind of thing it saw.

Every event carries ``offset`` (absolute byte offset of its first byte in the input)
and ``raw`` (exactly the input bytes it covers).  Writing every event's ``raw`` in
order reproduces the input byte for byte; that is how pass-through, splice and the
proxy stay faithful.  ``raw`` is usually a memoryview into the chunk that was fed: it
is valid until the next :meth:`StreamParser.feed` (copy it if you keep it).

Dispatch on ``type(event)`` (mypy narrows :data:`StreamEvent` on ``type(ev) is X``) or
``isinstance(ev, SectionHeader)``.  Don't subclass these.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final

from .wire import SAVE_MAGIC_COMPLETE, MigCommand, SectionType, VfioFlag

Bytes = bytes | bytearray | memoryview


class NeedData(enum.Enum):
    """The parser's "feed me": one member, so ``ev is NEED_DATA`` narrows the type."""

    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return self.value


#: returned by :meth:`StreamParser.next_event` when it needs more bytes
NEED_DATA: Final = NeedData.NEED_DATA


class SectionKind(enum.StrEnum):
    """How a section's payload is parsed, from its idstr (sections.kind_of): the one
    spelling of the kinds for the parser and every consumer."""

    RAM = "ram"
    VFIO = "vfio"
    DIRTY_BITMAP = "dirty-bitmap"
    #: any other device: an opaque FULL body, delimited by the footer scan
    VMSTATE = "vmstate"
    #: an early-setup vmstate whose layout we parse field by field (early.py)
    VIRTIO_MEM_EARLY = "virtio-mem-early"
    #: libvirt-mdev's own records (signed statements): FULL sections named ``libvirt-mdev/...``
    OURS = "libvirt-mdev"


@dataclass(frozen=True, slots=True)
class Event:
    offset: int
    raw: Bytes

    @property
    def end(self) -> int:
        """Absolute offset just past this event."""
        return self.offset + len(self.raw)


@dataclass(frozen=True, slots=True)
class SaveImageHeader(Event):
    """libvirt's save-image header plus its XML/cookie/padding area (docs/stream-format.md, "Containers")."""

    magic: bytes
    version: int
    data_len: int
    was_running: int
    format: int
    cookie_offset: int
    xml: bytes
    cookie: bytes

    @property
    def complete(self) -> bool:
        """False for ``LibvirtQemudPart``: libvirt never finished writing the image."""
        return self.magic == SAVE_MAGIC_COMPLETE


@dataclass(frozen=True, slots=True)
class FileHeader(Event):
    """``QEVM`` magic and file version."""

    version: int


@dataclass(frozen=True, slots=True)
class Configuration(Event):
    """The CONFIGURATION record: machine type and validated capabilities."""

    machine_type: str
    capabilities: tuple[str, ...] = ()
    target_page_bits: int | None = None
    uuid: bytes | None = None


@dataclass(frozen=True, slots=True)
class Command(Event):
    """A COMMAND record (OPEN_RETURN_PATH, PING, SWITCHOVER_START, ...)."""

    command: MigCommand
    data: bytes


@dataclass(frozen=True, slots=True)
class SectionHeader(Event):
    """Common shape of the four section headers.  For PART/END, ``idstr`` and
    ``instance_id``/``version_id`` are copied from the START that opened the id."""

    type: SectionType
    section_id: int
    idstr: str
    instance_id: int
    version_id: int
    #: how the payload is parsed
    kind: SectionKind


@dataclass(frozen=True, slots=True)
class SectionStart(SectionHeader):
    pass


@dataclass(frozen=True, slots=True)
class SectionPart(SectionHeader):
    pass


@dataclass(frozen=True, slots=True)
class SectionEnd(SectionHeader):
    pass


@dataclass(frozen=True, slots=True)
class SectionFull(SectionHeader):
    pass


@dataclass(frozen=True, slots=True)
class SectionFooter(Event):
    """``7e <be32 section_id>``: closes the section record opened just before."""

    section_id: int


@dataclass(frozen=True, slots=True)
class RamMemSize(Event):
    """RAM setup record: total size and the RAMBlock list."""

    section_id: int
    total: int
    blocks: tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class RamRecords(Event):
    """A run of RAM page records (headers and page data), counted, never copied."""

    section_id: int
    records: int
    pages: int
    zero_pages: int


@dataclass(frozen=True, slots=True)
class RamEos(Event):
    """``RAM_SAVE_FLAG_EOS``: the end of a RAM section payload."""

    section_id: int


@dataclass(frozen=True, slots=True)
class VfioMarker(Event):
    """A VFIO framing marker other than a data block (SETUP, END_OF_STATE, CONFIG, ...)."""

    section_id: int
    marker: VfioFlag


@dataclass(frozen=True, slots=True)
class VfioBlockStart(Event):
    """``DEV_DATA_STATE`` + be64 size: a block of opaque device state begins."""

    section_id: int
    size: int


@dataclass(frozen=True, slots=True)
class VfioBlockData(Event):
    """A piece of a device-state block.  Pieces of one block are contiguous."""

    section_id: int


@dataclass(frozen=True, slots=True)
class VfioBlockEnd(Event):
    """The block announced by the last VfioBlockStart is complete (``raw`` is empty)."""

    section_id: int
    size: int


@dataclass(frozen=True, slots=True)
class VfioConfigData(Event):
    """A piece of the device's config vmstate (between DEV_CONFIG_STATE and END_OF_STATE)."""

    section_id: int


@dataclass(frozen=True, slots=True)
class Opaque(Event):
    """Bytes we pass through without interpreting: a vmstate FULL body, dirty-bitmap
    records, XBZRLE/zlib page bodies.  ``what`` says which."""

    section_id: int
    what: str


@dataclass(frozen=True, slots=True)
class Eof(Event):
    """``QEMU_VM_EOF``: all device state has been sent."""


@dataclass(frozen=True, slots=True)
class VMDescription(Event):
    """The JSON description QEMU appends after EOF (``json``: a view of its bytes,
    checked to be one JSON object; ``bytes(ev.json)`` to keep or ``json.loads`` it)."""

    json: Bytes


@dataclass(frozen=True, slots=True)
class StreamEnd(Event):
    """The input ended at a legal place (after EOF or vmdesc)."""


#: everything :meth:`StreamParser.next_event` returns besides :data:`NEED_DATA`
StreamEvent = (SaveImageHeader | FileHeader | Configuration | Command | SectionStart | SectionPart | SectionEnd |
               SectionFull | SectionFooter | RamMemSize | RamRecords | RamEos | VfioMarker | VfioBlockStart |
               VfioBlockData | VfioBlockEnd | VfioConfigData | Opaque | Eof | VMDescription | StreamEnd)
#: what a reader generator yields
Step = StreamEvent | NeedData
