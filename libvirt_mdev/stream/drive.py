"""Thin drivers that run the sans-IO parser over files and pipes.

The parser is fed fresh ``bytes`` chunks (``read``), never a reused buffer: events and
the parser itself keep zero-copy views into earlier chunks until they are consumed.
"""
from __future__ import annotations

from typing import BinaryIO, Callable, Iterator, Optional

from .events import NEED_DATA, Event
from .reader import StreamParser
from .writer import StreamWriter

#: bytes per read: big enough that per-chunk work is noise, small enough for constant memory
CHUNK = 1 << 20

Progress = Callable[[int], None]


def iter_events(src: BinaryIO, parser: Optional[StreamParser] = None, chunk: int = CHUNK,
                progress: Optional[Progress] = None) -> Iterator[Event]:
    """Every event of the stream in *src*, in order.  Consume each event before asking
    for the next one: its ``raw`` view is only valid until the next read."""
    p = parser or StreamParser()
    read = getattr(src, "read1", None) or src.read
    while True:
        ev = p.next_event()
        if ev is not NEED_DATA:
            yield ev  # type: ignore[misc]
            continue
        if p.done:
            return
        data = read(chunk)
        p.feed(data)
        if progress is not None and data:
            progress(len(data))


def passthrough(src: BinaryIO, dst: BinaryIO, chunk: int = CHUNK,
                progress: Optional[Progress] = None) -> StreamParser:
    """Parse *src* and write it unchanged to *dst* (a validating copy)."""
    parser = StreamParser()
    with StreamWriter(dst) as w:
        for ev in iter_events(src, parser, chunk, progress):
            w.write(ev)
    return parser
