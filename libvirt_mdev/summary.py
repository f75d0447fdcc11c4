"""What is in a stream: the section list and the VFIO devices (for ``inspect``).

A consumer of stream events, so the same code summarizes a file, a pipe or a stream
a filter has just passed through.  Constant memory except for the section list,
which has one entry per section *record* (hundreds, not millions: RAM pages are
counted, not listed).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .stream import (
    Configuration,
    Eof,
    RamRecords,
    SaveImageHeader,
    SectionContext,
    SectionFooter,
    SectionHeader,
    StreamEvent,
    StreamParser,
    VfioBlockData,
    VfioBlockEnd,
    VfioBlockStart,
    VfioConfigData,
    VMDescription,
)
from .tokenrecords import MAX_TOKEN_RECORD, TOKEN_MAGIC


@dataclass
class SectionRecord:
    type: str
    section_id: int
    idstr: str
    instance_id: int
    version_id: int
    offset: int
    length: int = 0


@dataclass
class VfioDeviceSummary:
    idstr: str
    instance_id: int
    section_id: int
    state_bytes: int = 0
    blocks: int = 0
    config_bytes: int = 0
    #: data blocks that are libvirt-mdev token records (a stripped stream), not device state
    token_records: int = 0
    framing: str = "unknown"


@dataclass
class StreamSummary:
    kind: str = "stream"
    size: int = 0
    machine_type: str = ""
    capabilities: list[str] = field(default_factory=list)
    domain_name: str | None = None
    domain_uuid: str | None = None
    save_image_complete: bool | None = None
    sections: list[SectionRecord] = field(default_factory=list)
    vfio: list[VfioDeviceSummary] = field(default_factory=list)
    ram_records: int = 0
    ram_pages: int = 0
    ram_zero_pages: int = 0
    vmdesc_bytes: int | None = None
    eof_offset: int | None = None

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        if self.kind != "save-image":
            for key in ("domain_name", "domain_uuid", "save_image_complete"):
                out.pop(key)
        return out


class Summarizer:
    """Feed it every event; read :attr:`summary` at the end."""

    def __init__(self) -> None:
        self.summary = StreamSummary()
        self._open: SectionRecord | None = None
        self._ctx = SectionContext()
        self._vfio: dict[int, VfioDeviceSummary] = {}
        #: (device, block size, first bytes seen) of the data block being read
        self._block: tuple[VfioDeviceSummary, int, bytes] | None = None

    def process(self, ev: StreamEvent) -> None:
        """:class:`~libvirt_mdev.stream.EventConsumer` (the same as :meth:`add`)."""
        self.add(ev)

    def add(self, ev: StreamEvent) -> None:
        s = self.summary
        if type(ev) is RamRecords:
            s.ram_records += ev.records
            s.ram_pages += ev.pages
            s.ram_zero_pages += ev.zero_pages
        elif isinstance(ev, SectionHeader):
            self._open = SectionRecord(ev.type.name.replace("SECTION_", ""), ev.section_id, ev.idstr,
                                       ev.instance_id, ev.version_id, ev.offset)
            s.sections.append(self._open)
            vfio = self._ctx.enter(ev)
            if vfio is not None:
                dev = VfioDeviceSummary(vfio.idstr, vfio.instance_id, vfio.section_id)
                self._vfio[vfio.section_id] = dev
                s.vfio.append(dev)
        elif type(ev) is SectionFooter and self._open is not None:
            self._open.length = ev.end - self._open.offset
            self._open = None
        elif type(ev) is VfioBlockStart:
            self._block = (self._vfio[ev.section_id], ev.size, b"")
        elif type(ev) is VfioBlockData and self._block is not None and len(self._block[2]) < len(TOKEN_MAGIC):
            dev, size, head = self._block
            self._block = (dev, size, head + bytes(ev.raw[: len(TOKEN_MAGIC)]))
        elif type(ev) is VfioBlockEnd and self._block is not None:
            dev, size, head = self._block
            self._block = None
            if size <= MAX_TOKEN_RECORD and head.startswith(TOKEN_MAGIC):
                dev.token_records += 1
            else:
                dev.state_bytes += size
                dev.blocks += 1
        elif type(ev) is VfioConfigData:
            self._vfio[ev.section_id].config_bytes += len(ev.raw)
        elif type(ev) is Configuration:
            s.machine_type = ev.machine_type
            s.capabilities = list(ev.capabilities)
        elif type(ev) is SaveImageHeader:
            s.kind = "save-image"
            s.save_image_complete = ev.complete
            s.domain_name, s.domain_uuid = _domain_identity(ev.xml)
        elif type(ev) is Eof:
            s.eof_offset = ev.offset
        elif type(ev) is VMDescription:
            s.vmdesc_bytes = len(ev.json)
        s.size = ev.end

    def finish(self, parser: StreamParser) -> StreamSummary:
        for dev in self.summary.vfio:
            dev.framing = parser.framing_of(dev.section_id)
        return self.summary


def _domain_identity(xml: bytes) -> tuple[str | None, str | None]:
    """Name and UUID from the save image's domain XML (None when unreadable).

    Only the two elements: a summary must describe an image whose hostdevs or
    annotation are malformed too, so this is not :func:`.mdev.domain.parse_domain`.
    """
    from .errors import XMLError
    from .mdev.xpath import parse_xml  # lxml: imported only when an image has XML
    try:
        root = parse_xml(xml)
    except XMLError:
        return None, None
    return root.findtext("name"), root.findtext("uuid")
