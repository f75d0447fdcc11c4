"""Multifd (``virsh migrate --parallel``): one migration is its main channel plus N side channels.

Theory of operation
-------------------
With multifd the source QEMU opens one *main* channel (the ``QEVM`` stream, served by a
:class:`~.session.Session` like any migration) and N *side* channels to the same
address, in any order (``docs/multifd.md``).  Here:

* **Admission.**  A side channel is told apart by its first 4 bytes (``11 22 33 44``);
  :mod:`.admission` holds it, under the same deadlines as a QEMU header, until its whole
  64-byte channel-init message arrived, then hands it to :meth:`Channels.side_channel`.
* **Binding.**  The channel init carries the VM's uuid (libvirt passes the domain uuid
  as QEMU's ``-uuid``) and a channel id.  The channel is bound to the armed migration
  (the pending record the main channel would serve, chosen the same way) only when the
  uuid is that record's domain uuid.  The main channel joins the same
  :class:`Migration` when its session has claimed the record (:class:`MainSession`).
* **Order.**  QEMU 7.2's destination takes the first connection it accepts for the
  main channel, so side channels are held, unforwarded, until the main channel is
  connected to the local QEMU; then each side channel gets its own connection to it.
* **Filtering.**  Each side channel is moved by :class:`~.sidepump.SidePump` through the
  exact multifd codec (:class:`~libvirt_mdev.stream.multifd.MultifdChannelParser`): RAM
  pages pass straight through (spliced when the local QEMU listens on a UNIX socket),
  device state (QEMU 10's ``x-migration-multifd-transfer``) goes to the migration's
  :class:`~.devstate.MultifdStates`, which stores it before it is forwarded; on a host
  that verifies signatures each packet is first verified against the signed statement
  packet before it (:mod:`.signdevstate`), bound to the main channel's verified hello.
* **Fail closed, all together.**  Any refusal of a bound channel — device state, a uuid
  that is not the armed domain's, a duplicate channel id, more than ``max_channels``,
  side channels whose main channel does not arrive within ``main_channel_timeout``, a
  codec or socket error, a return-path error — resets the main channel and every side
  channel of the migration at once, with one log line (the main session's line when it
  runs, else ours).  A main channel that fails fails its side channels the same way.
  A channel that arrives after its migration ended (or failed) is refused, and so is a
  stray side channel when no migration is armed: those are reset alone.

Side channels have no progress deadline of their own (an iteration may leave a channel
idle for a long time): they live no longer than their migration, whose main channel
has one — and their bytes count as its progress, since with multifd the RAM travels
on them while the main channel carries little.
"""
from __future__ import annotations

import socket
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from ..config import Config
from ..errors import MdevError
from ..log import get_logger
from ..store import Store
from ..store.pending import PendingRecord
from .arming import bindings_from_pending, select_pending
from .devstate import MultifdStates, PacketSink
from .group import ChannelGroup, ChannelOwner, SideChannel
from .options import ProxyOptions, SessionResult
from .relay import SocketReader
from .session import Session
from .signdevstate import HelloGate, PacketPolicy, VerifyPacketSink

log = get_logger("proxy")

#: ended migrations remembered (a channel for one of them is refused as late)
KEEP_ENDED = 256


def record_field(record: Any, name: str) -> Any:
    """A pending record's field, whether the record is a dict or an object with attributes."""
    if isinstance(record, dict):
        return record[name]
    return getattr(record, name)


