"""Signed statements inside the migration stream: the source and destination layers.

Signed-stream format 2 (docs/signing-wire.md; the records are in :mod:`.record`, the
statement kinds in :mod:`.statements` and :mod:`.keys`).  Nothing of a VFIO device's
state or config reaches QEMU before it is verified.

Where the source layer puts statements:

* ``hello`` (format 2) right after the CONFIGURATION (before any section): binds the
  stream to a migration id, a fresh sequence number (ns clock), the domain and the
  source host.
* ``block`` ahead of each VFIO data block, as a data block of its own in the same
  section: the layer holds the block (at most :data:`MAX_SIGNED_BLOCK` bytes, one block
  at a time), signs its length and SHA-256, its place in the device's sequence and the
  previous block statement's hash, then sends statement and block.
* ``config`` ahead of each VFIO device's FULL (config) section: the layer holds the
  section (at most :data:`MAX_SIGNED_CONFIG` bytes of config), signs it, sends both.
* ``device`` right after the footer of each VFIO device's END section: length and
  SHA-256 of the whole state, bound to the mdev (uuid, type); it goes into the manifest.

What the destination layer does (in front of the :class:`~libvirt_mdev.filter.StreamFilter`):

* Strips every statement: QEMU never sees one.
* ``hello``: trusted key, fresh (``max_age``), sequence newer than any earlier
  migration of this domain signed by that key (a replay guard kept in the store),
  domain uuid as expected, format 2 (a format-1 stream is refused with a line saying so).
* Each data block: its statement must verify and be the device's next one in the chain
  (same migration and signer as the hello, this section's idstr and instance, the next
  ``seq``, ``prev`` = hash of the previous statement); the block is then held — not one
  byte goes to the filter — until its length and SHA-256 match; then it is released.
* The config section: held from its header to its footer until it matches the config
  statement that preceded it.
* The END_OF_STATE that ends each device's END section (and the footer) is held until
  the device statement verified against what passed and against the domain's binding
  (idstr, mdev uuid and type); its signature goes into the manifest.
* With ``require_signature``: a stream without hello, a block or config section without
  its statement, a record whose key is unknown or whose signature fails →
  :class:`SignatureError`, the proxy resets both sides and the migration is aborted.
"""
from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO, Callable, Optional, TypeVar, Union

from ..errors import MdevMissing, SignatureError
from ..filter import Binding, DeviceResult, FilterOptions, StreamFilter
from . import statements
from .keys import (SigningKey, TrustedKeys, config_statement, device_statement, manifest_signature,
                   new_migration_id, sign_statement)
from .record import (MAX_RECORD, SIG_IDSTR, SIG_MAGIC, SIG_SECTION_ID, ReplayGuard, decode_record,
                     encode_payload, encode_record, encode_statement_block)
from .statements import CHAIN_START, MAX_SIGNED_BLOCK, MAX_SIGNED_CONFIG
from ..store.store import Store
from ..stream import (Command, Configuration, Eof, Event, FileHeader, Opaque, SectionContext, SectionFooter,
                      SectionFull, SectionHeader, StreamEvent, StreamParser, VfioBlockData, VfioBlockEnd,
                      VfioBlockStart, VfioConfigData, VfioMarker, is_vfio)
from ..io.drive import iter_events
from ..stream.wire import SectionType, VfioFlag

if TYPE_CHECKING:
    from hashlib import _Hash as Hash

Bytes = Union[bytes, bytearray, memoryview]
Emit = Callable[[Bytes], None]

#: how old a hello may be (seconds): migration set-up time plus clock skew
DEFAULT_MAX_AGE = 600


# -- source side -------------------------------------------------------------------------


@dataclass
class SignContext:
    """What the source layer signs besides the bytes it sees."""

    key: SigningKey
    source_host: str
    domain_uuid: Optional[str] = None
    #: idstr -> binding of the domain's mdevs (None: unknown, statements carry null)
    bindings: Optional[dict[str, Binding]] = None
    migration_id: str = field(default_factory=new_migration_id)
    clock: Callable[[], float] = time.time


