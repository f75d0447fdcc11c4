"""Small helpers shared by the payload readers (private).

Readers are generators: they yield events, or :data:`NEED_DATA` when the input is
short, and are resumed after the next feed.  ``need``/``need_peek`` wrap the
retry loop so a reader reads like straight-line code::

    hdr = yield from need(inp, 8, "RAM record header", sec)
"""
from __future__ import annotations

from collections.abc import Callable, Generator
from typing import TypeVar

from ..errors import StreamError
from .buffer import Input
from .events import NEED_DATA, NeedData

#: what a piece maker builds (a stream event, a multifd channel event)
E = TypeVar("E")


def need(inp: Input, n: int, what: str, section: str | None = None) -> Generator[NeedData, None, memoryview]:
    """Consume exactly *n* bytes, yielding NEED_DATA until they are there."""
    while True:
        view = inp.take(n)
        if view is not None:
            return view
        if inp.eof:
            raise StreamError(f"stream ends inside {what} ({n} bytes needed, "
                              f"{inp.available()} left)", offset=inp.offset, section=section)
        yield NEED_DATA


def need_peek(inp: Input, n: int, what: str, section: str | None = None) -> Generator[NeedData, None, bytes]:
    """Look at the next *n* bytes without consuming them."""
    while True:
        data = inp.peek(n)
        if data is not None:
            return data
        if inp.eof:
            raise StreamError(f"stream ends inside {what}", offset=inp.offset, section=section)
        yield NEED_DATA


def pieces(inp: Input, n: int, what: str, section: str | None,
           make: Callable[[int, memoryview], E]) -> Generator[E | NeedData, None, None]:
    """Hand out an *n*-byte span as zero-copy pieces (one per fed chunk), each wrapped
    by ``make(offset, view)``.  Used for page bodies, device-state blocks, bitmaps."""
    left = n
    while left:
        view = inp.take_upto(left)
        if view is None:
            if inp.eof:
                raise StreamError(f"stream ends inside {what} ({left} of {n} bytes missing)",
                                  offset=inp.offset, section=section)
            yield NEED_DATA
            continue
        left -= len(view)
        yield make(inp.offset - len(view), view)


def join(parts: list[memoryview]) -> memoryview:
    """One view over consecutive small parts (copies only when there are several)."""
    if len(parts) == 1:
        return parts[0]
    return memoryview(b"".join(parts))


def printable_ascii(data: bytes) -> bool:
    return all(0x20 <= b < 0x7F for b in data)
