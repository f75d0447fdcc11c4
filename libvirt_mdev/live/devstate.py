"""VFIO device state on multifd side channels, filtered as main-channel state is.

Theory of operation
-------------------
With QEMU 10's vfio-pci ``x-migration-multifd-transfer`` a device's stop-copy state and
its config leave the main channel: the main channel's VFIO END and FULL sections carry a
bare ``END_OF_STATE`` (:mod:`libvirt_mdev.stream.vfio`), and the state travels as
*device-state packets* on the side channels, spread over them in any order
(``docs/multifd.md``).  Each packet names its device (idstr, instance id) and carries one
VFIODeviceStatePacket: an index, and either a buffer of vendor-driver state or, last,
the device's config.  QEMU's loader writes the buffers to the device in index order as
they become contiguous, and finishes the device when the config packet and every
buffer before it are in.

This module is the per-migration store of those packets; each side channel gets a
:class:`PacketSink` (the pump of that channel feeds it every device-state packet):

* **Bound before read on.**  A packet's header is checked against the armed domain's
  devices (the pending record, the same bindings as the main channel) before any of its
  payload is accepted: a device the domain does not have, another instance id, a packet
  above :data:`MAX_PACKET`, or, on a host that verifies signatures, a packet that no
  verified statement announced (:mod:`.signdevstate` verifies them in front of this
  module) fails the migration closed.
* **Stored before forwarded.**  The packet is held whole (at most :data:`MAX_PACKET`, so
  memory per channel is bounded), checked (:func:`~libvirt_mdev.stream.vfio.read_state_packet`:
  version, index, flags, config framing), checked against the device's other packets (no
  index twice, none more than :data:`MAX_AHEAD` ahead of those seen, the config packet
  last, nothing after it), and appended, as the exact
  bytes that travelled, to the device's state file in the store.  Only then does the pump
  forward it.  The stored state (manifest framing ``multifd``) is the device's packets
  in arrival order; a reader orders them by index as QEMU does.
* **Committed before QEMU can finish.**  The packet that completes a device's set (the
  config packet and every index below it present) is forwarded only after the state
  was committed (fsync, rename, manifest) and, with ``verify``, re-hashed from disk.
  QEMU cannot finish loading the device without that packet.  Nothing ever waits for
  another channel (channels do not block each other, so a stalled channel cannot
  deadlock the others).
* **Refused means gone.**  The states belong to one store transaction, held until
  :meth:`MultifdStates.accept` (the migration ended well: main channel and every side
  channel) and refused by :meth:`MultifdStates.refuse` (any failure of the migration).
  ``accept`` refuses a device whose set is incomplete.
"""
from __future__ import annotations

import itertools
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..errors import MdevMissing, SignatureError, StoreIntegrityError, StreamError
from ..filter_options import Binding, DeviceResult
from ..store.manifest import Manifest, StateMeta
from ..store.store import StateWriter, Store, StreamTxn
from ..store.tokens import issue_token
from ..stream.events import Bytes
from ..stream.multifd import DeviceStatePacket
from ..stream.vfio import VfioStatePacket, read_state_packet
from ..stream.wire import VFIO_VERSION, VfioFraming

#: the largest device-state packet the proxy holds (QEMU's VFIO sends buffers of at most
#: 1 MiB plus a 12-byte header, and one config packet of a few KiB)
MAX_PACKET = 16 << 20
#: how far a packet's index may run ahead of the packets of its device seen so far: QEMU's
#: loader sizes an array by the highest index it was sent (a lying index would make the
#: destination QEMU allocate gigabytes); honest packets run ahead only by what the other
#: channels carry at the same time
MAX_AHEAD = 4096
#: DeviceResult.section_id of multifd state (it belongs to no main-channel section)
NO_SECTION = -1


@dataclass
class _Device:
    """One device's multifd state in this migration."""

    idstr: str
    instance_id: int
    binding: Binding
    writer: StateWriter | None = None
    #: indexes stored so far
    seen: set[int] = field(default_factory=set)
    #: the config packet's index, once it arrived
    last: int | None = None
    packets: int = 0
    length: int = 0
    manifest: Manifest | None = None

    def label(self) -> str:
        return f"{self.idstr} instance {self.instance_id}"

    def complete(self) -> bool:
        return self.last is not None and len(self.seen) == self.last + 1

    def missing(self) -> str:
        if self.last is None:
            return "its config packet never arrived"
        # lazily: the config packet's index bounds the range, and it was checked against
        # MAX_AHEAD, but a list of the whole range is never built
        gaps = itertools.islice((i for i in range(self.last + 1) if i not in self.seen), 5)
        return "packet(s) " + ", ".join(map(str, gaps)) + " never arrived"