@dataclass
class _Hashing:
    idstr: str
    instance_id: int
    h: Hash = field(default_factory=hashlib.sha256)
    length: int = 0
    complete: bool = False
    #: the device's config section (FULL): hashed the same way
    cfg: Hash = field(default_factory=hashlib.sha256)
    cfg_length: int = 0
    cfg_complete: bool = False
    #: the block chain: the next block statement's seq and prev
    seq: int = 0
    chain: str = CHAIN_START


class _Devices(dict[int, _Hashing]):
    """The VFIO devices a layer has seen, by section id, with their running hashes
    (the bookkeeping both the sign and the verify layer need), and its section context."""

    def __init__(self) -> None:
        super().__init__()
        self.ctx = SectionContext()

    def header(self, ev: SectionHeader) -> None:
        """Enter *ev*'s section (a new VFIO device gets its hashes)."""
        vfio = self.ctx.enter(ev)
        if vfio is not None:
            self[vfio.section_id] = _Hashing(vfio.idstr, vfio.instance_id)

    def config(self, ev: VfioConfigData) -> None:
        d = self[ev.section_id]
        d.cfg.update(ev.raw)
        d.cfg_length += len(ev.raw)


@dataclass
class _Block:
    """A VFIO data block being held (source: to sign it; destination: to verify it).

    Its buffer is allocated once at the announced size (the caller has bounded it: the
    source by MAX_SIGNED_BLOCK, the destination by the signed length), so holding a
    block costs its size and nothing more; the parser guarantees the pieces add up."""

    section_id: int
    start: VfioBlockStart
    size: int
    data: bytearray = field(init=False)
    pos: int = 0
    h: Hash = field(default_factory=hashlib.sha256)

    def __post_init__(self) -> None:
        self.data = bytearray(self.size)

    def add(self, raw: Bytes) -> None:
        n = len(raw)
        self.data[self.pos:self.pos + n] = raw
        self.pos += n
        self.h.update(raw)


