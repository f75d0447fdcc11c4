"""The stream filter: VFIO device state out of the stream and into the trusted store.

Theory of operation
-------------------
The filter consumes the parser's events and produces output bytes through a callback
(a file writer offline, a socket in the proxy).  Everything that is not VFIO device
data passes through as the exact input bytes.  For each VFIO device (one section id):

* Its first section header is checked against the domain's mdev hostdevs, when the
  domain is known (a save image carries it; the proxy gets it from the hook's pending
  record): state for a device the domain does not have is refused *before* any of its
  bytes are forwarded.
* Each data block is streamed into a :class:`~libvirt_mdev.store.store.StateWriter`
  (hashed as it goes).  The device's state is the concatenation of its blocks across
  PART and END sections: exactly what the vendor driver would be given.
* ``splice`` mode forwards every piece *after* the store accepted it, and commits the
  state (fsync, rename, manifest) *before* forwarding the END_OF_STATE that lets QEMU
  finish loading the device; with ``verify`` the committed file is re-hashed from disk
  first.  A store failure therefore stops the stream before QEMU can use the state.
* ``token`` mode (strip) forwards no device bytes at all: each data block is replaced
  by a *token record* — a data block whose payload starts with :data:`TOKEN_MAGIC`
  followed by JSON naming the migration, the device and the byte range it replaced —
  and the END section gets one more, *final* record carrying the load token (emitted
  once the state is committed; records are never held back, so memory stays constant
  however many blocks a stream has).  A token-aware vendor driver would receive the
  token through the VFIO interface; today's QEMU would hand it to the vendor driver,
  which rejects it (fail closed).  ``splice`` of such a stream resolves each record in
  the store, verifies the state and writes the original blocks back, byte for byte.

Token records arriving from a live peer are refused (``accept_tokens=False``): a
source must never be able to name state that is already in our store.

Refused means gone (issue 11): every state the filter stores belongs to one stream
transaction (:class:`~libvirt_mdev.store.store.StreamTxn`) and is committed *held*.  It
becomes loadable only when the whole stream is accepted: at the stream's end
(``accept_at_end``, the proxy) or by the caller's explicit :meth:`StreamFilter.accept`
after its output is complete (strip, splice).  :meth:`StreamFilter.abort` — and
:meth:`StreamFilter.close` of a stream that was not accepted — marks the stream refused
with its reason before the caller reports the refusal.

Bindings are exact on (idstr, instance id): a device's VFIO section has one instance
(0), and each binding is used by one section at most, so one mdev never gets two
states (two tokens) from one stream.
"""
from __future__ import annotations

import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass

from .configfile import MODES
from .errors import MdevError, MdevMissing, StoreIntegrityError, StreamError, TokenError, UnsupportedStream
from .filter_options import Binding, DeviceResult, FilterOptions, bindings_from_domain_xml
from .io.drive import ByteSource, iter_events
from .store.manifest import Manifest, StateMeta
from .store.store import StateWriter, Store, StreamTxn
from .store.tokens import issue_token
from .stream import (
    Eof,
    SaveImageHeader,
    SectionContext,
    SectionHeader,
    StreamEnd,
    StreamEvent,
    StreamParser,
    VfioBlockData,
    VfioBlockEnd,
    VfioBlockStart,
    VfioMarker,
    VfioSection,
)
from .stream.context import Emit
from .stream.events import Bytes
from .stream.wire import VfioFlag
from .tokenrecords import (
    MAX_TOKEN_RECORD,
    TOKEN_MAGIC,
    TokenRecord,
    VerifiedStates,
    encode_token_record,
    find_manifest,
    parse_token_record,
    write_block,
)


@dataclass
class _Device:
    idstr: str
    instance_id: int
    version_id: int
    section_id: int
    binding: Binding | None
    writer: StateWriter | None = None
    #: bytes of state so far (the offset of the next block in the state file)
    length: int = 0
    blocks: int = 0
    manifest: Manifest | None = None


