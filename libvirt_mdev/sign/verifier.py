"""The destination side of signed streams: :class:`VerifyLayer` verifies every VFIO byte
before the filter (and so QEMU) gets it, and strips the statements (the format is
described in :mod:`libvirt_mdev.sign.layers` and docs/signing-wire.md)."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import SignatureError
from ..filter import DeviceResult, FilterOptions, StreamFilter
from ..io.drive import ByteSource, iter_events
from ..store.store import Store
from ..stream import (
    Opaque,
    SectionFooter,
    SectionFull,
    SectionHeader,
    StreamEvent,
    StreamParser,
    VfioBlockData,
    VfioBlockEnd,
    VfioBlockStart,
    VfioConfigData,
    VfioMarker,
)
from ..stream.context import Emit
from ..stream.wire import VfioFlag
from . import statements
from .held import DeviceHashes, Devices, HeldBlock, in_full, is_record_start, own
from .keys import TrustedKeys, manifest_signature
from .record import MAX_RECORD, SIG_IDSTR, SIG_MAGIC, ReplayGuard, decode_record
from .statements import MAX_SIGNED_BLOCK, MAX_SIGNED_CONFIG

#: how old a hello may be (seconds): migration set-up time plus clock skew
DEFAULT_MAX_AGE = 600


@dataclass
class VerifyPolicy:
    trusted: TrustedKeys
    require: bool = False
    max_age: int = DEFAULT_MAX_AGE
    replay: ReplayGuard | None = None
    clock: Callable[[], float] = time.time
    #: told the verified hello once it passed every check, or None once the stream showed
    #: its first section without one (multifd side channels bind their statements to it)
    on_hello: Callable[[dict[str, Any] | None], None] | None = None

    @property
    def active(self) -> bool:
        """Records are verified when signatures are required or keys are configured."""
        return self.require or len(self.trusted) > 0


#: a block statement stood for by nothing (a format-2 stream passed unverified)
_UNVERIFIED: dict[str, Any] = {}


class VerifyLayer:
    """Destination side, in front of a :class:`StreamFilter`: verify each VFIO block and
    config section before the filter (and so QEMU) gets a byte of it; strip statements."""

    def __init__(self, inner: StreamFilter, policy: VerifyPolicy) -> None:
        self.inner = inner
        self.policy = policy
        self.hello: dict[str, Any] | None = None
        self._record: bytearray | None = None
        #: a format-2 stream (statements ahead of the data): block statements are stripped
        self._format2 = False
        #: a statement block being read (the block before each data block)
        self._stmt_block: bytearray | None = None
        #: the verified block statement whose block comes next
        self._expect: dict[str, Any] | None = None
        self._block: HeldBlock | None = None
        #: the verified config statement whose section comes next, then the section's held events
        self._config_stmt: dict[str, Any] | None = None
        self._config: list[StreamEvent] | None = None
        #: the held END_OF_STATE (and footer) of a device's END section, awaiting its statement
        self._held: list[StreamEvent] = []
        self._holding: int | None = None
        self._devices = Devices()
        self.verified: list[dict[str, Any]] = []
        self._hello_told = False

    def _tell_hello(self, hello: dict[str, Any] | None) -> None:
        """Hand the hello (or its absence) to whoever binds to it, once."""
        if self._hello_told or self.policy.on_hello is None:
            return
        self._hello_told = True
        self.policy.on_hello(hello)

    # -- dispatch ------------------------------------------------------------------------------
    def process(self, ev: StreamEvent) -> None:
        if self._record is not None:
            self._in_record(ev)
            return
        if self._format2:
            if self._blocks(ev):
                return
            if self._config is not None:
                self._in_config(ev)
                return
        if type(ev) is SectionFull and ev.idstr == SIG_IDSTR:
            self._record = bytearray()
            return
        if self._holding is not None:
            if type(ev) is SectionFooter and ev.section_id == self._holding and len(self._held) == 1:
                self._held.append(own(ev))
                return
            d = self._devices[self._holding]
            raise SignatureError(f"VFIO device {d.idstr}: its state is not followed by a signed "
                                 f"statement (require_signature is on); refusing it")
        if self.hello is None and is_record_start(ev):
            self._tell_hello(None)
        if self.policy.require and self.hello is None and is_record_start(ev):
            raise SignatureError("the migration stream carries no signed statement from the source "
                                 "(require_signature is on): is the source proxy running with a "
                                 "host key? refusing")
        if self._config_stmt is not None:
            self._config_start(ev)
            return
        if isinstance(ev, SectionHeader):
            self._devices.header(ev)
            if in_full(ev) and self._must_verify():
                raise SignatureError(f"VFIO device {ev.idstr}: its config section is not preceded by a "
                                     f"signed config statement (require_signature is on); refusing it")
        elif type(ev) is VfioConfigData:
            self._devices.config(ev)
        elif (type(ev) is VfioMarker and ev.marker == VfioFlag.END_OF_STATE
              and self._devices.ctx.in_vfio_end and self._must_verify()):
            self._holding = ev.section_id
            self._held = [own(ev)]
            return
        self.inner.process(ev)

    def _must_verify(self) -> bool:
        return self.policy.require or (self.policy.active and self.hello is not None)

    # -- data blocks ------------------------------------------------------------------------------
    def _blocks(self, ev: StreamEvent) -> bool:
        """Format 2: statement blocks and the data blocks they cover.  True when *ev* was taken."""
        if self._stmt_block is not None:
            if type(ev) is VfioBlockData:
                self._stmt_block += ev.raw
                return True
            assert type(ev) is VfioBlockEnd  # the parser ends every block it starts
            payload, self._stmt_block = bytes(self._stmt_block), None
            self._expect = self._block_statement(ev.section_id, payload)
            return True
        if self._block is not None:
            if type(ev) is VfioBlockData:
                self._block.add(ev.raw)
                return True
            assert type(ev) is VfioBlockEnd
            self._release_block(ev)
            return True
        if type(ev) is VfioBlockStart:
            if self._expect is None:  # the statement block ahead of a data block
                if ev.size > MAX_RECORD:
                    d = self._devices[ev.section_id]
                    raise SignatureError(f"VFIO device {d.idstr}: a data block of {ev.size} bytes "
                                         f"without a signed block statement ahead of it; refusing it")
                self._stmt_block = bytearray()
                return True
            self._hold_block(ev)
            return True
        if self._expect is not None:
            raise SignatureError(f"VFIO device {self._expect.get('idstr', '?')}: a signed block statement "
                                 f"not followed by its data block; refusing")
        return False

    def _block_statement(self, sid: int, payload: bytes) -> dict[str, Any]:
        """Verify the statement block of section *sid*: the next block of its device."""
        d = self._devices[sid]
        if not self._must_verify():
            return _UNVERIFIED
        if not payload.startswith(SIG_MAGIC):
            raise SignatureError(f"VFIO device {d.idstr}: a data block without a signed block statement "
                                 f"ahead of it (block {d.seq}); refusing it")
        body, sig = decode_record(payload)
        stmt = statements.verify(self.policy.trusted, body, sig)
        hello = self.hello
        if stmt["kind"] != "block" or hello is None:
            raise SignatureError(f"VFIO device {d.idstr}: a {stmt['kind']} statement where its block "
                                 f"statement belongs; refusing")
        for k in ("migration", "signer"):
            if stmt[k] != hello[k]:
                raise SignatureError(f"VFIO device {d.idstr}: its block statement's {k} is {stmt[k]}, the "
                                     f"stream's is {hello[k]} (a statement replayed from another "
                                     f"migration?); refusing")
        if (stmt["idstr"], stmt["instance_id"]) != (d.idstr, d.instance_id):
            raise SignatureError(f"a block statement for {stmt['idstr']} inside the section of VFIO device "
                                 f"{d.idstr} (swapped devices?); refusing")
        if (stmt["seq"], stmt["prev"]) != (d.seq, d.chain):
            what = ("a block was dropped" if stmt["seq"] > d.seq else
                    "a block was duplicated or replayed" if stmt["seq"] < d.seq else "the chain is broken")
            raise SignatureError(f"VFIO device {d.idstr}: block statement {stmt['seq']} where block "
                                 f"{d.seq} was due ({what} or reordered in transit); refusing")
        if stmt["length"] > MAX_SIGNED_BLOCK:
            raise SignatureError(f"VFIO device {d.idstr}: a signed block of {stmt['length']} bytes (limit "
                                 f"{MAX_SIGNED_BLOCK}); refusing")
        d.seq, d.chain = d.seq + 1, statements.chain_hash(body)
        return stmt  # not kept in self.verified: a device may send millions of blocks

    def _hold_block(self, ev: VfioBlockStart) -> None:
        stmt = self._expect
        assert stmt is not None
        if stmt is not _UNVERIFIED and ev.size != stmt["length"]:
            d = self._devices[ev.section_id]
            raise SignatureError(f"VFIO device {d.idstr}: a data block of {ev.size} bytes where the source "
                                 f"signed {stmt['length']} (changed in transit); refusing it")
        self._block = HeldBlock(ev.section_id, own(ev), ev.size)

    def _release_block(self, end: VfioBlockEnd) -> None:
        """The held block is complete: forward it only if it is what the source signed."""
        b, stmt, self._block, self._expect = self._block, self._expect, None, None
        assert b is not None and stmt is not None
        if stmt is not _UNVERIFIED and b.h.hexdigest() != stmt["sha256"]:
            d = self._devices[b.section_id]
            raise SignatureError(f"VFIO device {d.idstr}: data block {stmt['seq']} ({b.size} bytes) is not "
                                 f"what the source signed (changed in transit); refusing it")
        self.inner.process(b.start)
        if b.data:
            self.inner.process(VfioBlockData(b.start.end, b.data, b.section_id))
        self.inner.process(end)

    # -- the config section -------------------------------------------------------------------------
    def _config_start(self, ev: StreamEvent) -> None:
        stmt = self._config_stmt
        assert stmt is not None
        if not (isinstance(ev, SectionHeader) and in_full(ev)
                and (ev.idstr, ev.instance_id) == (stmt["idstr"], stmt["instance_id"])):
            raise SignatureError(f"a config statement for VFIO device {stmt['idstr']} not followed by its "
                                 f"config section; refusing")
        self._devices.header(ev)
        self._config = [own(ev)]

    def _in_config(self, ev: StreamEvent) -> None:
        """Hold the config section until its footer, then release it if it matches."""
        sec = self._devices.ctx.current
        assert self._config is not None and self._config_stmt is not None and sec is not None
        stmt, d = self._config_stmt, self._devices[sec.section_id]
        if type(ev) is VfioConfigData:
            self._devices.config(ev)
            if d.cfg_length > stmt["length"]:
                raise SignatureError(f"VFIO device {d.idstr}: its config section is longer than the "
                                     f"{stmt['length']} bytes the source signed (changed in transit); "
                                     f"refusing it")
        self._config.append(own(ev))
        if type(ev) is not SectionFooter:
            return
        if (stmt["length"], stmt["sha256"]) != (d.cfg_length, d.cfg.hexdigest()):
            raise SignatureError(f"VFIO device {d.idstr}: its config section ({d.cfg_length} bytes) "
                                 f"is not what the source signed (changed in transit); refusing")
        held, self._config, self._config_stmt = self._config, None, None
        for e in held:
            self.inner.process(e)

    # -- top-level records ----------------------------------------------------------------------------
    def _in_record(self, ev: StreamEvent) -> None:
        assert self._record is not None
        if type(ev) is Opaque:
            self._record += ev.raw
            if len(self._record) > MAX_RECORD:
                raise SignatureError(f"signed-statement record larger than {MAX_RECORD} bytes")
            return
        if type(ev) is not SectionFooter:
            raise SignatureError("malformed signed-statement record")
        payload, self._record = bytes(self._record), None
        if not self.policy.active:
            # not verifying: strip it; a format-2 stream's block statements are stripped too
            self._format2 = self._format2 or payload.startswith(SIG_MAGIC)
            return
        body, sig = decode_record(payload)
        stmt = statements.verify(self.policy.trusted, body, sig)
        if stmt["kind"] == "hello":
            self._accept_hello(stmt)
            self._format2 = True
            return
        hello = self.hello
        if hello is None:
            raise SignatureError(f"a {stmt['kind']} statement without a hello statement; refusing")
        for k in ("migration", "signer", "domain_uuid", "source_host"):
            if stmt.get(k, hello[k]) != hello[k]:
                raise SignatureError(f"{stmt.get('idstr', 'the stream')}: a {stmt['kind']} statement whose "
                                     f"{k} is {stmt[k]}, the stream's is {hello[k]} (a statement replayed "
                                     f"from another migration?); refusing")
        if stmt["kind"] == "config":
            self._accept_config(stmt)
        elif stmt["kind"] == "device":
            self._accept_device(stmt, sig)
        else:
            raise SignatureError(f"a {stmt['kind']} statement outside a VFIO section; refusing")

    # -- checks ------------------------------------------------------------------------------
    def _accept_hello(self, stmt: dict[str, Any]) -> None:
        if self.hello is not None:
            raise SignatureError("a second hello statement in one migration stream; refusing")
        now = self.policy.clock()
        age = now - stmt["time"]
        if abs(age) > self.policy.max_age:
            raise SignatureError(f"migration {stmt['migration']} was signed {int(age)} s ago (limit "
                                 f"{self.policy.max_age} s; replayed stream or unsynchronised clocks); "
                                 f"refusing")
        flt = self.inner
        if flt.domain_uuid is not None and stmt["domain_uuid"] != flt.domain_uuid:
            raise SignatureError(f"the stream is signed for domain {stmt['domain_uuid']}, but this "
                                 f"migration is for domain {flt.domain_uuid}; refusing")
        if self.policy.replay is not None:
            self.policy.replay.advance(stmt["signer"], stmt["domain_uuid"], stmt["seq"],
                                       stmt["migration"])
        flt.bind_source(stmt["domain_uuid"], stmt["source_host"])  # manifests record the signed source
        self.hello = stmt
        self.verified.append(stmt)
        self._tell_hello(stmt)

    def _accept_config(self, stmt: dict[str, Any]) -> None:
        """A config statement: the next thing must be that device's config section."""
        if self._config_stmt is not None or self._holding is not None:
            raise SignatureError(f"a config statement for {stmt['idstr']} where another statement's "
                                 f"section was due; refusing")
        if stmt["length"] > MAX_SIGNED_CONFIG:
            raise SignatureError(f"VFIO device {stmt['idstr']}: a signed config section of {stmt['length']} "
                                 f"bytes (limit {MAX_SIGNED_CONFIG}); refusing")
        self._config_stmt = stmt
        self.verified.append(stmt)

    def _accept_device(self, stmt: dict[str, Any], sig: bytes) -> None:
        """A device statement: it must be about the END_OF_STATE just held back."""
        sid = self._holding
        if sid is None:
            raise SignatureError(f"a device statement for {stmt['idstr']} where no VFIO device "
                                 f"data ended; refusing")
        d = self._devices[sid]
        if (stmt["idstr"], stmt["instance_id"]) != (d.idstr, d.instance_id):
            raise SignatureError(f"the statement after VFIO device {d.idstr} is for {stmt['idstr']} "
                                 f"(swapped devices?); refusing")
        self._check_state(stmt, sig, sid, d)
        held, self._held, self._holding = self._held, [], None
        for ev in held:
            self.inner.process(ev)
        self.verified.append(stmt)

    def _check_state(self, stmt: dict[str, Any], sig: bytes, sid: int, d: DeviceHashes) -> None:
        w = self.inner.writer_for(sid)
        if w is None:
            raise SignatureError(f"VFIO device {d.idstr}: its state was stored before it was verified")
        # the store's writer hashed every byte that passed (and that QEMU got)
        length, digest = w.length, w.hexdigest()
        if (stmt["length"], stmt["sha256"]) != (length, digest):
            raise SignatureError(f"VFIO device {d.idstr}: {length} bytes of state with SHA-256 "
                                 f"{digest[:16]}... passed, but the source signed {stmt['length']} "
                                 f"bytes with {stmt['sha256'][:16]}... (state changed in transit); refusing")
        b = (self.inner.bindings or {}).get(d.idstr)
        mine = (b.mdev_uuid, b.mdev_type) if b else (None, None)
        if (stmt["mdev_uuid"], stmt["mdev_type"]) != mine:
            raise SignatureError(f"VFIO device {d.idstr}: signed for mdev {stmt['mdev_uuid']} of type "
                                 f"{stmt['mdev_type']}, but here it is mdev {mine[0]} of type {mine[1]}; "
                                 f"refusing")
        w.signature, w.signer = manifest_signature(stmt, sig), stmt["signer"]

    def blocks_verified(self) -> dict[str, int]:
        """How many data blocks of each VFIO device (idstr) were verified and forwarded."""
        return {d.idstr: d.seq for d in self._devices.values()}

    def finish(self) -> None:
        """Call at the end of the input: anything held or half read is an error."""
        if (self._holding is not None or self._record is not None or self._stmt_block is not None
                or self._expect is not None or self._block is not None or self._config_stmt is not None
                or self._config is not None):
            raise SignatureError("the stream ended inside a signed-statement exchange")


def verify_stream(src: ByteSource, emit: Emit, store: Store, opts: FilterOptions,
                  policy: VerifyPolicy) -> tuple[list[DeviceResult], VerifyLayer]:
    """Verify, strip the records, and filter (splice/token) the stream in *src*."""
    parser = StreamParser()
    flt = StreamFilter(store, parser, opts, emit)
    layer = VerifyLayer(flt, policy)
    try:
        for ev in iter_events(src, parser):
            layer.process(ev)
        layer.finish()
    finally:
        flt.close()
    return flt.results, layer

