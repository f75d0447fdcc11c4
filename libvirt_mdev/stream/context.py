"""What a consumer of stream events knows besides the event: the section it is in.

The filter, the sign and verify layers and the summarizer all need "the section this
event belongs to" and "the VFIO devices so far, by section id".  Each consumer keeps its
own :class:`SectionContext` (a layer may hold events back and hand them on later, so a
consumer's view can lag the parser's), but they all build it the same way, here.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from .events import Bytes, SectionHeader, SectionKind, StreamEvent
from .wire import SectionType

#: where a consumer sends its output bytes (a file writer offline, a socket in the proxy)
Emit = Callable[[Bytes], None]


class EventConsumer(Protocol):
    """Anything that takes the parser's events one by one (filter, layers, summarizer)."""

    def process(self, ev: StreamEvent) -> None: ...


@dataclass(frozen=True, slots=True)
class VfioSection:
    """A VFIO device as its first section header named it (no view of the input kept)."""

    section_id: int
    idstr: str
    instance_id: int
    version_id: int


def is_vfio(sec: SectionHeader | None, rtype: SectionType) -> bool:
    """Is *sec* a VFIO section header of record type *rtype*?"""
    return sec is not None and sec.kind == SectionKind.VFIO and sec.type == rtype


class SectionContext:
    """The current section header and the VFIO devices seen, fed every section header."""

    __slots__ = ("current", "vfio")

    def __init__(self) -> None:
        #: the header of the section the next payload event belongs to
        self.current: SectionHeader | None = None
        #: VFIO devices by section id, in the order they appeared
        self.vfio: dict[int, VfioSection] = {}

    def enter(self, ev: SectionHeader) -> VfioSection | None:
        """Enter *ev*'s section; the VFIO device it opens if it is that device's first header."""
        self.current = ev
        if ev.kind != SectionKind.VFIO or ev.section_id in self.vfio:
            return None
        dev = VfioSection(ev.section_id, ev.idstr, ev.instance_id, ev.version_id)
        self.vfio[ev.section_id] = dev
        return dev

    @property
    def in_vfio_end(self) -> bool:
        """Inside a VFIO device's END section (its END_OF_STATE finishes the device's state)."""
        return is_vfio(self.current, SectionType.SECTION_END)

    @property
    def in_vfio_full(self) -> bool:
        """Inside a VFIO device's FULL (config) section."""
        return is_vfio(self.current, SectionType.SECTION_FULL)