class MultifdStates:
    """The device-state packets of one multifd migration (thread-safe: one per migration,
    shared by its side channels)."""

    def __init__(self, store: Store, *, migration_id: str, domain_name: str, domain_uuid: str,
                 bindings: dict[str, Binding], verify: bool = True, signed_only: str | None = None) -> None:
        """*bindings*: idstr → binding of the armed domain's mdevs; *signed_only*: why this
        host accepts signed device state only (None: unsigned state is accepted)."""
        self.store = store
        self.migration_id, self.domain_name, self.domain_uuid = migration_id, domain_name, domain_uuid
        self.bindings = bindings
        self.verify = verify
        self.signed_only = signed_only
        self.lock = threading.Lock()
        self.devices: dict[tuple[str, int], _Device] = {}
        self.results: list[DeviceResult] = []
        self._txn: StreamTxn | None = None
        self.accepted = False
        self.refused: str | None = None

    def sink(self) -> PacketSink:
        """A sink for one side channel's device-state packets."""
        return PacketSink(self)

    # -- one packet -----------------------------------------------------------------------
    def check_header(self, ev: DeviceStatePacket, *, announced: bool = False) -> None:
        """Before any of the packet's payload is taken: is it for one of our devices?
        *announced*: a verified signed statement covers it (:mod:`.signdevstate`); on a
        host that takes signed state only, nothing else passes."""
        where = f"{ev.idstr} instance {ev.instance_id}"
        if self.signed_only is not None and not announced:
            raise SignatureError(f"device state of {where} on a multifd channel carries no signature, and "
                                 f"{self.signed_only}: turn off vfio-pci x-migration-multifd-transfer or migrate "
                                 f"without --parallel")
        binding = self.bindings.get(ev.idstr)
        if binding is None or binding.instance_id != ev.instance_id:
            known = ", ".join(f"{k} instance {b.instance_id}" for k, b in sorted(self.bindings.items())) or "none"
            raise MdevMissing(f"a multifd channel carries state for VFIO device {ev.idstr!r} instance "
                              f"{ev.instance_id}, which domain {self.domain_name} does not have (its mdev devices: "
                              f"{known}); refusing")
        if ev.data_len > MAX_PACKET:
            raise StreamError(f"multifd device-state packet of {ev.data_len} bytes is larger than the proxy's "
                              f"limit of {MAX_PACKET}", offset=ev.offset, section=where)

    def store_packet(self, ev: DeviceStatePacket, payload: Bytes) -> None:
        """Check the whole packet against the device's others and store it; commit the
        device's state when this packet completes it.  Raises on any refusal."""
        where = f"{ev.idstr} instance {ev.instance_id}"
        pkt = read_state_packet(payload, where)
        with self.lock:
            if self.refused is not None:
                raise StreamError(f"the migration's device state was refused: {self.refused}")
            dev = self._device(ev)
            self._check_order(dev, pkt)
            assert dev.writer is not None
            dev.writer.write(ev.raw)  # the exact bytes that travelled: header, then payload
            dev.writer.write(payload)
            dev.seen.add(pkt.idx)
            dev.packets += 1
            dev.length += len(ev.raw) + len(payload)
            if pkt.config:
                dev.last = pkt.idx
            if dev.complete():
                self._commit(dev)

    def _device(self, ev: DeviceStatePacket) -> _Device:
        key = (ev.idstr, ev.instance_id)
        dev = self.devices.get(key)
        if dev is None:
            dev = self.devices[key] = _Device(ev.idstr, ev.instance_id, self.bindings[ev.idstr])
            if self._txn is None:
                self._txn = self.store.open_stream("migration")
            dev.writer = self.store.begin_state(self._meta(dev), stream=self._txn)
        return dev

    @staticmethod
    def _check_order(dev: _Device, pkt: VfioStatePacket) -> None:
        where = dev.label()
        if dev.manifest is not None:
            raise StreamError(f"multifd device-state packet {pkt.idx} of {where} after its state was complete")
        if pkt.idx in dev.seen:
            raise StreamError(f"multifd device-state packet {pkt.idx} of {where} arrived twice")
        if pkt.idx > len(dev.seen) + MAX_AHEAD:
            raise StreamError(f"multifd device-state packet {pkt.idx} of {where} is more than {MAX_AHEAD} ahead of "
                              f"the {len(dev.seen)} packet(s) seen (QEMU's loader would size an array by it)")
        if pkt.config:
            above = [i for i in dev.seen if i > pkt.idx]
            if dev.last is not None or above:
                raise StreamError(f"config packet {pkt.idx} of {where} is not its last packet "
                                  f"(QEMU sends the config after every data buffer)")
        elif dev.last is not None and pkt.idx > dev.last:
            raise StreamError(f"data packet {pkt.idx} of {where} after its config packet {dev.last}")

    def _commit(self, dev: _Device) -> None:
        writer, dev.writer = dev.writer, None
        assert writer is not None
        m = writer.commit()
        if self.verify:
            vm = self.store.verify(m.id)
            if vm.sha256 != m.sha256 or vm.length != dev.length:
                raise StoreIntegrityError(f"multifd state of {dev.label()} changed on disk after it was stored")
        dev.manifest = m
        self.results.append(DeviceResult(dev.idstr, dev.instance_id, NO_SECTION, m.mdev_uuid, m.mdev_type,
                                         m.length, m.sha256, issue_token(m), dev.packets))

    def _meta(self, dev: _Device) -> StateMeta:
        b = dev.binding
        return StateMeta(idstr=dev.idstr, instance_id=dev.instance_id, version_id=VFIO_VERSION,
                         vfio_framing=VfioFraming.MULTIFD.value, migration_id=self.migration_id,
                         mdev_uuid=b.mdev_uuid, mdev_type=b.mdev_type, driver_version=b.driver_version,
                         parent_model=b.parent_model, domain_name=self.domain_name,
                         domain_uuid=self.domain_uuid, source_host=socket.gethostname())

    # -- the migration's decision ----------------------------------------------------------
    def accept(self) -> None:
        """The migration ended well on every channel: make the stored states loadable, or
        refuse (raise) when a device's set is incomplete."""
        with self.lock:
            if self.accepted or self.refused is not None:
                return
            broken = [d for d in self.devices.values() if d.manifest is None]
        if broken:
            d = broken[0]
            why = f"the multifd state of {d.label()} never completed: {d.missing()}"
            self.refuse(why)
            raise StreamError(why)
        with self.lock:
            if self._txn is not None:
                self._txn.accept()
            self.accepted = True

    def refuse(self, why: str) -> None:
        """The migration failed: no state it stored will ever be loadable, also when it
        was accepted already (a failure reported later still wins).  Idempotent."""
        with self.lock:
            if self.refused is not None:
                return
            self.refused = " ".join(why.split()) or "refused"
            for dev in self.devices.values():
                if dev.writer is not None:
                    dev.writer.abort()
                    dev.writer = None
            if self._txn is not None:
                self._txn.refuse_if_possible(self.refused)

    def summary(self) -> str:
        """For the migration's log line: what was stored."""
        with self.lock:
            return ", ".join(f"{r.idstr}={r.mdev_uuid} {r.length} bytes in {r.blocks} packets sha256 {r.sha256[:12]}"
                             for r in self.results)


