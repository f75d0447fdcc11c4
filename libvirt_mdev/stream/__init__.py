"""The migration-stream codec: sans-IO parser, events, writer (no policy, no I/O).

Everything in ``__all__`` is the public API; other modules are private details.
"""
from __future__ import annotations

from ..io.sizes import CHUNK
from .drive import iter_events, passthrough
from .context import EventConsumer, SectionContext, VfioSection, is_vfio
from .events import (NEED_DATA, Command, Configuration, Eof, Event, FileHeader, NeedData, Opaque,
                     RamEos, RamMemSize, RamRecords, SaveImageHeader, SectionEnd, SectionFooter,
                     SectionFull, SectionHeader, SectionKind, SectionPart, SectionStart, StreamEnd,
                     StreamEvent, VfioBlockData, VfioBlockEnd, VfioBlockStart, VfioConfigData, VfioMarker,
                     VMDescription)
from .reader import StreamParser
from .sections import is_vfio_idstr
from .writer import StreamWriter

__all__ = [
    "CHUNK", "NEED_DATA", "Command", "Configuration", "Eof", "Event", "EventConsumer", "FileHeader",
    "NeedData", "Opaque", "RamEos", "RamMemSize", "RamRecords", "SaveImageHeader", "SectionContext",
    "SectionEnd", "SectionFooter", "SectionFull", "SectionHeader", "SectionKind", "SectionPart",
    "SectionStart", "StreamEnd", "StreamEvent", "StreamParser", "StreamWriter", "VMDescription",
    "VfioBlockData", "VfioBlockEnd", "VfioBlockStart", "VfioConfigData", "VfioMarker", "VfioSection",
    "is_vfio", "is_vfio_idstr", "iter_events", "passthrough",
]
