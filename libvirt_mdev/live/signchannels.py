"""Multifd (``virsh migrate --parallel``) through the signing proxy (``--mode sign``, the source host).

Theory of operation
-------------------
In the signed layout (``docs/signing.md``) the source QEMU connects to this host's
signing proxy over a UNIX socket; the proxy signs each device's state on the main
channel (:class:`~libvirt_mdev.sign.layers.SignLayer`) and forwards to the destination's
verifying proxy, which takes side channels the way ``docs/multifd.md`` says.  Here:

* **Grouping.**  The main channel's session learns its domain uuid when it builds its
  signing context (``--domain``, the domain XML, or the connecting QEMU's ``-uuid``).
  A side channel carries the VM's uuid in its channel init; it joins the signing
  session of that domain (:class:`SignGroup`, keyed by the uuid).  It is refused alone,
  at once, when its uuid cannot be the one this proxy signs: not the uuid that
  ``--domain UUID`` or ``--domain-xml`` pins, or not the ``-uuid`` of the QEMU process
  that opened it (``SO_PEERCRED``).  When both the main channel's and a side channel's
  process are known they must be the same process (one QEMU opens every channel of a
  ``--parallel`` migration itself): otherwise the migration fails closed.
* **Order.**  QEMU flushes its main channel's header only once its side channels are
  up, so side channels usually arrive first: each is held, unforwarded, until the
  signing session of its domain is connected to the next hop (a QEMU 7.2 destination
  takes the first connection for the main channel), within ``main_channel_timeout``;
  a side channel that belongs to no signing session by then is refused.
* **Pass-through.**  Each side channel is read with the exact multifd codec
  (:class:`~libvirt_mdev.stream.multifd.MultifdChannelParser`); RAM packets and pages
  go on as zero-copy pieces of the received chunks (one gathered ``sendmsg`` per
  chunk).  A device-state packet (QEMU 10 vfio-pci ``x-migration-multifd-transfer``)
  is held whole and signed with the signing session's context
  (:class:`~.signdevstate.SignPacketSink`): its statement packet goes out right before
  it (``docs/signing-wire.md``); a device the domain does not have is refused before
  any of it is forwarded.  Side-channel bytes count for the main channel's progress
  deadline.
* **Fail closed, together.**  A refusal on a side channel (device state, a codec or
  socket error, a duplicate channel id, one channel too many, another process) resets
  the main channel and every side channel of the session, one line; a main channel
  that fails resets its side channels.  The source QEMU's migration fails and the
  guest stays on the source.

Held side channels are grouped by uuid before any session knows it, so a group is
created by its first side channel and lives at most ``main_channel_timeout`` without
a main channel.
"""
from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config import Config
from ..errors import MdevError
from ..filter import bindings_from_domain_xml
from ..log import get_logger
from ..sign.source import qemu_uuid_of
from ..store.manifest import is_uuid
from .group import ChannelGroup, ChannelOwner, SideChannel
from .options import ProxyOptions, SessionResult
from .relay import SocketReader
from .session import Session
from .sidepump import DevicePacketSink, RefuseDeviceState
from .signdevstate import SignPacketSink

if TYPE_CHECKING:
    from ..sign.layers import SignContext

log = get_logger("proxy")

#: why the signing proxy refuses device state on side channels of a session it cannot sign for
UNSIGNABLE = "cannot be signed: the signing session has no signing context"


@dataclass(eq=False)
class SignSide(SideChannel):
    """A side channel and the process that opened it (``SO_PEERCRED``; None: unknown)."""

    pid: int | None = None


