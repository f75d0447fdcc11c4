"""The migration-stream codec: sans-IO parser, events, writer (no policy, no I/O).

Everything in ``__all__`` is the public API; other modules are private details.
"""
from __future__ import annotations

from .drive import CHUNK, iter_events, passthrough
from .events import (NEED_DATA, Command, Configuration, Eof, Event, FileHeader, Opaque,
                     RamEos, RamMemSize, RamRecords, SaveImageHeader, SectionEnd, SectionFooter,
                     SectionFull, SectionHeader, SectionPart, SectionStart, StreamEnd,
                     VfioBlockData, VfioBlockEnd, VfioBlockStart, VfioConfigData, VfioMarker,
                     VMDescription)
from .reader import StreamParser
from .sections import is_vfio_idstr
from .writer import StreamWriter

__all__ = [
    "CHUNK", "NEED_DATA", "Command", "Configuration", "Eof", "Event", "FileHeader", "Opaque",
    "RamEos", "RamMemSize", "RamRecords", "SaveImageHeader", "SectionEnd", "SectionFooter",
    "SectionFull", "SectionHeader", "SectionPart", "SectionStart", "StreamEnd", "StreamParser",
    "StreamWriter", "VMDescription", "VfioBlockData", "VfioBlockEnd", "VfioBlockStart",
    "VfioConfigData", "VfioMarker", "is_vfio_idstr", "iter_events", "passthrough",
]