class SignLayer:
    """Source side: every input byte goes out unchanged, each VFIO block and config
    section after the signed statement that covers it, plus hello and device statements."""

    def __init__(self, ctx: SignContext, emit: Emit) -> None:
        self.ctx = ctx
        self._emit = emit
        self._hello_due = False
        self._devices = _Devices()
        self._block: Optional[_Block] = None
        #: a VFIO FULL (config) section being held: its raw bytes so far
        self._config: Optional[list[bytes]] = None
        self.signed: list[dict[str, Any]] = []

    def _record(self, stmt: dict[str, Any]) -> None:
        body, sig = sign_statement(self.ctx.key, stmt)
        self._emit(encode_record(body, sig))
        self.signed.append(stmt)

    def _common(self) -> dict[str, Any]:
        return dict(migration=self.ctx.migration_id, domain_uuid=self.ctx.domain_uuid,
                    source_host=self.ctx.source_host, signer=self.ctx.key.key_id,
                    time=int(self.ctx.clock()))

    def _hello(self) -> None:
        self._hello_due = False
        if self.ctx.domain_uuid is None:
            raise SignatureError("the source proxy does not know the migrating domain's uuid, which the "
                                 "signed hello must name: pass --domain UUID; refusing to sign")
        stmt = statements.hello(seq=int(self.ctx.clock() * 1e9), **self._common())
        body, sig = statements.sign(self.ctx.key, stmt)
        self._emit(encode_record(body, sig))
        self.signed.append(stmt)

    def process(self, ev: StreamEvent) -> None:
        if self._hello_due and type(ev) is not Configuration:
            self._hello()  # no CONFIGURATION record in this stream
        if self._config is not None:
            self._in_config(ev)
            return
        if type(ev) is VfioBlockStart:
            self._block_start(ev)
            return
        if type(ev) is VfioBlockData:
            assert self._block is not None
            self._block.add(ev.raw)
            d = self._devices[self._block.section_id]
            d.h.update(ev.raw)
            d.length += len(ev.raw)
            return
        if type(ev) is VfioBlockEnd:
            self._block_end()
            return
        ctx = self._devices.ctx
        if isinstance(ev, SectionHeader):
            self._devices.header(ev)
            if ctx.in_vfio_full:
                self._config = [bytes(ev.raw)]
                return
        elif type(ev) is VfioMarker and ev.marker == VfioFlag.END_OF_STATE and ctx.in_vfio_end:
            self._devices[ev.section_id].complete = True
        self._emit(ev.raw)
        if type(ev) is FileHeader:
            self._hello_due = True
        elif type(ev) is Configuration:
            self._hello()
        elif type(ev) is SectionFooter and ctx.in_vfio_end:
            done = self._devices.get(ev.section_id)
            if done is not None and done.complete:
                done.complete = False
                self._device(done)

    # -- data blocks: held whole, sent after their statement ------------------------------------
    def _block_start(self, ev: VfioBlockStart) -> None:
        d = self._devices[ev.section_id]
        if ev.size > MAX_SIGNED_BLOCK:
            raise SignatureError(f"VFIO device {d.idstr} sends a data block of {ev.size} bytes; the source "
                                 f"proxy signs blocks of at most {MAX_SIGNED_BLOCK} bytes (it holds one to "
                                 f"sign it before it is sent); refusing to sign")
        self._block = _Block(ev.section_id, _own(ev), ev.size)

    def _block_end(self) -> None:
        b, self._block = self._block, None
        assert b is not None
        d = self._devices[b.section_id]
        stmt = statements.block(migration=self.ctx.migration_id, signer=self.ctx.key.key_id, idstr=d.idstr,
                                instance_id=d.instance_id, seq=d.seq, length=b.pos,
                                sha256=b.h.hexdigest(), prev=d.chain)
        body, sig = statements.sign(self.ctx.key, stmt)
        d.seq, d.chain = d.seq + 1, statements.chain_hash(body)
        self._emit(encode_statement_block(body, sig))
        self._emit(b.start.raw)
        if b.data:
            self._emit(b.data)

    # -- the config section: held whole, sent after its statement -------------------------------
    def _in_config(self, ev: StreamEvent) -> None:
        assert self._config is not None
        sec = self._devices.ctx.current
        sid = sec.section_id if sec is not None else -1
        d = self._devices[sid]
        if type(ev) is VfioConfigData:
            self._devices.config(ev)
            if d.cfg_length > MAX_SIGNED_CONFIG:
                raise SignatureError(f"VFIO device {d.idstr}: its config section is longer than "
                                     f"{MAX_SIGNED_CONFIG} bytes, more than the source proxy signs; "
                                     f"refusing to sign")
        elif type(ev) is VfioMarker and ev.marker == VfioFlag.END_OF_STATE:
            d.cfg_complete = True
        self._config.append(bytes(ev.raw))
        if type(ev) is not SectionFooter:
            return
        held, self._config = self._config, None
        if not d.cfg_complete:
            raise SignatureError(f"VFIO device {d.idstr}: a config section without END_OF_STATE; "
                                 f"refusing to sign")
        d.cfg_complete = False
        self._record(config_statement(idstr=d.idstr, instance_id=d.instance_id, length=d.cfg_length,
                                      sha256=d.cfg.hexdigest(), **self._common()))
        self._emit(b"".join(held))

    def _device(self, d: _Hashing) -> None:
        b: Optional[Binding] = None
        if self.ctx.bindings is not None:
            b = self.ctx.bindings.get(d.idstr)
            if b is None:
                raise MdevMissing(f"the stream carries state for VFIO device {d.idstr!r}, which the "
                                  f"domain does not have; refusing to sign it")
        self._record(device_statement(idstr=d.idstr, instance_id=d.instance_id,
                                      mdev_uuid=b.mdev_uuid if b else None,
                                      mdev_type=b.mdev_type if b else None, length=d.length,
                                      sha256=d.h.hexdigest(), **self._common()))


def _in_full(sec: Optional[SectionHeader]) -> bool:
    return is_vfio(sec, SectionType.SECTION_FULL)


# -- destination side --------------------------------------------------------------------------


