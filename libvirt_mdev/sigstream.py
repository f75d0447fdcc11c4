"""Signed statements inside the migration stream: the source and destination layers.

The record format is in :mod:`.sigrecord`.

Where the source layer puts records:

* ``hello`` right after the CONFIGURATION (before any section): binds the stream to
  a migration id, a fresh sequence number (ns clock), the domain and the source host.
* ``device`` right after the footer of each VFIO device's END section: its state is
  complete there, so its length and SHA-256 are known.
* ``config`` right after the footer of each VFIO device's FULL (config) section: the
  PCI config space and MSI-X table QEMU writes into the device are signed too.

What the destination layer does (in front of the :class:`~libvirt_mdev.filter.StreamFilter`):

* Strips every record: QEMU never sees one.
* ``hello``: trusted key, fresh (``max_age``), sequence newer than any earlier
  migration of this domain signed by that key (a replay guard kept in the store),
  domain uuid as expected.
* Each VFIO device: the END_OF_STATE that ends its END section (and that section's
  footer; likewise for its FULL config section) is *held back*, so the filter does not commit the state and QEMU cannot
  finish loading the device, until the device statement has been verified against
  what actually passed (the store's writer hashed every byte of it) and against the
  domain's binding (idstr, mdev uuid and type, domain, migration, signer).  Then the
  signature goes into the manifest and the held events are released.
* With ``require_signature``: a stream without hello, a device without statement, a
  record whose key is unknown or whose signature fails → :class:`SignatureError`,
  the proxy closes both sides and the migration is aborted.
"""
from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Optional, Union

from .errors import MdevMissing, SignatureError
from .filter import Binding, DeviceResult, FilterOptions, StreamFilter
from .sign import (SigningKey, TrustedKeys, config_statement, device_statement, hello_statement,
                   manifest_signature, new_migration_id, sign_statement, verify_statement)
from .sigrecord import (MAX_RECORD, SIG_IDSTR, SIG_SECTION_ID, ReplayGuard, decode_record,
                        encode_record)
from .store.store import Store
from .stream import (Command, Configuration, Eof, Event, FileHeader, Opaque, SectionFooter,
                     SectionFull, SectionHeader, StreamParser, VfioBlockData, VfioConfigData,
                     VfioMarker, iter_events)
from .stream.wire import SectionType, VfioFlag

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
    h: Any = field(default_factory=hashlib.sha256)
    length: int = 0
    complete: bool = False
    #: the device's config section (FULL): hashed the same way
    cfg: Any = field(default_factory=hashlib.sha256)
    cfg_length: int = 0
    cfg_complete: bool = False


class _Devices(dict[int, _Hashing]):
    """The VFIO devices a layer has seen, by section id, with their running hashes
    (the bookkeeping both the sign and the verify layer need)."""

    def header(self, ev: SectionHeader) -> None:
        if ev.kind == "vfio" and ev.section_id not in self:
            self[ev.section_id] = _Hashing(ev.idstr, ev.instance_id)

    def config(self, ev: Event) -> None:
        d = self[ev.section_id]  # type: ignore[attr-defined]
        d.cfg.update(ev.raw)
        d.cfg_length += len(ev.raw)


