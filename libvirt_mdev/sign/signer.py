"""The source side of signed streams: :class:`SignLayer` adds the signed statements (the
format is described in :mod:`libvirt_mdev.sign.layers` and docs/signing-wire.md)."""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import MdevMissing, SignatureError
from ..filter import Binding
from ..io.drive import ByteSource, iter_events
from ..stream import (
    Configuration,
    FileHeader,
    SectionFooter,
    SectionHeader,
    StreamEvent,
    VfioBlockData,
    VfioBlockEnd,
    VfioBlockStart,
    VfioConfigData,
    VfioMarker,
)
from ..stream.context import Emit
from ..stream.wire import VfioFlag
from . import statements
from .held import DeviceHashes, Devices, HeldBlock, own
from .keys import SigningKey, config_statement, device_statement, new_migration_id, sign_statement
from .record import encode_record, encode_statement_block
from .statements import MAX_SIGNED_BLOCK, MAX_SIGNED_CONFIG


@dataclass
class SignContext:
    """What the source layer signs besides the bytes it sees."""

    key: SigningKey
    source_host: str
    domain_uuid: str | None = None
    #: idstr -> binding of the domain's mdevs (None: unknown, statements carry null)
    bindings: dict[str, Binding] | None = None
    migration_id: str = field(default_factory=new_migration_id)
    clock: Callable[[], float] = time.time



class SignLayer:
    """Source side: every input byte goes out unchanged, each VFIO block and config
    section after the signed statement that covers it, plus hello and device statements."""

    def __init__(self, ctx: SignContext, emit: Emit) -> None:
        self.ctx = ctx
        self._emit = emit
        self._hello_due = False
        self._devices = Devices()
        self._block: HeldBlock | None = None
        #: a VFIO FULL (config) section being held: its raw bytes so far
        self._config: list[bytes] | None = None
        self.signed: list[dict[str, Any]] = []

    def _record(self, stmt: dict[str, Any]) -> None:
        body, sig = sign_statement(self.ctx.key, stmt)
        self._emit(encode_record(body, sig))
        self.signed.append(stmt)

    def _common(self) -> dict[str, Any]:
        return {"migration": self.ctx.migration_id, "domain_uuid": self.ctx.domain_uuid,
                    "source_host": self.ctx.source_host, "signer": self.ctx.key.key_id,
                    "time": int(self.ctx.clock())}

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
        self._block = HeldBlock(ev.section_id, own(ev), ev.size)

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

    def _device(self, d: DeviceHashes) -> None:
        b: Binding | None = None
        if self.ctx.bindings is not None:
            b = self.ctx.bindings.get(d.idstr)
            if b is None:
                raise MdevMissing(f"the stream carries state for VFIO device {d.idstr!r}, which the "
                                  f"domain does not have; refusing to sign it")
        self._record(device_statement(idstr=d.idstr, instance_id=d.instance_id,
                                      mdev_uuid=b.mdev_uuid if b else None,
                                      mdev_type=b.mdev_type if b else None, length=d.length,
                                      sha256=d.h.hexdigest(), **self._common()))


def sign_stream(src: ByteSource, emit: Emit, ctx: SignContext) -> SignLayer:
    """Copy the stream in *src* to *emit* with signed records added."""
    layer = SignLayer(ctx, emit)
    for ev in iter_events(src):
        layer.process(ev)
    return layer