@dataclass
class VerifyPolicy:
    trusted: TrustedKeys
    require: bool = False
    max_age: int = DEFAULT_MAX_AGE
    replay: Optional[ReplayGuard] = None
    clock: Callable[[], float] = time.time

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
        self.hello: Optional[dict[str, Any]] = None
        self._record: Optional[bytearray] = None
        #: a format-2 stream (statements ahead of the data): block statements are stripped
        self._format2 = False
        #: a statement block being read (the block before each data block)
        self._stmt_block: Optional[bytearray] = None
        #: the verified block statement whose block comes next
        self._expect: Optional[dict[str, Any]] = None
        self._block: Optional[_Block] = None
        #: the verified config statement whose section comes next, then the section's held events
        self._config_stmt: Optional[dict[str, Any]] = None
        self._config: Optional[list[StreamEvent]] = None
        #: the held END_OF_STATE (and footer) of a device's END section, awaiting its statement
        self._held: list[StreamEvent] = []
        self._holding: Optional[int] = None
        self._devices = _Devices()
        self.verified: list[dict[str, Any]] = []

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
                self._held.append(_own(ev))
                return
            d = self._devices[self._holding]
            raise SignatureError(f"VFIO device {d.idstr}: its state is not followed by a signed "
                                 f"statement (require_signature is on); refusing it")
        if self.policy.require and self.hello is None and _is_record_start(ev):
            raise SignatureError("the migration stream carries no signed statement from the source "
                                 "(require_signature is on): is the source proxy running with a "
                                 "host key? refusing")
        if self._config_stmt is not None:
            self._config_start(ev)
            return
        if isinstance(ev, SectionHeader):
            self._devices.header(ev)
            if _in_full(ev) and self._must_verify():
                raise SignatureError(f"VFIO device {ev.idstr}: its config section is not preceded by a "
                                     f"signed config statement (require_signature is on); refusing it")
        elif type(ev) is VfioConfigData:
            self._devices.config(ev)
        elif (type(ev) is VfioMarker and ev.marker == VfioFlag.END_OF_STATE
              and self._devices.ctx.in_vfio_end and self._must_verify()):
            self._holding = ev.section_id
            self._held = [_own(ev)]
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
        self._block = _Block(ev.section_id, _own(ev), ev.size)

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
        if not (isinstance(ev, SectionHeader) and _in_full(ev)
                and (ev.idstr, ev.instance_id) == (stmt["idstr"], stmt["instance_id"])):
            raise SignatureError(f"a config statement for VFIO device {stmt['idstr']} not followed by its "
                                 f"config section; refusing")
        self._devices.header(ev)
        self._config = [_own(ev)]

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
        self._config.append(_own(ev))
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

    def _check_state(self, stmt: dict[str, Any], sig: bytes, sid: int, d: _Hashing) -> None:
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


_E = TypeVar("_E", bound=Event)


def _own(ev: _E) -> _E:
    """A copy of *ev* whose raw bytes survive the next feed (held events)."""
    return dataclasses.replace(ev, raw=bytes(ev.raw))


def _is_record_start(ev: StreamEvent) -> bool:
    return isinstance(ev, SectionHeader) or type(ev) in (Eof, Command)


# -- drivers over files and pipes (offline tools, tests) -----------------------------------------


def sign_stream(src: BinaryIO, emit: Emit, ctx: SignContext) -> SignLayer:
    """Copy the stream in *src* to *emit* with signed records added."""
    layer = SignLayer(ctx, emit)
    for ev in iter_events(src):
        layer.process(ev)
    return layer


def verify_stream(src: BinaryIO, emit: Emit, store: Store, opts: FilterOptions,
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


# the record names are re-exported: callers need one import for the whole feature
__all__ = ["SIG_IDSTR", "SIG_SECTION_ID", "MAX_RECORD", "MAX_SIGNED_BLOCK", "MAX_SIGNED_CONFIG", "SignContext",
           "SignLayer", "VerifyLayer", "VerifyPolicy", "ReplayGuard", "encode_record", "encode_payload",
           "decode_record", "sign_stream", "verify_stream"]