class SignLayer:
    """Source side: every input byte goes out unchanged, plus signed records."""

    def __init__(self, ctx: SignContext, emit: Emit) -> None:
        self.ctx = ctx
        self._emit = emit
        self._hello_due = False
        self._section: Optional[SectionHeader] = None
        self._devices = _Devices()
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
        self._record(hello_statement(seq=int(self.ctx.clock() * 1e9), **self._common()))

    def process(self, ev: Event) -> None:
        t = type(ev)
        if self._hello_due and t is not Configuration:
            self._hello()  # no CONFIGURATION record in this stream
        if t is VfioBlockData:
            d = self._devices[ev.section_id]  # type: ignore[attr-defined]
            d.h.update(ev.raw)
            d.length += len(ev.raw)
        elif isinstance(ev, SectionHeader):
            self._section = ev
            self._devices.header(ev)
        elif t is VfioConfigData:
            self._devices.config(ev)
        elif t is VfioMarker and ev.marker == VfioFlag.END_OF_STATE:  # type: ignore[attr-defined]
            if _in_end(self._section):
                self._devices[ev.section_id].complete = True  # type: ignore[attr-defined]
            elif _in_full(self._section):
                self._devices[ev.section_id].cfg_complete = True  # type: ignore[attr-defined]
        self._emit(ev.raw)
        if t is FileHeader:
            self._hello_due = True
        elif t is Configuration:
            self._hello()
        elif t is SectionFooter and _in_end(self._section):
            done = self._devices.get(ev.section_id)  # type: ignore[attr-defined]
            if done is not None and done.complete:
                done.complete = False
                self._device(done)
        elif t is SectionFooter and _in_full(self._section):
            cfg = self._devices.get(ev.section_id)  # type: ignore[attr-defined]
            if cfg is not None and cfg.cfg_complete:
                cfg.cfg_complete = False
                self._record(config_statement(idstr=cfg.idstr, instance_id=cfg.instance_id,
                                              length=cfg.cfg_length, sha256=cfg.cfg.hexdigest(),
                                              **self._common()))

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


def _in_end(sec: Optional[SectionHeader]) -> bool:
    return sec is not None and sec.kind == "vfio" and sec.type == SectionType.SECTION_END


def _in_full(sec: Optional[SectionHeader]) -> bool:
    return sec is not None and sec.kind == "vfio" and sec.type == SectionType.SECTION_FULL


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


