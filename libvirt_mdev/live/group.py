"""One migration's connections that fail together: a main session and its multifd side channels.

The destination's filtering proxy (:class:`~.channels.Migration`) and the source's signing
proxy (:class:`~.signchannels.SignGroup`) group channels differently (by the armed
migration, by the signing session's domain) but end them the same way, here: side
channels wait for the main channel's next hop (:meth:`ChannelGroup.wait_ready`), and any
refusal resets every connection of the group at once with one log line
(:meth:`ChannelGroup.fail`).  :class:`ChannelOwner` is what both proxies' owners of
side channels share: a thread per side channel, the binding's common checks, the
refusal of a channel alone.
"""
from __future__ import annotations

import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from ..config import Config
from ..errors import MdevError, describe_connection
from ..log import LogBudget, get_logger
from ..stream.multifd import read_channel_init
from .relay import ReturnPath, SocketReader, abort_socket, connect, reset_on_close
from .sidepump import DevicePacketSink, SidePump

if TYPE_CHECKING:
    from .options import ProxyOptions
    from .session import Session

log = get_logger("proxy")

#: how often a held side channel looks at its deadline
POLL = 0.05
#: refusal lines kept in memory (tests, :attr:`ChannelOwner.refusals`)
KEEP_REFUSALS = 64
#: at most this many log lines of channels refused alone per window (seconds)
REFUSAL_LINES, REFUSAL_WINDOW = 10, 60.0


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


G = TypeVar("G", bound="ChannelGroup[Any]")


class ChannelOwner(Generic[G, S]):
    """The side channels of one proxy, each served in a thread of its own and bound to a
    group of type *G* (thread-safe; :attr:`lock` guards every group's state too).

    A subclass says how a channel finds its group (:meth:`_bind`, which refuses it
    alone or fails the group when it cannot join) and how it is forwarded
    (:meth:`_forward`); the rest is common: a bad channel init is refused alone, any
    failure after binding fails the whole group."""

    def __init__(self, config: Config, opts: ProxyOptions) -> None:
        self.config, self.opts = config, opts
        self.lock = threading.Lock()
        self.refusals: deque[str] = deque(maxlen=KEEP_REFUSALS)
        self._threads: list[threading.Thread] = []
        #: log lines of channels refused alone (stray, late, bad init): they can come in floods
        self._budget = LogBudget(REFUSAL_LINES, REFUSAL_WINDOW)

    # -- the subclass's part -------------------------------------------------------------------
    def _bind(self, side: S) -> G | None:
        """The group *side* joined, or None (then it was refused alone, or failed its group)."""
        raise NotImplementedError

    def _forward(self, group: G, side: S) -> None:
        """Move *side* to its next hop until it ends (:meth:`ChannelGroup.forward`); raises on
        any refusal."""
        raise NotImplementedError

    # -- serving -------------------------------------------------------------------------------
    def _start(self, side: S) -> None:
        """Serve *side* in a thread of its own."""
        t = threading.Thread(target=self._serve, args=(side,), daemon=True, name="libvirt-mdev-multifd")
        with self.lock:
            self._threads = [x for x in self._threads if x.is_alive()]
            self._threads.append(t)
        t.start()

    def _serve(self, side: S) -> None:
        try:
            side.uuid, side.channel_id = read_channel_init(side.init)
            group = self._bind(side)
        except Exception as exc:  # a bad init, or an unexpected error while binding
            self._refuse_alone(side, f"multifd channel from {side.peer}: {describe_connection(exc)}")
            return
        if group is None:
            return
        try:
            group.wait_ready(self.opts.limits.main_channel_timeout)
            self._forward(group, side)
        except Exception as exc:  # fail closed: the whole group
            group.fail(f"{side.name()}: {describe_connection(exc)}", also=side)

    def _admit(self, group: G, side: S) -> str | None:
        """(With :attr:`lock` held.)  *side* joins *group*, or why it cannot: a second
        channel with its id, or one more than the proxy's ``max_channels``."""
        limit = self.opts.limits.max_channels
        if side.channel_id in group.sides:
            return f"{side.name()}: a second channel with id {side.channel_id}"
        if len(group.sides) >= limit:
            return f"{side.name()}: more than {limit} multifd channels (the proxy's max-channels limit)"
        group.sides[side.channel_id] = side
        return None

    def _connect_next(self) -> socket.socket:
        return connect(self.opts.forward, self.opts.connect_timeout)

    # -- refusals and endings ------------------------------------------------------------------
    def note_refusal(self, why: str) -> None:
        self.refusals.append(why)

    def _refuse_alone(self, side: S, why: str) -> None:
        """Reset *side* alone (it belongs to no group that could fail with it), one line."""
        ok, skipped = self._budget.take()
        if ok:
            log.error(f"{side.peer}: multifd channel REFUSED, reset: {why}"
                      + (f" ({skipped} more refused multifd channel(s) not logged)" if skipped else ""))
        self.note_refusal(why)
        src, side.src = side.src, None
        abort_socket(src)

    @staticmethod
    def _sides_summary(group: ChannelGroup[Any] | None) -> str:
        """For the main session's "done" line: its side channels."""
        if group is None or not group.sides:
            return ""
        return f", {len(group.sides)} multifd channel(s) with {sum(s.bytes_in for s in group.sides.values())} bytes"

    def join(self, timeout: float) -> None:
        with self.lock:
            threads = list(self._threads)
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))


__all__ = ["KEEP_REFUSALS", "POLL", "ChannelGroup", "ChannelOwner", "SideChannel"]
