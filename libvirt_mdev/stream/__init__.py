"""The migration-stream codec: sans-IO parser, events, writer (no policy, no I/O).

Everything in ``__all__`` is the public API; other modules are private details.  The
drivers over files and pipes (``iter_events``, ``passthrough``) live in
:mod:`libvirt_mdev.io.drive`; they are still found here, imported on first use, so
importing the codec opens nothing.
"""
from __future__ import annotations

from typing import Any

from ..io.sizes import CHUNK
from .context import EventConsumer, SectionContext, VfioSection, is_vfio
from .events import (
    NEED_DATA,
    Command,
    Configuration,
    Eof,
    Event,
    FileHeader,
    NeedData,
    Opaque,
    RamEos,
    RamMemSize,
    RamRecords,
    SaveImageHeader,
    SectionEnd,
    SectionFooter,
    SectionFull,
    SectionHeader,
    SectionKind,
    SectionPart,
    SectionStart,
    StreamEnd,
    StreamEvent,
    VfioBlockData,
    VfioBlockEnd,
    VfioBlockStart,
    VfioConfigData,
    VfioMarker,
    VMDescription,
)
from .reader import StreamParser
from .sections import is_vfio_idstr
from .writer import StreamWriter

__all__ = [
    "CHUNK", "NEED_DATA", "Command", "Configuration", "Eof", "Event", "EventConsumer", "FileHeader",
    "NeedData", "Opaque", "RamEos", "RamMemSize", "RamRecords", "SaveImageHeader", "SectionContext",
    "SectionEnd", "SectionFooter", "SectionFull", "SectionHeader", "SectionKind", "SectionPart",
    "SectionStart", "StreamEnd", "StreamEvent", "StreamParser", "StreamWriter", "VMDescription",
    "VfioBlockData", "VfioBlockEnd", "VfioBlockStart", "VfioConfigData", "VfioMarker", "VfioSection",
    "is_vfio", "is_vfio_idstr",
]


def __getattr__(name: str) -> Any:
    if name in ("iter_events", "passthrough"):
        from ..io import drive
        return getattr(drive, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