class VerifyLayer:
    """Destination side, in front of a :class:`StreamFilter`: verify and strip records."""

    def __init__(self, inner: StreamFilter, policy: VerifyPolicy) -> None:
        self.inner = inner
        self.policy = policy
        self.hello: Optional[dict[str, Any]] = None
        self._section: Optional[SectionHeader] = None
        self._record: Optional[bytearray] = None
        self._held: list[Event] = []
        self._holding: Optional[int] = None
        #: what the held END_OF_STATE ends: "device" (state, END section) or "config" (FULL)
        self._held_kind = "device"
        self._devices = _Devices()
        self.verified: list[dict[str, Any]] = []

    # -- dispatch ------------------------------------------------------------------------------
    def process(self, ev: Event) -> None:
        t = type(ev)
        if self._record is not None:
            self._in_record(ev)
            return
        if t is SectionFull and ev.idstr == SIG_IDSTR:  # type: ignore[attr-defined]
            self._record = bytearray()
            return
        if self._holding is not None:
            if t is SectionFooter and ev.section_id == self._holding and len(self._held) == 1:  # type: ignore[attr-defined]
                self._held.append(_own(ev))
                return
            d = self._devices[self._holding]
            what = "state" if self._held_kind == "device" else "config section"
            raise SignatureError(f"VFIO device {d.idstr}: its {what} is not followed by a signed "
                                 f"statement (require_signature is on); refusing it")
        if self.policy.require and self.hello is None and _is_record_start(ev):
            raise SignatureError("the migration stream carries no signed statement from the source "
                                 "(require_signature is on): is the source proxy running with a "
                                 "host key? refusing")
        if isinstance(ev, SectionHeader):
            self._section = ev
            self._devices.header(ev)
        elif t is VfioConfigData:
            self._devices.config(ev)
        elif (t is VfioMarker and ev.marker == VfioFlag.END_OF_STATE  # type: ignore[attr-defined]
              and (_in_end(self._section) or _in_full(self._section)) and self._must_verify()):
            self._holding = ev.section_id  # type: ignore[attr-defined]
            self._held_kind = "device" if _in_end(self._section) else "config"
            self._held = [_own(ev)]
            return
        self.inner.process(ev)

    def _must_verify(self) -> bool:
        return self.policy.require or (self.policy.active and self.hello is not None)

    def _in_record(self, ev: Event) -> None:
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
            return  # not verifying: strip it and go on
        body, sig = decode_record(payload)
        stmt = verify_statement(self.policy.trusted, body, sig)
        if stmt["kind"] == "hello":
            self._accept_hello(stmt)
        else:
            self._accept_held(stmt, sig)

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
        opts = self.inner.opts
        if opts.domain_uuid is not None and stmt["domain_uuid"] != opts.domain_uuid:
            raise SignatureError(f"the stream is signed for domain {stmt['domain_uuid']}, but this "
                                 f"migration is for domain {opts.domain_uuid}; refusing")
        if stmt["domain_uuid"] is None:
            raise SignatureError("the signed hello names no domain; refusing")
        if self.policy.replay is not None:
            self.policy.replay.advance(stmt["signer"], stmt["domain_uuid"], stmt["seq"],
                                       stmt["migration"])
        opts.domain_uuid = stmt["domain_uuid"]
        opts.source_host = stmt["source_host"]  # manifests record the signed source host
        self.hello = stmt
        self.verified.append(stmt)

    def _accept_held(self, stmt: dict[str, Any], sig: bytes) -> None:
        """A device or config statement: it must be about what was just held back."""
        sid = self._holding
        if sid is None:
            raise SignatureError(f"a {stmt['kind']} statement for {stmt['idstr']} where no VFIO device "
                                 f"data ended; refusing")
        d = self._devices[sid]
        if stmt["kind"] != self._held_kind:
            what = "state" if self._held_kind == "device" else "config section"
            raise SignatureError(f"a {stmt['kind']} statement for {stmt['idstr']} where the {what} of "
                                 f"VFIO device {d.idstr} ended (expected its {self._held_kind} "
                                 f"statement); refusing")
        hello = self.hello
        if hello is None:
            raise SignatureError("a device statement without a hello statement; refusing")
        for k in ("migration", "signer", "domain_uuid", "source_host"):
            if stmt[k] != hello[k]:
                raise SignatureError(f"VFIO device {d.idstr}: its statement's {k} is {stmt[k]}, the "
                                     f"stream's is {hello[k]} (a statement replayed from another "
                                     f"migration?); refusing")
        if (stmt["idstr"], stmt["instance_id"]) != (d.idstr, d.instance_id):
            raise SignatureError(f"the statement after VFIO device {d.idstr} is for {stmt['idstr']} "
                                 f"(swapped devices?); refusing")
        if stmt["kind"] == "config":
            if (stmt["length"], stmt["sha256"]) != (d.cfg_length, d.cfg.hexdigest()):
                raise SignatureError(f"VFIO device {d.idstr}: its config section ({d.cfg_length} bytes) "
                                     f"is not what the source signed (changed in transit); refusing")
        else:
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
        b = (self.inner.opts.bindings or {}).get(d.idstr)
        mine = (b.mdev_uuid, b.mdev_type) if b else (None, None)
        if (stmt["mdev_uuid"], stmt["mdev_type"]) != mine:
            raise SignatureError(f"VFIO device {d.idstr}: signed for mdev {stmt['mdev_uuid']} of type "
                                 f"{stmt['mdev_type']}, but here it is mdev {mine[0]} of type {mine[1]}; "
                                 f"refusing")
        w.signature, w.signer = manifest_signature(stmt, sig), stmt["signer"]

    def finish(self) -> None:
        """Call at the end of the input: a held device or a half record is an error."""
        if self._holding is not None or self._record is not None:
            raise SignatureError("the stream ended inside a signed-statement exchange")


def _own(ev: Event) -> Event:
    """A copy of *ev* whose raw bytes survive the next feed (held events)."""
    return dataclasses.replace(ev, raw=bytes(ev.raw))


def _is_record_start(ev: Event) -> bool:
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
__all__ = ["SIG_IDSTR", "SIG_SECTION_ID", "MAX_RECORD", "SignContext", "SignLayer", "VerifyLayer",
           "VerifyPolicy", "ReplayGuard", "encode_record", "decode_record", "sign_stream", "verify_stream"]