class MainSession(Session):
    """The session of a main channel, joined to its migration's side channels through the
    hooks of :class:`~.session.Session`: ``on_armed`` (join the :class:`Migration`),
    ``on_reader`` (side-channel bytes count for its progress deadline), ``on_connected``
    (release the held side channels); a side channel's refusal resets it with
    :meth:`~.session.Session.abort_from`."""

    def __init__(self, channels: Channels, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.channels = channels
        self.migration: Migration | None = None

    def on_armed(self, record: PendingRecord) -> None:
        self.migration = self.channels.main_armed(self, record)

    def on_hello(self, hello: dict[str, Any] | None) -> None:
        if self.migration is not None:
            self.migration.hello.set(hello)

    def on_reader(self, reader: SocketReader) -> None:
        if self.migration is not None:
            self.migration.main_reader = reader

    def on_connected(self) -> None:
        if self.migration is not None:
            self.migration.main_connected()

    def run(self) -> SessionResult:
        result = super().run()
        mig = self.migration
        if mig is None:
            return result
        with self.channels.lock:
            sides = list(mig.sides.values())
        result.channels = len(sides)
        result.channel_bytes_in = sum(s.bytes_in for s in sides)
        result.channel_bytes_out = sum(s.bytes_out for s in sides)
        if mig.states is not None:  # device state that came on side channels
            result.devices += [dict(r.to_json(), channel="multifd") for r in list(mig.states.results)]
        return result

    @property
    def claimed(self) -> Any:
        """The pending record this session claimed (None before its claim)."""
        return self._record


class Migration(ChannelGroup[SideChannel]):
    """The channels of one armed migration (keyed by its migration id)."""

    def __init__(self, owner: Channels, record: Any) -> None:
        super().__init__(owner.lock)
        self.owner = owner
        self.migration_id: str = record_field(record, "migration_id")
        self.domain_uuid: str = record_field(record, "domain_uuid")
        self.domain_name: str = record_field(record, "domain_name")
        self.connected = False
        self.ended = False
        self.record = record
        #: the device state that came on side channels (created by the first side channel)
        self.states: MultifdStates | None = None
        #: the main channel's verified signed hello (a verifying host binds side channels' statements to it)
        self.hello = HelloGate()
        #: how side channels verify signed device state (None: this host does not verify)
        self.packet_policy: PacketPolicy | None = None
        #: the main session returned successfully
        self.main_ok = False
        self._settled = False

    def __str__(self) -> str:
        return f"domain {self.domain_name} migration {self.migration_id}"

    def main_connected(self) -> None:
        self.connected = True
        self.ready.set()

    # -- device state on side channels (live/devstate.py) ------------------------------------
    def packet_sink(self) -> PacketSink | VerifyPacketSink:
        """A side channel's sink for device-state packets: this migration's store of them,
        behind the verification of their signed statements on a host that verifies."""
        owner = self.owner
        with owner.lock:
            if self.failed is not None:
                raise MdevError(self.failed)
            if self.states is None:
                store = Store.open(owner.config.store, create=True)
                why = signed_only(owner.config)
                self.states = MultifdStates(store, migration_id=self.migration_id, domain_name=self.domain_name,
                                            domain_uuid=self.domain_uuid,
                                            bindings=bindings_from_pending(self.record),
                                            verify=owner.opts.verify, signed_only=why)
                if why is not None:
                    self.packet_policy = self._packet_policy(store, why)
            sink = self.states.sink()
            if self.packet_policy is None:
                return sink
            return VerifyPacketSink(sink, self.packet_policy)

    def _packet_policy(self, store: Store, why: str) -> PacketPolicy:
        """The trusted keys the main channel verifies with, and its hello to bind to."""
        from ..sign.source import verify_policy

        policy = verify_policy(self.owner.config, store)
        assert policy is not None  # signed_only() said this host verifies
        return PacketPolicy(policy.trusted, self.hello, self.owner.opts.limits.main_channel_timeout, why)

    def side_ended(self, side: SideChannel) -> None:
        """*side* ended cleanly: settle when it was the last channel to end."""
        super().side_ended(side)
        self._settle_if_done()

    def main_succeeded(self) -> None:
        with self.owner.lock:
            self.main_ok = True
        self._settle_if_done()
        # QEMU closes its side channels as the migration ends: one still open after the drain
        # deadline is cut (its thread and sockets must not outlive the migration)
        grace = self.owner.opts.drain_timeout
        timer = threading.Timer(grace, self._cut_stragglers, args=(grace,))
        timer.daemon = True
        timer.start()

    def _cut_stragglers(self, grace: float) -> None:
        with self.owner.lock:
            open_ = [s for s in self.sides.values() if not s.done]
            settled = self._settled
        if open_ and not settled:
            self.fail(f"{len(open_)} multifd channel(s) still open {grace:g}s after the main channel ended "
                      f"(the proxy's drain deadline)")

    def _settle_if_done(self) -> None:
        """Main channel and every side channel ended well: the device state that came on
        side channels becomes loadable (or, incomplete, fails the migration)."""
        with self.owner.lock:
            if self._settled or self.failed is not None or not self.main_ok:
                return
            if not all(s.done for s in self.sides.values()):
                return
            self._settled = True
            states = self.states
        if states is None:
            return
        try:
            states.accept()
        except MdevError as exc:
            self.fail(exc.message)
        finally:
            states.store.close()

    def closed(self) -> None:
        self.owner.end(self)

    def refused(self, why: str) -> None:
        self.hello.set(None, f"the migration failed: {why}")  # a side channel waiting for the hello gives up
        self._refuse_states(why)
        self.owner.note_refusal(why)

    def _refuse_states(self, why: str) -> None:
        with self.owner.lock:
            states, settled, self._settled = self.states, self._settled, True
        if states is not None:
            states.refuse(why)  # none of it ever loadable
            if not settled:
                states.store.close()


def signed_only(config: Config) -> str | None:
    """Why this host takes signed device state only (each multifd device-state packet must
    follow its verified statement packet, :mod:`.signdevstate`), or None."""
    if config.require_signature:
        return f"this host requires signed device state (require_signature in {config.source})"
    if config.trusted_keys:
        return f"this host verifies device state against trusted_keys ({config.source})"
    return None


class Channels(ChannelOwner[Migration, SideChannel]):
    """The multifd side channels of one proxy, grouped by migration (thread-safe)."""

    def __init__(self, config: Config, opts: ProxyOptions) -> None:
        super().__init__(config, opts)
        self.live: dict[str, Migration] = {}
        #: migration id → domain uuid of migrations that ended (either way), oldest first
        self.ended: OrderedDict[str, str] = OrderedDict()
        #: why an ended migration failed (migration id -> the group's first reason), for the main
        #: channel that arrives after its side channels failed it
        self.failed_why: OrderedDict[str, str] = OrderedDict()

    # -- the main channel ------------------------------------------------------------------------
    def main_session(self, *args: Any, **kwargs: Any) -> MainSession:
        """A :class:`MainSession` (the arguments of :class:`Session`)."""
        return MainSession(self, *args, **kwargs)

    def main_armed(self, session: MainSession, record: Any) -> Migration:
        """The main channel claimed *record*: join (or open) its migration."""
        mid = record_field(record, "migration_id")
        with self.lock:
            if mid in self.ended:
                mig = None
            else:
                mig = self.live.get(mid)
                if mig is None:
                    mig = self.live[mid] = Migration(self, record)
                mig.main = session
        if mig is None:
            why = self.failed_why.get(mid)
            raise MdevError(f"migration {mid} of domain {record_field(record, 'domain_name')} already "
                            + (f"failed on its multifd channels ({why})" if why is not None else
                               "ended on its multifd channels") + "; refusing its main channel")
        return mig

    def main_ended(self, session: Session, result: SessionResult) -> None:
        """The main session returned (its line is logged): end its migration, failing the
        side channels when it failed."""
        if not isinstance(session, MainSession):
            return
        mig = session.migration
        with self.lock:
            if mig is None and session.claimed is not None:  # refused after its claim (a re-check failed)
                mid = record_field(session.claimed, "migration_id")
                mig = self.live.get(mid)
                if mig is None:  # no side channel bound yet: one that binds now is late
                    self._mark_ended(mid, record_field(session.claimed, "domain_uuid"))
                    return
            if mig is None:
                return
            mig.main_done = True
            failed = mig.failed
        if not result.ok:
            mig.fail(result.error or "the main channel failed", logged=True)
        elif failed is not None:  # failed just as the session returned: say so once
            log.error(f"{mig} REFUSED on a multifd channel after its main channel completed: {failed}")
        else:
            with self.lock:
                self.end(mig)
            mig.main_succeeded()

    def summary(self, session: Session) -> str:
        """For the main session's "done" line: its side channels."""
        return self._sides_summary(session.migration if isinstance(session, MainSession) else None)

    # -- side channels ------------------------------------------------------------------------
    def side_channel(self, sock: socket.socket, peer: str, init: bytes, accepted: float,
                     connect: Callable[[], socket.socket] | None = None) -> None:
        """From the admission thread: serve a side channel in a thread of its own
        (*connect*: how to reach the local QEMU, see :attr:`SideChannel.connect`)."""
        self._start(SideChannel(sock, peer, init, connect=connect))

    def _forward(self, group: Migration, side: SideChannel) -> None:
        sink = group.packet_sink()
        group.forward(side, sink, self._connect_next, self.opts.drain_timeout, at_eof=sink.finish)

    def _bind(self, side: SideChannel) -> Migration | None:
        """The migration *side* belongs to, or None (then it was refused alone)."""
        try:
            record = select_pending(self.config, self.opts.domain, self.opts.proc_root)
        except MdevError as exc:
            with self.lock:
                late = side.uuid in self.ended.values()
            if late:
                self._refuse_alone(side, f"{side.name()} of VM {side.uuid} arrived after its migration ended")
            else:
                self._refuse_alone(side, f"{side.name()} of VM {side.uuid}: no migration to serve it: "
                                         f"{exc.message}")
            return None
        mid = record_field(record, "migration_id")
        mig: Migration | None = None
        why: str | None = None
        with self.lock:
            if mid not in self.ended:
                mig = self.live.get(mid)
                if mig is None:
                    mig = self.live[mid] = Migration(self, record)
                why = self._other_vm(mig, side) or self._admit(mig, side)
        if mig is None:  # it ended
            self._refuse_alone(side, f"{side.name()} arrived after migration {mid} ended")
        elif why is None:
            return mig
        else:
            mig.fail(why, also=side)
        return None

    @staticmethod
    def _other_vm(mig: Migration, side: SideChannel) -> str | None:
        """Why *side* cannot be *mig*'s: it carries another VM's uuid (None: it is the armed domain's)."""
        if side.uuid == mig.domain_uuid:
            return None
        return (f"{side.name()} carries VM uuid {side.uuid}, not the armed domain's "
                f"({mig.domain_name}, {mig.domain_uuid})")

    # -- endings -------------------------------------------------------------------------------
    def end(self, mig: Migration) -> None:
        """(With :attr:`lock` held.)  *mig* takes no more channels."""
        mig.ended = True
        self.live.pop(mig.migration_id, None)
        self._mark_ended(mig.migration_id, mig.domain_uuid, mig.failed)

    def _mark_ended(self, migration_id: str, domain_uuid: str, failed: str | None = None) -> None:
        self.ended[migration_id] = domain_uuid
        if failed is not None:
            self.failed_why[migration_id] = failed
        for kept in (self.ended, self.failed_why):
            while len(kept) > KEEP_ENDED:
                kept.popitem(last=False)


__all__ = ["Channels", "MainSession", "Migration", "SideChannel", "record_field", "signed_only"]