class PacketSink:
    """One side channel's device-state packets, each held whole, stored, then released
    for forwarding (the ``DevicePacketSink`` of :mod:`.sidepump`)."""

    def __init__(self, states: MultifdStates) -> None:
        self.states = states
        self._ev: DeviceStatePacket | None = None
        self._buf = bytearray()

    def begin(self, ev: DeviceStatePacket, *, announced: bool = False) -> None:
        """*announced*: a verified signed statement covers this packet (the verifying
        sink of :mod:`.signdevstate` says so)."""
        self.states.check_header(ev, announced=announced)
        self._ev = ev
        self._buf = bytearray()

    def data(self, piece: Bytes) -> None:
        self._buf += piece

    def end(self) -> Sequence[Bytes]:
        ev, payload = self._ev, self._buf
        assert ev is not None, "end() without begin()"
        self._ev, self._buf = None, bytearray()
        if len(payload) != ev.data_len:
            raise StreamError(f"multifd device-state packet of {ev.idstr}: {len(payload)} bytes of "
                              f"{ev.data_len}", offset=ev.offset)
        self.states.store_packet(ev, payload)
        return [ev.raw, payload]

    def finish(self) -> None:
        """The channel ended (the codec ends only at a packet boundary: nothing is open)."""
        if self._ev is not None:
            raise StreamError(f"multifd channel ended inside a device-state packet of {self._ev.idstr}")


__all__ = ["MAX_AHEAD", "MAX_PACKET", "MultifdStates", "PacketSink"]
