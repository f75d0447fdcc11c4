"""The parser's input buffer: zero-copy views into fed chunks.

Theory of operation
-------------------
Streams are many GB; the bulk is RAM page data that we only need to *delimit*, never
to copy.  So the buffer keeps the chunks exactly as they were fed (as memoryviews)
and hands out views into them.  Only a record *header* that straddles two chunks is
copied, into a small bytes object, and that costs at most a few hundred bytes per
chunk.  Large spans (page data, device-state blocks, vmstate bodies) are handed out
piecewise with :meth:`Input.take_upto`, one view per chunk, so a multi-MiB block is
never joined in memory.

Methods named ``take*`` consume; ``peek*`` do not.  Every method returns ``None``
("need more data") without consuming anything when the input is short, so a reader
can simply retry after the next :meth:`feed` (the transactional style of wsproto's
``Buffer``).

Small feeds are gathered (copied) into one block of up to :data:`GATHER` bytes before
they join the queue.  A queued view costs ~300 bytes of bookkeeping whatever its length,
so a peer dripping a large record one byte per ``recv`` (a 64 MiB vmdesc, a save-image
XML area) would otherwise cost ~300 times the claimed size while the parser waits for
all of it.  With gathering, memory stays within a few percent of the bytes queued.
"""
from __future__ import annotations

from collections import deque
from re import Pattern

_EMPTY = memoryview(b"")

#: feeds shorter than this are copied into a shared block instead of queued one by one
GATHER = 64 << 10


class Input:
    __slots__ = ("_acc", "_queue", "_queued", "base", "eof", "pos", "seg")

    def __init__(self) -> None:
        self._queue: deque[memoryview] = deque()
        #: the chunk being parsed, and the position in it
        self.seg: memoryview = _EMPTY
        self.pos = 0
        #: absolute stream offset of ``seg[0]``
        self.base = 0
        #: bytes in ``_queue``
        self._queued = 0
        #: small feeds not yet queued (see GATHER)
        self._acc = bytearray()
        self.eof = False

    # -- feeding -------------------------------------------------------------------

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append *data*; ``b""`` marks the end of the input."""
        if not data:
            self._flush()
            self.eof = True
            return
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        if len(view) < GATHER:
            self._acc += view
            if len(self._acc) >= GATHER:
                self._flush()
            return
        self._flush()
        self._enqueue(view)

    def _flush(self) -> None:
        """Queue the gathered small feeds as one chunk."""
        if self._acc:
            acc, self._acc = self._acc, bytearray()
            self._enqueue(memoryview(acc))

    def _enqueue(self, view: memoryview) -> None:
        if self.pos >= len(self.seg) and not self._queue:
            self.base += len(self.seg)
            self.seg, self.pos = view, 0
        else:
            self._queue.append(view)
            self._queued += len(view)

    # -- state -------------------------------------------------------------------------

    @property
    def offset(self) -> int:
        """Absolute offset of the next unconsumed byte."""
        return self.base + self.pos

    def available(self) -> int:
        return len(self.seg) - self.pos + self._queued + len(self._acc)

    def at_end(self) -> bool:
        """True when everything fed was consumed and the input has ended."""
        return self.eof and self.available() == 0

    def _next_seg(self) -> None:
        self.base += len(self.seg)
        self.seg = self._queue.popleft()
        self._queued -= len(self.seg)
        self.pos = 0

    def _settle(self) -> None:
        """Move to the next chunk when the current one is used up (keeps ``seg`` useful)."""
        if self.pos >= len(self.seg) and not self._queue:
            self._flush()
        while self.pos >= len(self.seg) and self._queue:
            self._next_seg()

    # -- consuming ----------------------------------------------------------------------

    def take(self, n: int) -> memoryview | None:
        """Exactly *n* bytes, or ``None``.  Copies only when they straddle chunks."""
        self._settle()
        end = self.pos + n
        if end <= len(self.seg):
            view = self.seg[self.pos:end]
            self.pos = end
            return view
        if self.available() < n:
            return None
        self._flush()
        parts = [self.seg[self.pos:]]
        need = n - len(parts[0])
        while need > 0:
            self._next_seg()
            piece = self.seg[:need]
            parts.append(piece)
            need -= len(piece)
            self.pos = len(piece)
        return memoryview(b"".join(parts))

    def peek(self, n: int) -> bytes | None:
        """The next *n* bytes without consuming them, or ``None``."""
        self._settle()
        end = self.pos + n
        if end <= len(self.seg):
            return bytes(self.seg[self.pos:end])
        if self.available() < n:
            return None
        self._flush()
        out = bytearray(self.seg[self.pos:])
        for chunk in self._queue:
            out += chunk[: n - len(out)]
            if len(out) >= n:
                break
        return bytes(out)

    def peek_upto(self, n: int) -> bytes:
        """Up to *n* next bytes (fewer at the end of what was fed), not consumed."""
        avail = self.available()
        return self.peek(min(n, avail)) or b""

    def take_upto(self, n: int) -> memoryview | None:
        """Between 1 and *n* bytes from the current chunk (zero-copy), or ``None``."""
        self._settle()
        if self.pos >= len(self.seg):
            return None
        end = min(self.pos + n, len(self.seg))
        view = self.seg[self.pos:end]
        self.pos = end
        return view

    def match(self, pattern: Pattern[bytes]) -> memoryview | None:
        """Consume the longest match of *pattern* at the current position within the
        current chunk (a C-speed scan over runs of small records)."""
        self._settle()
        m = pattern.match(self.seg, self.pos)
        if m is None or m.end() == self.pos:
            return None
        view = self.seg[self.pos:m.end()]
        self.pos = m.end()
        return view

    def search_in_chunk(self, pattern: Pattern[bytes]) -> int:
        """Index (relative to the current position) of the first match of *pattern* in
        the rest of the current chunk, or -1.  Nothing is consumed."""
        self._settle()
        m = pattern.search(self.seg, self.pos)
        return -1 if m is None else m.start() - self.pos

    def chunk_remaining(self) -> int:
        self._settle()
        return len(self.seg) - self.pos
