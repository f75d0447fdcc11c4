"""Signed VFIO device state on multifd side channels (QEMU 10 ``x-migration-multifd-transfer``).

Theory of operation (the wire format is in ``docs/signing-wire.md``)
--------------------------------------------------------------------
A side channel is a sequence of whole packets, and the packets of one device race each
other over the channels, so each device-state packet is signed on its own: the signing
proxy puts a *statement packet* (a multifd device-state packet named like the main
channel's signed-statement record, :func:`~libvirt_mdev.sign.record.encode_statement_packet`)
right before it, on the same channel.

* :class:`SignPacketSink` (source, ``--mode sign``): holds each device-state packet whole
  (at most :data:`~.devstate.MAX_PACKET`), refuses a device the signing session's domain
  does not have, signs a ``packet`` statement over its exact bytes, and only then hands
  out statement and packet for forwarding.
* :class:`VerifyPacketSink` (destination, a host that verifies signatures): in front of
  the migration's :class:`~.devstate.PacketSink`.  A statement packet is verified, bound
  to the main channel's verified hello (:class:`HelloGate`) and stripped; the device
  packet after it must be the one it names, of its length, and is handed on (stored,
  then forwarded, by :mod:`.devstate`) only once its SHA-256, index and flags match.
  A device packet without a statement, a statement without its packet, another device's
  or another migration's statement, another key: the migration fails closed.
* :class:`HelloGate`: the main channel's hello, handed from its session to the side
  channels, which may read a statement before the main channel was verified; they wait
  for it (bounded by the main-channel deadline), never forward unbound.
"""
from __future__ import annotations

import hashlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import MdevMissing, SignatureError
from ..sign.record import MAX_RECORD, SIG_IDSTR, SIG_INSTANCE, decode_record, encode_statement_packet
from ..stream.events import Bytes
from ..stream.multifd import DeviceStatePacket
from ..stream.vfio import read_state_packet
from ..stream.wire import VFIO_STATE_PACKET
from .devstate import MAX_PACKET, PacketSink

if TYPE_CHECKING:
    from ..sign.keys import TrustedKeys
    from ..sign.signer import SignContext


def _where(ev: DeviceStatePacket) -> str:
    return f"{ev.idstr} instance {ev.instance_id}"


# -- the source: sign each packet ----------------------------------------------------------------
class SignPacketSink:
    """One side channel's device-state packets at the signing proxy: each held whole,
    signed, then forwarded after its statement packet (a ``DevicePacketSink`` of
    :mod:`.sidepump`)."""

    def __init__(self, ctx: SignContext) -> None:
        self.ctx = ctx
        self._ev: DeviceStatePacket | None = None
        self._buf = bytearray()
        #: packets signed on this channel
        self.signed = 0

    def begin(self, ev: DeviceStatePacket) -> None:
        """Refuse before any payload is taken: our own record name, a device the domain
        does not have (its bindings), a packet larger than the proxy holds."""
        where = _where(ev)
        if ev.idstr == SIG_IDSTR:
            raise SignatureError(f"the source sends a device-state packet named {SIG_IDSTR!r}, the name of "
                                 f"libvirt-mdev's signed statements; refusing to sign")
        b = (self.ctx.bindings or {}).get(ev.idstr)
        if b is None or b.instance_id != ev.instance_id:
            known = ", ".join(sorted(self.ctx.bindings or {})) or "none"
            raise MdevMissing(f"a multifd channel carries state for VFIO device {where}, which the domain does "
                              f"not have (its mdev devices: {known}); refusing to sign it")
        if ev.data_len > MAX_PACKET:
            raise SignatureError(f"multifd device-state packet of {where}: {ev.data_len} bytes, more than the "
                                 f"{MAX_PACKET} the signing proxy holds to sign one; refusing to sign")
        self._ev, self._buf = ev, bytearray()

    def data(self, piece: Bytes) -> None:
        self._buf += piece

    def end(self) -> Sequence[Bytes]:
        ev, payload = self._ev, bytes(self._buf)
        assert ev is not None, "end() without begin()"
        self._ev, self._buf = None, bytearray()
        pkt = read_state_packet(payload, _where(ev))  # what QEMU's loader would refuse is not signed
        _version, idx, flags = VFIO_STATE_PACKET.unpack_from(payload)
        h = hashlib.sha256(ev.raw)
        h.update(payload)
        from ..sign import statements  # lazily: cryptography, only where device state is signed

        ctx = self.ctx
        stmt = statements.packet(migration=ctx.migration_id, signer=ctx.key.key_id, idstr=ev.idstr,
                                 instance_id=ev.instance_id, idx=idx, flags=flags,
                                 length=len(ev.raw) + len(payload), sha256=h.hexdigest(),
                                 count=pkt.idx + 1 if pkt.config else 0)
        body, sig = statements.sign(ctx.key, stmt)
        self.signed += 1
        return [encode_statement_packet(body, sig), ev.raw, payload]


