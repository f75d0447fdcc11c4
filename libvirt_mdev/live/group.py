"""One migration's connections that fail together: a main session and its multifd side channels.

The destination's filtering proxy (:class:`~.channels.Migration`) and the source's signing
proxy (:class:`~.signchannels.SignGroup`) group channels differently (by the armed
migration, by the signing session's domain) but end them the same way, here: side
channels wait for the main channel's next hop (:meth:`ChannelGroup.wait_ready`), and any
refusal resets every connection of the group at once with one log line
(:meth:`ChannelGroup.fail`).
"""
from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

from ..errors import MdevError
from ..log import get_logger
from .relay import ReturnPath, SocketReader, abort_socket, reset_on_close
from .sidepump import DevicePacketSink, SidePump

if TYPE_CHECKING:
    from .session import Session

log = get_logger("proxy")

#: how often a held side channel looks at its deadline
POLL = 0.05


@dataclass(eq=False)
class SideChannel:
    """One side channel's two sockets and counters."""

    src: socket.socket | None
    peer: str
    init: bytes
    channel_id: int = -1
    uuid: str = ""
    dst: socket.socket | None = None
    bytes_in: int = 0
    bytes_out: int = 0
    done: bool = False
    #: how to reach the next hop for this channel (None: a plain connection to the proxy's forward
    #: address; a TLS proxy passes one that re-originates TLS)
    connect: Callable[[], socket.socket] | None = None

    def name(self) -> str:
        return f"multifd channel {self.channel_id} from {self.peer}"


S = TypeVar("S", bound=SideChannel)


class ChannelGroup(Generic[S]):
    """A main session and its side channels of type *S* (state guarded by the owner's *lock*)."""

    def __init__(self, lock: threading.Lock) -> None:
        self.lock = lock
        self.created = time.monotonic()
        self.main: Session | None = None
        #: the main session returned (its own line, if any, is logged)
        self.main_done = False
        #: set when the main channel is connected to its next hop, or the group failed
        self.ready = threading.Event()
        self.failed: str | None = None
        self.sides: dict[int, S] = {}
        #: the main channel's reader: side-channel bytes count for its progress deadline
        self.main_reader: SocketReader | None = None

    # -- hooks ---------------------------------------------------------------------------------
    def closed(self) -> None:
        """(With :attr:`lock` held.)  The group failed: it takes no more channels."""

    def refused(self, why: str) -> None:
        """The group failed for *why* (once, after every socket was reset)."""

    def side_ended(self, side: S) -> None:
        """*side* ended cleanly (both its sockets closed with a FIN)."""
        with self.lock:
            side.done = True

    def late(self, timeout: float) -> str:
        """Why side channels gave up waiting for their main channel after *timeout* seconds."""
        return f"the main channel of {self} did not arrive within {timeout:g}s of its first multifd channel"

    # -- waiting and failing -------------------------------------------------------------------
    def wait_ready(self, timeout: float) -> None:
        """Hold a side channel until the main channel is connected to its next hop; fail
        when no main channel came within *timeout* of the group's first channel."""
        while not self.ready.wait(POLL):
            if self.main is None and time.monotonic() - self.created >= timeout:
                raise MdevError(f"{self.late(timeout)} (the proxy's main-channel deadline)")
        if self.failed is not None:
            raise MdevError(self.failed)

    def forward(self, side: S, sink: DevicePacketSink, connect_next: Callable[[], socket.socket],
                drain_timeout: float, at_eof: Callable[[], None] | None = None) -> None:
        """Move *side* to its next hop (:class:`~.sidepump.SidePump`, device state to *sink*)
        until the source ends it, then let the next hop see the end and wait up to
        *drain_timeout* for it to close.  *at_eof*: called at the source's end, before the
        next hop sees it (a sink that still expects something refuses there).  Any failure
        raises (the caller fails the group)."""
        dst = side.connect() if side.connect is not None else connect_next()
        with self.lock:
            src = side.src
            if self.failed is not None or src is None:
                abort_socket(dst)
                raise MdevError(self.failed or "reset")
            side.dst = dst
        back = ReturnPath(dst, src, lambda why: self.fail(f"{side.name()}: {why}"))
        back.start()

        def arrived(n: int) -> None:
            side.bytes_in += n
            if self.main_reader is not None:  # side-channel bytes are the migration's progress
                self.main_reader.credit(n)

        def sent(n: int) -> None:
            side.bytes_out += n

        SidePump(src, dst, sink, prefix=side.init, on_input=arrived, on_output=sent).run()
        if at_eof is not None:
            at_eof()
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        back.join(drain_timeout)
        with self.lock:
            if self.failed is not None:
                raise MdevError(self.failed)
            ends = (side.src, side.dst)
            side.src = side.dst = None
        for sock in ends:  # a normal end: FIN, not a reset
            if sock is not None:
                reset_on_close(sock, False)
                sock.close()
        self.side_ended(side)

    def fail(self, why: str, *, also: S | None = None, logged: bool = False) -> None:
        """Fail the whole group closed: reset the main channel and every side channel (and
        *also*, a channel refused while joining).  The first reason wins; one line, the main
        session's when it still runs (*logged*: the caller logged it already)."""
        with self.lock:
            first = self.failed is None
            if first:
                self.failed = why
            self.closed()
            sides: list[S] = list(self.sides.values()) + ([also] if also is not None else [])
            socks = []
            for s in sides:
                socks += [s.src, s.dst]
                s.src = s.dst = None
            main, main_done = self.main, self.main_done
        self.ready.set()
        if first and main is not None and not main_done and not logged:
            # before any side channel is reset: the source, seeing that, may end the main channel,
            # and the main session must then report this refusal, not a truncated stream
            main.abort_from(why)
        for sock in socks:
            abort_socket(sock)
        if not first:
            return
        self.refused(why)
        if (main is None or main_done) and not logged:
            log.error(f"{self} REFUSED, {'main and ' if main is not None else ''}{len(sides)} multifd "
                      f"channel(s) reset: {why}")


__all__ = ["POLL", "ChannelGroup", "SideChannel"]