class StreamFilter:
    """Feed it every event of one stream (:meth:`process`), then :meth:`finish`."""

    def __init__(self, store: Store, parser: StreamParser, opts: FilterOptions, emit: Emit) -> None:
        if opts.mode not in MODES:
            raise MdevError(f"unknown filter mode {opts.mode!r}")
        self.store = store
        self.parser = parser
        self.opts = opts
        #: the domain and source this stream is for: the options', completed by the stream
        #: (a save image's own domain XML, :meth:`bind_source` from a signed hello)
        self.domain_name = opts.domain_name
        self.domain_uuid = opts.domain_uuid
        self.source_host = opts.source_host
        self.bindings = opts.bindings
        self._emit = emit
        self._devices: dict[int, _Device] = {}
        self._ctx = SectionContext()
        #: the block being handled: (device, declared size, held header, collected bytes or None)
        self._block: tuple[_Device, int, bytes, bytearray | None] | None = None
        self._block_start_in_state = 0
        #: states re-hashed once each (splice of token records)
        self._states = VerifiedStates(store)
        self.results: list[DeviceResult] = []
        self._txn: StreamTxn | None = None
        #: the refusal recorded for this stream (None: not refused)
        self.refused: str | None = None
        self.accepted = False

    # -- event dispatch -------------------------------------------------------------------

    def process(self, ev: StreamEvent) -> None:
        if type(ev) is VfioBlockData:
            self._block_data(ev)
        elif type(ev) is VfioBlockStart:
            self._block_start(ev)
        elif type(ev) is VfioBlockEnd:
            self._block_end(ev)
        elif type(ev) is VfioMarker:
            self._marker(ev)
        elif isinstance(ev, SectionHeader):
            self._header(ev)
        elif type(ev) is SaveImageHeader:
            self._save_image(ev)
            self._emit(ev.raw)
        elif type(ev) is Eof:
            self._at_eof(ev)
            self._emit(ev.raw)
        elif type(ev) is StreamEnd:
            self._emit(ev.raw)
            if self.opts.accept_at_end:
                self.accept()
        else:
            self._emit(ev.raw)

    def _save_image(self, ev: SaveImageHeader) -> None:
        if self.bindings is None and self.opts.bind_from_save_image and ev.xml:
            bindings, name, uuid = bindings_from_domain_xml(ev.xml)
            self.domain_name = self.domain_name or name
            self.domain_uuid = self.domain_uuid or uuid
            # a domain with no mdev at all says nothing about VFIO sections: store such
            # state unbound (the loader refuses unbound state) rather than guess
            if bindings:
                self.bindings = bindings

    def bind_source(self, domain_uuid: str, source_host: str) -> None:
        """The stream's signed hello named its domain and source host: manifests record them."""
        self.domain_uuid = domain_uuid
        self.source_host = source_host

    def _header(self, ev: SectionHeader) -> None:
        vfio = self._ctx.enter(ev)
        if vfio is not None:
            self._devices[ev.section_id] = self._new_device(vfio)
        self._emit(ev.raw)

    def _new_device(self, ev: VfioSection) -> _Device:
        binding = None
        if self.bindings is not None:
            binding = self.bindings.get(ev.idstr)
            if binding is None or binding.instance_id != ev.instance_id:
                known = ", ".join(f"{k} instance {b.instance_id}"
                                  for k, b in sorted(self.bindings.items())) or "none"
                raise MdevMissing(f"the stream carries state for VFIO device {ev.idstr!r}, which domain "
                                  f"{self.domain_name or '?'} does not have (instance {ev.instance_id}; "
                                  f"its mdev devices: {known}); refusing")
            for other in self._devices.values():
                if other.binding is not None and other.binding.mdev_uuid == binding.mdev_uuid:
                    raise MdevMissing(f"the stream carries two states for mdev {binding.mdev_uuid} "
                                      f"({other.idstr} instance {other.instance_id} and {ev.idstr} "
                                      f"instance {ev.instance_id}); refusing")
        return _Device(ev.idstr, ev.instance_id, ev.version_id, ev.section_id, binding)

    # -- data blocks --------------------------------------------------------------------------

    def _block_start(self, ev: VfioBlockStart) -> None:
        dev = self._devices[ev.section_id]
        small = ev.size <= MAX_TOKEN_RECORD
        # a small block may be a token record: hold it whole before deciding
        self._block = (dev, ev.size, bytes(ev.raw), bytearray() if small else None)
        self._block_start_in_state = dev.length
        if not small:
            self._begin_state_block(dev, ev.size, bytes(ev.raw))

    def _begin_state_block(self, dev: _Device, size: int, header: bytes) -> None:
        if dev.writer is None and dev.manifest is None:
            dev.writer = self._begin(dev)
        if dev.writer is None:
            raise StreamError(f"VFIO device {dev.idstr}: data after its state was complete",
                              offset=self.parser.offset)
        dev.blocks += 1
        if self.opts.mode == "splice":
            self._emit(header)

    def _state_piece(self, dev: _Device, piece: Bytes) -> None:
        assert dev.writer is not None
        dev.writer.write(piece)  # stored (and hashed) before anything is forwarded
        dev.length += len(piece)
        if self.opts.mode == "splice":
            self._emit(piece)

    def _block_data(self, ev: VfioBlockData) -> None:
        assert self._block is not None
        dev, _size, _hdr, collected = self._block
        if collected is not None:
            collected += ev.raw
        else:
            self._state_piece(dev, ev.raw)

    def _block_end(self, ev: VfioBlockEnd) -> None:
        assert self._block is not None
        dev, size, header, collected = self._block
        self._block = None
        if collected is not None:
            if collected.startswith(TOKEN_MAGIC):
                self._token_record(dev, bytes(collected))
                return
            self._begin_state_block(dev, size, header)
            if collected:
                self._state_piece(dev, collected)
        if self.opts.mode == "token":
            self._token_out(dev, self._block_start_in_state, size)

    # -- token records ----------------------------------------------------------------------------

    def _token_out(self, dev: _Device, offset: int, length: int, token: str | None = None) -> None:
        self._emit(encode_token_record(TokenRecord(self.opts.migration_id, dev.idstr, dev.instance_id,
                                                   offset, length, token)))

    def _token_record(self, dev: _Device, payload: bytes) -> None:
        """Splice: put the state a token record stands for back in the stream."""
        if not self.opts.accept_tokens:
            raise TokenError(f"VFIO device {dev.idstr}: the stream carries a token record; token "
                             f"records are only accepted by an offline splice, refusing")
        rec = parse_token_record(payload, dev.idstr, dev.instance_id)
        manifest = find_manifest(self.store, rec)
        if rec.final:
            if dev.manifest is not None and dev.manifest.id != manifest.id:
                raise TokenError(f"VFIO device {dev.idstr}: its token names other state than its "
                                 f"range records")
            self._states.fd(manifest)  # the whole state is re-hashed before QEMU could finish
            dev.manifest = manifest
            return  # stands for no block of the original stream
        fd = self._states.range_fd(manifest, rec.offset, rec.length)
        dev.manifest = manifest
        write_block(fd, manifest, rec.offset, rec.length, self._emit)
        dev.blocks += 1

    def _begin(self, dev: _Device) -> StateWriter:
        if self._txn is None:
            self._txn = self.store.open_stream(self.opts.stream_kind, self.opts.holder)
        return self.store.begin_state(self._meta(dev), stream=self._txn)

    # -- end of a device's state -------------------------------------------------------------------

    def _marker(self, ev: VfioMarker) -> None:
        if ev.marker == VfioFlag.END_OF_STATE and self._ctx.in_vfio_end:
            dev = self._devices[ev.section_id]
            if self._commit(dev) and self.opts.mode == "token" and dev.manifest is not None:
                self._token_out(dev, 0, 0, token=issue_token(dev.manifest))
        self._emit(ev.raw)

    def _commit(self, dev: _Device) -> bool:
        """Commit the device's state; True when new state was stored (not spliced back)."""
        if dev.writer is None:
            if dev.manifest is None and dev.blocks == 0:
                dev.writer = self._begin(dev)  # a device with no state at all
            else:
                self._record(dev)  # spliced back from tokens: nothing new to store
                return False
        writer, dev.writer = dev.writer, None
        m = writer.commit()
        if self.opts.verify:
            vm = self.store.verify(m.id)
            if vm.sha256 != m.sha256 or vm.length != dev.length:
                raise StoreIntegrityError(f"state of {dev.idstr} changed on disk after it was stored")
        dev.manifest = m
        self._record(dev)
        return True

    def _record(self, dev: _Device) -> None:
        m = dev.manifest
        if m is None:
            return
        self.results.append(DeviceResult(dev.idstr, dev.instance_id, dev.section_id, m.mdev_uuid,
                                         m.mdev_type, m.length, m.sha256, issue_token(m), dev.blocks))

    def _at_eof(self, ev: Eof) -> None:
        for dev in self._devices.values():
            if dev.writer is not None:
                raise StreamError(f"VFIO device {dev.idstr}: its state never completed (no END "
                                  f"section before EOF)", offset=ev.offset)

    def _meta(self, dev: _Device) -> StateMeta:
        b = dev.binding
        return StateMeta(idstr=dev.idstr, instance_id=dev.instance_id, version_id=dev.version_id,
                         vfio_framing=self._framing(dev),
                         migration_id=self.opts.migration_id,
                         mdev_uuid=b.mdev_uuid if b else None, mdev_type=b.mdev_type if b else None,
                         driver_version=b.driver_version if b else None,
                         parent_model=b.parent_model if b else None,
                         domain_name=self.domain_name, domain_uuid=self.domain_uuid,
                         source_host=self.source_host or socket.gethostname())

    def _framing(self, dev: _Device) -> str:
        """The framing the manifest records: what the stream showed, never a guess (the
        loader hands the state to a driver that must read it the same way)."""
        framing = self.parser.vfio_framing(dev.section_id)
        if framing is None:
            raise UnsupportedStream(f"VFIO device {dev.idstr}: its migration framing (v1 or v2) cannot be told "
                                    f"from the stream (machine type {self.parser.machine_type or 'not sent'!r} "
                                    f"names no QEMU version, and its sections show no v1 or v2 marker); "
                                    f"refusing to store its state", offset=self.parser.offset)
        return framing.value

    def writer_for(self, section_id: int) -> StateWriter | None:
        """The open state writer of VFIO section *section_id* (created when the device
        sent no data yet), so a signature layer can set its signature before the
        commit.  None when the section is unknown or its state is already committed."""
        dev = self._devices.get(section_id)
        if dev is None:
            return None
        if dev.writer is None and dev.manifest is None and dev.blocks == 0:
            dev.writer = self._begin(dev)
        return dev.writer

    # -- the stream's decision ----------------------------------------------------------------

    def accept(self) -> None:
        """The whole stream passed every check (and, offline, its output is complete):
        make every state it stored loadable, in one atomic step."""
        if self.refused is not None or self.accepted:
            return
        for dev in self._devices.values():
            if dev.writer is not None:
                raise StreamError(f"VFIO device {dev.idstr}: its state never completed",
                                  offset=self.parser.offset)
        if self._txn is not None:
            self._txn.accept()
        self.accepted = True

    def abort(self, reason: str) -> None:
        """The stream is refused (any failure, any layer, any time — also after it was
        accepted): no state it stored will ever be loaded or spliced, and ``store list``
        shows *reason*.  Call it before reporting the refusal.  Idempotent."""
        if self.refused is not None:
            return
        self.refused = " ".join(str(reason).split()) or "refused"
        for dev in self._devices.values():
            if dev.writer is not None:
                dev.writer.abort()
                dev.writer = None
        if self._txn is not None:
            self._txn.refuse_if_possible(self.refused)

    def close(self) -> None:
        """Abort unfinished state writers and close fds.  A stream that was not
        accepted is refused here (the reason is the exception in flight, if any): so a
        caller that only has ``try/finally: close()`` never leaves its states loadable."""
        if not self.accepted and self.refused is None:
            exc = sys.exc_info()[1]
            if exc is None:
                why = "the stream was not accepted (it ended early or its consumer failed)"
            else:
                why = exc.message if isinstance(exc, MdevError) else f"{type(exc).__name__}: {exc}"
            self.abort(why)
        for dev in self._devices.values():
            if dev.writer is not None:
                dev.writer.abort()
                dev.writer = None
        self._states.close()

    def __enter__(self) -> StreamFilter:
        return self

    def __exit__(self, et: object, ev: object, tb: object) -> None:
        if isinstance(ev, BaseException) and self.refused is None:
            self.abort(ev.message if isinstance(ev, MdevError) else f"{type(ev).__name__}: {ev}")
        self.close()


def filter_stream(src: ByteSource, emit: Emit, store: Store, opts: FilterOptions,
                  progress: Callable[[int], None] | None = None) -> list[DeviceResult]:
    """Run the filter over the stream in *src* (a file or pipe), emitting output bytes.

    On any error the unfinished state writers are aborted (nothing half-written is left
    that the loader would accept) and the error propagates.
    """
    parser = StreamParser()
    flt = StreamFilter(store, parser, opts, emit)
    try:
        for ev in iter_events(src, parser, progress=progress):
            flt.process(ev)
    finally:
        flt.close()
    return flt.results


# the filter's vocabulary, importable from here (the proxy, the CLI, the sign layers, the tests)
__all__ = ["MAX_TOKEN_RECORD", "TOKEN_MAGIC", "Binding", "DeviceResult", "FilterOptions", "StreamFilter",
           "bindings_from_domain_xml", "filter_stream"]
