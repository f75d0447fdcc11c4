"""What the sign and verify layers hold while a VFIO device passes: its running hashes and
block chain, the data block being held, and copies of held events (docs/signing.md)."""
from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from ..stream import (
    Command,
    Eof,
    Event,
    SectionContext,
    SectionHeader,
    StreamEvent,
    VfioBlockStart,
    VfioConfigData,
    is_vfio,
)
from ..stream.events import Bytes
from ..stream.wire import SectionType
from .statements import CHAIN_START

if TYPE_CHECKING:
    from hashlib import _Hash as Hash



@dataclass
class DeviceHashes:
    """One VFIO device's running hashes (state and config) and its block chain."""

    idstr: str
    instance_id: int
    h: Hash = field(default_factory=hashlib.sha256)
    length: int = 0
    complete: bool = False
    #: the device's config section (FULL): hashed the same way
    cfg: Hash = field(default_factory=hashlib.sha256)
    cfg_length: int = 0
    cfg_complete: bool = False
    #: the block chain: the next block statement's seq and prev
    seq: int = 0
    chain: str = CHAIN_START


class Devices(dict[int, DeviceHashes]):
    """The VFIO devices a layer has seen, by section id, with their running hashes
    (the bookkeeping both the sign and the verify layer need), and its section context."""

    def __init__(self) -> None:
        super().__init__()
        self.ctx = SectionContext()

    def header(self, ev: SectionHeader) -> None:
        """Enter *ev*'s section (a new VFIO device gets its hashes)."""
        vfio = self.ctx.enter(ev)
        if vfio is not None:
            self[vfio.section_id] = DeviceHashes(vfio.idstr, vfio.instance_id)

    def config(self, ev: VfioConfigData) -> None:
        d = self[ev.section_id]
        d.cfg.update(ev.raw)
        d.cfg_length += len(ev.raw)


@dataclass
class HeldBlock:
    """A VFIO data block being held (source: to sign it; destination: to verify it).

    Its buffer is allocated once at the announced size (the caller has bounded it: the
    source by MAX_SIGNED_BLOCK, the destination by the signed length), so holding a
    block costs its size and nothing more; the parser guarantees the pieces add up."""

    section_id: int
    start: VfioBlockStart
    size: int
    data: bytearray = field(init=False)
    pos: int = 0
    h: Hash = field(default_factory=hashlib.sha256)

    def __post_init__(self) -> None:
        self.data = bytearray(self.size)

    def add(self, raw: Bytes) -> None:
        n = len(raw)
        self.data[self.pos:self.pos + n] = raw
        self.pos += n
        self.h.update(raw)


def in_full(sec: SectionHeader | None) -> bool:
    """Is *sec* a VFIO device's FULL (config) section header?"""
    return is_vfio(sec, SectionType.SECTION_FULL)


_E = TypeVar("_E", bound=Event)


def own(ev: _E) -> _E:
    """A copy of *ev* whose raw bytes survive the next feed (held events)."""
    return dataclasses.replace(ev, raw=bytes(ev.raw))


def is_record_start(ev: StreamEvent) -> bool:
    """Does *ev* begin a top-level record (where a hello is due at the latest)?"""
    return isinstance(ev, SectionHeader) or type(ev) in (Eof, Command)