class SignGroup(ChannelGroup[SignSide]):
    """The side channels of one domain's signing session (keyed by the domain uuid)."""

    def __init__(self, owner: SignChannels, uuid: str) -> None:
        super().__init__(owner.lock)
        self.owner, self.uuid = owner, uuid
        #: the main channel's signing context (its migration id, key and bindings sign device state)
        self.ctx: SignContext | None = None

    def packet_sink(self) -> DevicePacketSink:
        """A side channel's sink for device-state packets: signed with the main channel's context."""
        return SignPacketSink(self.ctx) if self.ctx is not None else RefuseDeviceState(UNSIGNABLE)

    def __str__(self) -> str:
        return f"signed migration of domain {self.uuid}"

    def closed(self) -> None:
        self.owner.forget(self)

    def refused(self, why: str) -> None:
        self.owner.note_refusal(why)

    def late(self, timeout: float) -> str:
        return (f"no signing session of domain {self.uuid} started within {timeout:g}s of its first multifd "
                f"channel: a side channel must belong to a signing session in progress")


class SignSession(Session):
    """A connection to the signing proxy: a main channel that groups its side channels,
    or (behind TLS) a side channel handed to :class:`SignChannels`.

    Hooks of :class:`~.session.Session`: ``on_signing`` (the context is known: join the
    group of its domain), ``on_reader`` (progress credit), ``on_connected`` (release the
    held side channels), ``on_abort`` (fail the group with it; a side channel's refusal is
    the line, :meth:`~.session.Session.abort_from`), ``side_channel`` (a TLS side channel,
    with the connecting process)."""

    def __init__(self, owner: SignChannels, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.owner = owner
        self.group: SignGroup | None = None

    def on_signing(self, ctx: SignContext) -> None:
        if ctx.domain_uuid is not None:  # channel inits carry it lower-case (read_channel_init)
            self.group = self.owner.main_signing(self, ctx.domain_uuid.lower())
            self.group.ctx = ctx

    def on_reader(self, reader: SocketReader) -> None:
        if self.group is not None:
            self.group.main_reader = reader

    def on_connected(self) -> None:
        if self.group is not None:
            self.group.ready.set()

    def serves_side_channels(self) -> bool:
        return True

    def side_channel(self, plain: socket.socket, init: bytes) -> None:
        from .session import open_forward

        opts = self.opts
        self.owner.side_channel(plain, self.result.peer, init, self._accepted,
                                connect=lambda: open_forward(opts)[0], pid=self.peer_pid)

    def on_abort(self, why: str) -> None:
        if self.group is not None:
            self.group.fail(why, logged=True)
        elif not self.handed_off:
            self.owner.main_failed_early(self.peer_pid, why)


class SignChannels(ChannelOwner[SignGroup, SignSide]):
    """The multifd side channels of one signing proxy, grouped by domain (thread-safe)."""

    def __init__(self, config: Config, opts: ProxyOptions) -> None:
        super().__init__(config, opts)
        self.groups: dict[str, SignGroup] = {}
        #: the one domain this proxy signs, when its options pin it (--domain UUID, --domain-xml)
        self.pinned = _pinned_uuid(opts)

    # -- the main channel ------------------------------------------------------------------------
    def main_session(self, *args: Any, **kwargs: Any) -> SignSession:
        """A :class:`SignSession` (the arguments of :class:`~.session.Session`)."""
        return SignSession(self, *args, **kwargs)

    def main_signing(self, session: SignSession, uuid: str) -> SignGroup:
        """*session* signs domain *uuid*: it becomes the main channel of that domain's group."""
        with self.lock:
            group = self.groups.get(uuid)
            if group is not None and group.main is not None:
                raise MdevError(f"domain {uuid} is already being signed for another connection "
                                f"({group.main.result.peer}); one migration of a domain at a time")
            if group is None:
                group = self.groups[uuid] = SignGroup(self, uuid)
            group.main = session
            strangers = [s for s in group.sides.values() if _other_process(s.pid, session.peer_pid)]
        if strangers:
            s = strangers[0]
            group.fail(f"{s.name()} was opened by process {s.pid}, not by the QEMU of the signing session "
                       f"(process {session.peer_pid})")
            raise MdevError(group.failed or "refused")
        return group

    def main_ended(self, session: Session, result: SessionResult) -> None:
        """The main session returned (its line is logged): end its group, failing the
        side channels when it failed."""
        group = session.group if isinstance(session, SignSession) else None
        if group is None:
            return
        with self.lock:
            group.main_done = True
        if not result.ok:
            group.fail(result.error or "the main channel failed", logged=True)
        else:
            with self.lock:
                self.forget(group)

    def main_failed_early(self, pid: int | None, why: str) -> None:
        """A connection failed before it knew its domain: the groups still waiting for
        a main channel whose side channels that same process opened fail with it (at once,
        not at the main-channel deadline)."""
        if pid is None:
            return
        with self.lock:
            orphans = [g for g in self.groups.values()
                       if g.main is None and any(s.pid == pid for s in g.sides.values())]
        for g in orphans:
            g.fail(f"the main channel from the same QEMU (process {pid}) failed: {why}")

    def summary(self, session: Session) -> str:
        """For the main session's "done" line: its side channels."""
        return self._sides_summary(session.group if isinstance(session, SignSession) else None)

    # -- side channels ------------------------------------------------------------------------
    def side_channel(self, sock: socket.socket, peer: str, init: bytes, accepted: float,
                     connect: Callable[[], socket.socket] | None = None, pid: int | None = None) -> None:
        """Serve a side channel in a thread of its own (the signature of
        :meth:`~.channels.Channels.side_channel`, plus *pid*: the process that opened it,
        when *sock* is no longer the socket it connected, e.g. behind TLS)."""
        if pid is None and sock.family == socket.AF_UNIX:
            from ..sign.source import peer_pid

            pid = peer_pid(sock)
        self._start(SignSide(sock, peer, init, connect=connect, pid=pid))

    def _forward(self, group: SignGroup, side: SignSide) -> None:
        group.forward(side, group.packet_sink(), self._connect_next, self.opts.drain_timeout)

    def _bind(self, side: SignSide) -> SignGroup | None:
        """The group *side* joins, or None (then it was refused alone)."""
        if self.pinned is not None and side.uuid != self.pinned:
            self._refuse_alone(side, f"{side.name()} carries VM uuid {side.uuid}, but this proxy signs domain "
                                     f"{self.pinned} only (--domain, --domain-xml): it belongs to no signing "
                                     f"session")
            return None
        qemu = qemu_uuid_of(side.pid) if side.pid else None
        if qemu is not None and qemu != side.uuid:
            self._refuse_alone(side, f"{side.name()} carries VM uuid {side.uuid}, but the QEMU that opened it "
                                     f"(process {side.pid}) runs VM {qemu}")
            return None
        with self.lock:
            group = self.groups.get(side.uuid)
            if group is None:
                group = self.groups[side.uuid] = SignGroup(self, side.uuid)
            main_pid = group.main.peer_pid if group.main is not None else None
            stranger = (f"{side.name()} was opened by process {side.pid}, not by the QEMU of the signing session "
                        f"(process {main_pid})") if _other_process(side.pid, main_pid) else None
            why = stranger or self._admit(group, side)
            if why is None:
                return group
        group.fail(why, also=side)
        return None

    # -- endings -------------------------------------------------------------------------------
    def forget(self, group: SignGroup) -> None:
        """(With :attr:`lock` held.)  *group* takes no more channels."""
        if self.groups.get(group.uuid) is group:
            del self.groups[group.uuid]



def _pinned_uuid(opts: ProxyOptions) -> str | None:
    """The domain uuid the options pin: ``--domain UUID``, else the ``<uuid>`` of ``--domain-xml``."""
    if opts.domain is not None and is_uuid(opts.domain.lower()):
        return opts.domain.lower()
    if opts.domain_xml is not None:
        try:
            _bindings, _name, uuid = bindings_from_domain_xml(opts.domain_xml.read_bytes())
        except (OSError, MdevError):
            return None  # the signing session reports an unreadable or bad file
        return uuid.lower() if uuid else None
    return None


def _other_process(a: int | None, b: int | None) -> bool:
    """Two known, different processes."""
    return a is not None and b is not None and a != b


__all__ = ["SignChannels", "SignGroup", "SignSession", "SignSide"]
