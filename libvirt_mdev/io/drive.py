"""Thin drivers that run the sans-IO parser (libvirt_mdev.stream) over files and pipes.

They live outside ``stream/`` so the codec opens no file and calls no fcntl/readv; the
proxy's socket reader (live/relay.py) shares :class:`BufferPool`.

Events and the parser keep zero-copy views into the chunks they were fed, until those
are consumed.  So a chunk buffer may only be reused when nobody holds a view of it any
more: :class:`ChunkReader` keeps a small pool of bytearrays and asks each one (a
resize fails with BufferError while a view exists) before reading into it again.
Reusing buffers matters: a fresh 1 MiB ``bytes`` per read costs an mmap and page
faults every time, which on a pipe made reading slower than parsing.
"""
from __future__ import annotations

import fcntl
import os
import stat
from collections.abc import Callable, Iterator
from typing import BinaryIO, Protocol

from ..stream.events import NEED_DATA, StreamEvent
from ..stream.reader import StreamParser
from ..stream.writer import StreamWriter
from .sizes import CHUNK


class ByteSource(Protocol):
    """What the drivers read a stream from: a file, a pipe, a decompressing
    :class:`~libvirt_mdev.io.compress.ImageReader`."""

    def readinto(self, buffer: memoryview, /) -> int | None: ...

    def fileno(self) -> int: ...


Progress = Callable[[int], None]


#: Linux fcntl F_SETPIPE_SZ (not in every Python's fcntl module)
_F_SETPIPE_SZ = 1031


def grow_pipe(fd: int, size: int = CHUNK) -> None:
    """Give a pipe a *size* buffer (default :data:`CHUNK`, the kernel's is 64 KiB): fewer
    wake-ups when a stream is piped through us.  Silently does nothing for non-pipes or over the limit."""
    try:
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            fcntl.fcntl(fd, _F_SETPIPE_SZ, size)
    except OSError:
        pass


class BufferPool:
    """Chunk buffers that are reused only once no memoryview of them is alive."""

    #: buffers kept for reuse; more are made (and dropped) if views pin them all
    KEEP = 4

    def __init__(self, size: int = CHUNK) -> None:
        self.size = size
        self._pool: list[bytearray] = []

    def get(self) -> bytearray:
        for buf in self._pool:
            try:
                buf.append(0)  # fails while any memoryview of buf exists
            except BufferError:
                continue
            buf.pop()
            return buf
        buf = bytearray(self.size)
        if len(self._pool) < self.KEEP:
            self._pool.append(buf)
        return buf


class ChunkReader:
    """Read a file or pipe in chunks of up to *size* bytes into reusable buffers."""

    def __init__(self, src: ByteSource, size: int = CHUNK) -> None:
        self._src = src
        self._size = size
        self._pool = BufferPool(size)
        try:
            self._fd: int | None = src.fileno()
        except (AttributeError, OSError, ValueError):
            self._fd = None
        # a Python-level buffer in front of the fd would hide bytes from os.readv
        if self._fd is not None and hasattr(src, "peek") and src.peek(0):
            self._fd = None
        if self._fd is not None:
            grow_pipe(self._fd, size)


    def read(self) -> memoryview:
        """The next chunk (empty at the end).  Fills the buffer as far as the source
        gives data without waiting for more than one short read after the first."""
        buf = self._pool.get()
        view = memoryview(buf)
        got = 0
        while got < self._size:
            if self._fd is not None:
                n = os.readv(self._fd, [view[got:]])
            else:
                n = self._src.readinto(view[got:]) or 0
            if n == 0:
                break
            got += n
        return view[:got]


def iter_events(src: ByteSource, parser: StreamParser | None = None, chunk: int = CHUNK,
                progress: Progress | None = None) -> Iterator[StreamEvent]:
    """Every event of the stream in *src*, in order.  Consume each event before asking
    for the next one: its ``raw`` view is only valid until the next read."""
    p = parser or StreamParser()
    reader = ChunkReader(src, chunk)
    while True:
        ev = p.next_event()
        if ev is not NEED_DATA:
            yield ev
            continue
        if p.done:
            return
        data = reader.read()
        p.feed(data)
        if progress is not None and data:
            progress(len(data))


def passthrough(src: ByteSource, dst: BinaryIO, chunk: int = CHUNK,
                progress: Progress | None = None) -> StreamParser:
    """Parse *src* and write it unchanged to *dst* (a validating copy)."""
    parser = StreamParser()
    try:
        grow_pipe(dst.fileno())
    except (AttributeError, OSError, ValueError):
        pass
    with StreamWriter(dst) as w:
        for ev in iter_events(src, parser, chunk, progress):
            w.write(ev)
    return parser