# -- the destination: the main channel's hello, for the side channels ---------------------------
class HelloGate:
    """The main channel's verified hello, awaited by side channels (thread-safe).

    Set once by the main channel's session: the hello (verified: key, age, replay, domain),
    or None with the reason there is none (the stream showed its first section without
    one, or the migration failed)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._event = threading.Event()
        self._hello: dict[str, Any] | None = None
        self._none: str | None = None

    def set(self, hello: dict[str, Any] | None, why: str = "the main channel carries no signed hello") -> None:
        with self._lock:  # the main channel's session and a failing migration may race: the first wins
            if self._event.is_set():
                return
            self._hello, self._none = hello, (None if hello is not None else why)
            self._event.set()

    def wait(self, timeout: float) -> dict[str, Any]:
        """The hello, waiting at most *timeout* seconds for it.

        Raises:
            SignatureError: none came in time, or the main channel has none.
        """
        if not self._event.wait(timeout):
            raise SignatureError(f"a signed statement packet on a multifd channel, but the main channel's signed "
                                 f"hello was not verified within {timeout:g}s (the proxy's main-channel deadline); "
                                 f"refusing")
        if self._hello is None:
            raise SignatureError(f"a signed statement packet on a multifd channel cannot be bound to this "
                                 f"migration: {self._none}; refusing")
        return self._hello


@dataclass
class PacketPolicy:
    """What a verifying host checks statement packets with (one per migration)."""

    trusted: TrustedKeys
    gate: HelloGate
    #: how long a statement waits for the main channel's hello
    timeout: float
    #: why this host verifies (for the "carries no signature" line)
    why: str


class VerifyPacketSink:
    """One side channel's device-state packets on a verifying host: statement packets
    verified and stripped, each device packet verified against its statement before
    :class:`~.devstate.PacketSink` stores and forwards it (a ``DevicePacketSink``)."""

    def __init__(self, inner: PacketSink, policy: PacketPolicy) -> None:
        self.inner, self.policy = inner, policy
        #: a statement packet being read
        self._stmt: bytearray | None = None
        #: the verified statement whose packet comes next
        self._expect: dict[str, Any] | None = None
        #: the device packet being passed on: its statement, hash and first payload bytes
        self._open: dict[str, Any] | None = None
        self._h = hashlib.sha256()
        self._head = bytearray()
        #: packets verified on this channel
        self.verified = 0

    def begin(self, ev: DeviceStatePacket) -> None:
        if ev.idstr == SIG_IDSTR:
            self._begin_statement(ev)
        else:
            self._begin_packet(ev)

    def _begin_statement(self, ev: DeviceStatePacket) -> None:
        if self._expect is not None:
            raise SignatureError(f"a signed statement packet for {self._expect['idstr']} packet "
                                 f"{self._expect['idx']} is not followed by its packet (another statement "
                                 f"follows); refusing")
        if ev.instance_id != SIG_INSTANCE or ev.data_len > MAX_RECORD:
            raise SignatureError(f"malformed signed statement packet on a multifd channel (instance "
                                 f"{ev.instance_id}, {ev.data_len} bytes; limit {MAX_RECORD}); refusing")
        self._stmt = bytearray()

    def _begin_packet(self, ev: DeviceStatePacket) -> None:
        """Before any payload: a statement for this device and of this size is pending."""
        stmt, where = self._expect, _where(ev)
        if stmt is None:
            raise SignatureError(f"device state of {where} on a multifd channel carries no signature, and "
                                 f"{self.policy.why}: no signed statement packet precedes it (sign it with "
                                 f"the signing proxy, --mode sign, on the source host); refusing")
        if (stmt["idstr"], stmt["instance_id"]) != (ev.idstr, ev.instance_id):
            raise SignatureError(f"the signed statement before a multifd packet of {where} is for "
                                 f"{stmt['idstr']} instance {stmt['instance_id']} (another device's "
                                 f"statement); refusing")
        if len(ev.raw) + ev.data_len != stmt["length"]:
            raise SignatureError(f"multifd packet {stmt['idx']} of {where}: {len(ev.raw) + ev.data_len} bytes, "
                                 f"but the source signed {stmt['length']} (changed in transit); refusing")
        self.inner.begin(ev, announced=True)
        self._expect, self._open = None, stmt
        self._h = hashlib.sha256(ev.raw)
        self._head = bytearray()

    def data(self, piece: Bytes) -> None:
        if self._stmt is not None:
            self._stmt += piece
            return
        self._h.update(piece)
        if len(self._head) < VFIO_STATE_PACKET.size:
            self._head += piece[:VFIO_STATE_PACKET.size - len(self._head)]
        self.inner.data(piece)

    def end(self) -> Sequence[Bytes]:
        if self._stmt is not None:
            payload, self._stmt = bytes(self._stmt), None
            self._expect = self._statement(payload)
            return []  # stripped
        stmt, self._open = self._open, None
        assert stmt is not None, "end() without begin()"
        self._check_packet(stmt)
        self.verified += 1
        return self.inner.end()

    def finish(self) -> None:
        """The channel ended: a statement whose packet never came is refused."""
        if self._expect is not None:
            raise SignatureError(f"a signed statement packet for {self._expect['idstr']} packet "
                                 f"{self._expect['idx']} at the end of its multifd channel, without its "
                                 f"packet; refusing")
        self.inner.finish()

    # -- checks ----------------------------------------------------------------------------------
    def _statement(self, payload: bytes) -> dict[str, Any]:
        """Verify a statement packet's payload and bind it to the main channel's hello."""
        from ..sign import statements  # lazily: cryptography, only where device state is verified

        body, sig = decode_record(payload)
        stmt = statements.verify(self.policy.trusted, body, sig)
        if stmt["kind"] != "packet":
            raise SignatureError(f"a signed {stmt['kind']} statement on a multifd channel (only packet "
                                 f"statements travel there); refusing")
        hello = self.policy.gate.wait(self.policy.timeout)
        for k in ("migration", "signer"):
            if stmt[k] != hello[k]:
                raise SignatureError(f"{stmt['idstr']}: a signed packet statement whose {k} is {stmt[k]}, the "
                                     f"main channel's is {hello[k]} (a statement replayed from another "
                                     f"migration?); refusing")
        return stmt

    def _check_packet(self, stmt: dict[str, Any]) -> None:
        """The whole packet is in: its bytes, index and flags are what the source signed."""
        where = f"{stmt['idstr']} instance {stmt['instance_id']}"
        if self._h.hexdigest() != stmt["sha256"]:
            raise SignatureError(f"multifd packet {stmt['idx']} of {where} is not what the source signed "
                                 f"(changed in transit); refusing")
        if len(self._head) < VFIO_STATE_PACKET.size:  # pragma: no cover - the hash matched a signed packet
            raise SignatureError(f"multifd packet {stmt['idx']} of {where}: shorter than its header")
        _version, idx, flags = VFIO_STATE_PACKET.unpack_from(self._head)
        if (idx, flags) != (stmt["idx"], stmt["flags"]):
            raise SignatureError(f"multifd packet of {where}: index {idx} flags {flags:#x}, but its statement "
                                 f"says {stmt['idx']} {stmt['flags']:#x}; refusing")


__all__ = ["HelloGate", "PacketPolicy", "SignPacketSink", "VerifyPacketSink"]
