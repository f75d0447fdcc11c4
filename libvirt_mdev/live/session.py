"""One proxy connection: arm it, relay it, filter it, fail it closed (see :mod:`.proxy`).

Split from :mod:`libvirt_mdev.live.proxy` (the listening server) so each module keeps one
concern: this one owns a single source connection from accept to both sockets closed.
"""
from __future__ import annotations

import hashlib
import socket
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..config import Config
from ..errors import ConnectError, InternalError, MdevError, describe_connection
from ..filter import FilterOptions, StreamFilter
from ..log import get_logger
from ..mdev.policy import MatchPolicy
from ..sign.layers import SignLayer, VerifyLayer
from ..sign.source import peer_pid, sign_context, verify_policy
from ..store import Store
from ..store.pending import PendingRecord, read_pending, remove_pending
from ..stream import NEED_DATA, EventConsumer, StreamParser
from ..stream.events import Bytes
from ..stream.multifd import INIT as MULTIFD_INIT
from .arming import Claims, bindings_from_pending, check_local_types, select_pending
from .endpoint import check_forward_endpoint
from .limits import HEADER_LEN
from .options import ProxyOptions, SessionResult
from .relay import (
    Progress,
    ReturnPath,
    SocketReader,
    abort_socket,
    connect,
    reset_on_close,
    send_views,
)
from .tlsbridge import Bridge, accept_tls, connect_tls, read_header

if TYPE_CHECKING:
    from ..sign.layers import SignContext

log = get_logger("proxy")

#: where a multifd side channel found behind TLS goes: (the plain end of its bridge, peer, its
#: 64-byte channel init, accept time, connect=) — the signature of
#: :meth:`~.channels.Channels.side_channel`; *connect* opens a connection to the next hop with
#: TLS re-originated.  It owns the socket from then on.
OnSideChannel = Callable[..., None]


# --------------------------------------------------------------------------- one connection
class Session:
    """One source connection, from accept to both sockets closed."""

    def __init__(self, config: Config, opts: ProxyOptions, claims: Claims, src: socket.socket,
                 peer: str, *, header: bytes = b"", accepted: float | None = None,
                 on_bound: Callable[[Session], None] | None = None,
                 on_side_channel: OnSideChannel | None = None) -> None:
        """*header*: the QEMU file header the admission stage already read (empty for a TLS
        source: it is read behind TLS here); *accepted*: when the connection was accepted
        (the header deadline counts from then); *on_side_channel*: where a multifd side
        channel found behind TLS goes (None: it is refused, naming the mode)."""
        self.config, self.opts, self.claims = config, opts, claims
        self.src: socket.socket | None = src
        self.dst: socket.socket | None = None
        self.result = SessionResult(peer=peer, mode=opts.mode)
        self._abort_lock = threading.Lock()
        self._aborted: str | None = None
        self._record: PendingRecord | None = None
        #: the filter of this session's stream: refused on any failure (its states never loadable)
        self._flt: StreamFilter | None = None
        self._header = header
        self._accepted = time.monotonic() if accepted is None else accepted
        self._bridges: list[Bridge] = []
        #: called once the connection's QEMU header matched (TLS: behind the handshake)
        self._on_bound = on_bound
        self._raw_src = src
        self._evicted: str | None = None
        #: a refusal seen by another connection of the migration (:meth:`abort_from`)
        self._refused_from: str | None = None
        #: the connecting process (UNIX sockets): the sign mode finds the domain from it
        self.peer_pid = peer_pid(src)
        self._on_side_channel = on_side_channel
        #: True once this connection turned out to be a multifd side channel (behind TLS) and
        #: went to :attr:`_on_side_channel`: no result of its own, the channel reports
        self.handed_off = False

    def run(self) -> SessionResult:
        """accept (done) → TLS and header → arm → re-check → connect and forward."""
        started = time.monotonic()
        try:
            if self.opts.tls is not None and self.opts.mode != "relay":
                self._tls_source()
                if len(self._header) > HEADER_LEN:  # a multifd channel init: not a session of its own
                    self._hand_off_side_channel()
                    return self.result
            if self._on_bound is not None:
                self._on_bound(self)
            if self.opts.mode == "relay":
                self._relay()
            elif self.opts.mode == "sign":
                self._signed()
            else:
                self._arm()
                self._filtered()
            self.result.ok = self._aborted is None
            if self._aborted:
                raise MdevError(self._aborted)
        except Exception as exc:  # fail closed: every error ends the session the same way
            self._fail(exc)
        finally:
            self._close()
            if self._record is not None:
                self._spend()
            self.result.seconds = round(time.monotonic() - started, 3)
        return self.result

    # -- TLS --------------------------------------------------------------------------------------
    def _tls_source(self) -> None:
        """Terminate the source's TLS, then read the QEMU file header behind it, both
        within the header deadline (a TLS peer is bound only once its header matched)."""
        assert self.src is not None
        assert self.opts.tls is not None  # only called for a TLS proxy
        deadline = self._accepted + self.opts.limits.header_timeout
        bridge = accept_tls(self.src, self.opts.tls, self.result.peer,
                            timeout=max(0.1, deadline - time.monotonic()))
        self._bridges.append(bridge)
        self.src = bridge.plain
        self.result.tls = (bridge.version or "TLS").replace("TLSv", "TLS ")  # "TLSv1.3" -> "TLS 1.3"
        self._header = read_header(bridge, deadline, self.opts.limits.header_timeout,
                                   side_channel_len=MULTIFD_INIT.size if self.serves_side_channels() else 0,
                                   mode=self.opts.mode)

    def serves_side_channels(self) -> bool:
        """Whether a multifd side channel behind TLS is taken (else refused, naming the mode)."""
        return self._on_side_channel is not None

    def _hand_off_side_channel(self) -> None:
        """This TLS connection is a multifd side channel: give its plain end (its bridge
        resets the TCP side when the plain end is reset, :class:`~.tlsbridge.PlainEnd`) and
        its channel init to the side-channel handler, with a way to reach the next hop."""
        plain, self.src = self.src, None
        self._bridges = []
        self.handed_off = True
        init, self._header = self._header, b""
        assert plain is not None
        self.side_channel(plain, init)

    def side_channel(self, plain: socket.socket, init: bytes) -> None:
        assert self._on_side_channel is not None
        opts = self.opts
        self._on_side_channel(plain, self.result.peer, init, self._accepted, connect=lambda: open_forward(opts)[0])

    def evict(self, why: str) -> None:
        """From another thread: end a session still in its TLS handshake or header (the
        proxy's max-handshakes).  ``SHUT_RD`` wakes the blocked read and sends nothing;
        the session's own error path then resets the connection."""
        if self.handed_off:  # a side channel now: its migration decides
            return
        self._evicted = why
        try:
            self._raw_src.shutdown(socket.SHUT_RD)
        except OSError:
            pass

    # -- arming ---------------------------------------------------------------------------
    def _arm(self) -> None:
        record = select_pending(self.config, self.opts.domain, self.opts.proc_root)
        self.claims.claim(record, self.result.peer)
        self._record = record
        r = self.result
        r.domain_name, r.domain_uuid, r.migration_id = record.domain_name, record.domain_uuid, record.migration_id
        # the connection-time re-checks of what the hook armed: sysfs types (and the match policy) now
        check_local_types(record, self.config.sysfs_root, MatchPolicy.from_config(self.config))
        # and the no-bypass guard of QEMU's endpoint: it can be removed at run time (docs/guard.md)
        fwd = self.opts.forward
        check_forward_endpoint(self.config, host=fwd.host, port=fwd.port, path=fwd.path)
        devs = ", ".join(f"{d.mdev_uuid}={d.idstr}:{d.type}" for d in record.devices) or "none"
        log.info(f"connection from {r.peer}: serving domain {r.domain_name} ({r.domain_uuid}) "
                 f"migration {r.migration_id}, mode {self.opts.mode}"
                 + (f", {r.tls} (client certificate verified)" if r.tls else "") + f", armed mdevs: {devs}")
        self.on_armed(record)

    def _spend(self) -> None:
        assert self._record is not None
        self.claims.release(self._record)
        try:
            current = read_pending(self.config.runtime_dir, self._record.domain_uuid)
            # only our record: the hook may already have armed the domain's next migration
            if current is not None and current.migration_id == self._record.migration_id:
                remove_pending(self.config.runtime_dir, self._record.domain_uuid)
        except MdevError as exc:
            log.warning(f"migration {self._record.migration_id}: cannot remove its pending record: {exc}")

    # -- byte paths -----------------------------------------------------------------------------
    def _connect_dst(self) -> socket.socket:
        self.dst, bridge = open_forward(self.opts)
        if bridge is not None:
            self._bridges.append(bridge)
        self.on_connected()
        return self.dst

    def _reader(self) -> SocketReader:
        """The source's bytes: the header read by the admission first, under the progress deadline."""
        assert self.src is not None
        lim = self.opts.limits
        header, self._header = self._header, b""
        reader = SocketReader(self.src, prefix=header, progress=Progress(lim.progress_timeout, lim.progress_min_bytes))
        self.on_reader(reader)
        return reader

    def _filtered(self) -> None:
        assert self.src is not None and self._record is not None
        rec = self._record
        fopts = FilterOptions(mode=self.opts.mode, migration_id=rec.migration_id,
                              domain_name=rec.domain_name, domain_uuid=rec.domain_uuid,
                              bindings=bindings_from_pending(rec), accept_tokens=False,
                              verify=self.opts.verify, bind_from_save_image=False)
        with Store.open(self.config.store, create=True) as store:
            dst = self._connect_dst()
            back = self._start_return_path(dst)
            out: list[Bytes] = []
            parser = StreamParser(container="stream")
            flt = self._flt = StreamFilter(store, parser, fopts, out.append)
            try:
                policy = verify_policy(self.config, store)
                if policy is None:
                    self._pump(parser, flt, out, dst)
                else:  # verify and strip the source's signed statements (issue 8)
                    policy.on_hello = self.on_hello
                    layer = VerifyLayer(flt, policy)
                    self._pump(parser, layer, out, dst)
                    layer.finish()
            finally:
                flt.close()
            self._finish(back)
            self.result.devices = [d.to_json() for d in flt.results]

    def _signed(self) -> None:
        """Source host: sign each device's state on its way out (issue 8)."""
        ctx = sign_context(self.config, self.peer_pid, domain=self.opts.domain,
                           domain_xml=self.opts.domain_xml, libvirt_uri=self.opts.libvirt_uri)
        self.result.domain_uuid, self.result.migration_id = ctx.domain_uuid, ctx.migration_id
        log.info(f"connection from {self.result.peer}: signing migration {ctx.migration_id} of domain "
                 f"{ctx.domain_uuid} with key {ctx.key.key_id}, forwarding to {self.opts.forward}")
        self.on_signing(ctx)
        dst = self._connect_dst()
        back = self._start_return_path(dst)
        out: list[Bytes] = []
        layer = SignLayer(ctx, out.append)
        self._pump(StreamParser(container="stream"), layer, out, dst)
        self._finish(back)
        self.result.devices = [s for s in layer.signed if s["kind"] == "device"]

    # -- hooks: sessions that other connections join (multifd: live/channels.py, live/signchannels.py) --
    def on_armed(self, record: PendingRecord) -> None:
        """Filtering modes: *record* was claimed and re-checked, nothing forwarded yet."""

    def on_signing(self, ctx: SignContext) -> None:
        """Sign mode: the signing context is known, nothing forwarded yet."""

    def on_hello(self, hello: dict[str, Any] | None) -> None:
        """A verifying host: the stream's signed hello passed every check (None: the
        stream showed its first section without one)."""

    def on_reader(self, reader: SocketReader) -> None:
        """The source's reader exists (other connections' bytes may count for its
        progress deadline: :meth:`SocketReader.credit`)."""

    def on_connected(self) -> None:
        """The next hop is connected (side channels held until now may go)."""

    def on_abort(self, why: str) -> None:
        """Both connections were just reset, for *why* (any thread)."""

    def abort_from(self, why: str) -> None:
        """From another connection's thread: reset this one for a refusal seen there
        (a side channel's); this session's error path then logs *why* as its one line, a
        refusal, not the transport failure (a reset, an early end) it saw."""
        self._refused_from = why
        self._abort(why)

    def _pump(self, parser: StreamParser, flt: EventConsumer, out: list[Bytes], dst: socket.socket) -> None:
        """Source→destination: read a chunk, run every event through the filter, then
        send what it emitted in one gathered call (nothing of a refused chunk leaves)."""
        reader = self._reader()
        h_in = hashlib.sha256() if self.opts.digest else None
        h_out = hashlib.sha256() if self.opts.digest else None
        r = self.result
        process = flt.process
        while True:
            data = reader.read()
            n = len(data)
            r.bytes_in += n
            if h_in is not None:
                h_in.update(data)
            parser.feed(data)
            while True:
                ev = parser.next_event()
                if ev is NEED_DATA:
                    break
                process(ev)
            del data
            if out:
                if h_out is not None:
                    for piece in out:
                        h_out.update(piece)
                r.bytes_out += send_views(dst, out)
                out.clear()
            if n == 0:
                break
        if h_in is not None and h_out is not None:
            r.sha256_in, r.sha256_out = h_in.hexdigest(), h_out.hexdigest()
        if not parser.done:  # the parser raises for a truncated stream; this is a guard
            raise MdevError("the source closed the connection before the end of the stream")

    def _relay(self) -> None:
        assert self.src is not None
        log.info(f"connection from {self.result.peer}: relaying verbatim to {self.opts.forward}")
        dst = self._connect_dst()
        back = self._start_return_path(dst)
        reader = self._reader()
        while True:
            data = reader.read()
            if not data:
                break
            self.result.bytes_in += len(data)
            dst.sendall(data)
            self.result.bytes_out += len(data)
            del data
        self._finish(back)

    def _start_return_path(self, dst: socket.socket) -> ReturnPath:
        assert self.src is not None
        back = ReturnPath(dst, self.src, self._abort)
        back.start()
        return back

    def _finish(self, back: ReturnPath) -> None:
        """The source sent everything: let the destination see EOF, wait until it closes."""
        assert self.dst is not None
        try:
            self.dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        back.join(self.opts.drain_timeout)
        self.result.bytes_back = back.bytes
        if back.is_alive():
            log.warning(f"{self.result.peer}: the destination did not close within "
                        f"{self.opts.drain_timeout:g}s after the stream ended")

    # -- ending -----------------------------------------------------------------------------------
    def _abort(self, why: str) -> None:
        """Reset both connections at once (any thread); TLS bridges reset their TCP sides."""
        with self._abort_lock:
            if self._aborted is None:
                self._aborted = why
            src, dst, self.src, self.dst = self.src, self.dst, None, None
        for b in self._bridges:
            b.abort()
        # the source first: the return path, seeing the destination's end, half-closes the
        # source (a FIN) on a clean EOF; the source must see a reset, never a stream that ended
        abort_socket(src)
        abort_socket(dst)
        self.on_abort(why)

    def _fail(self, exc: BaseException) -> None:
        """The one place a refusal ends: both sockets reset, one line logged."""
        if self._refused_from is not None and self._refused_from == self._aborted:
            exc = MdevError(self._refused_from)  # what this session saw was that refusal
        # a TLS error seen by a bridge explains the plain-side symptom (EOF, reset) better
        first = self._evicted or self._aborted or next((b.error for b in self._bridges if b.error), None)
        self._abort(describe_connection(exc))
        r = self.result
        r.ok = False
        r.error = first or describe_connection(exc)
        if isinstance(exc, MdevError):
            r.error_kind, r.exit_code = exc.kind, exc.exit_code
        elif isinstance(exc, OSError):  # a peer went away: the transport, not the content
            r.error_kind, r.exit_code = ConnectError.kind, ConnectError.exit_code
        else:
            r.error_kind, r.exit_code = InternalError.kind, InternalError.exit_code
        who = f"domain {r.domain_name} migration {r.migration_id}" if r.domain_name else "connection"
        verdict = "FAILED" if r.error_kind == ConnectError.kind else "REFUSED"
        if self._flt is not None:  # a failure after the stream ended (drain, return path) refuses it too
            self._flt.abort(r.error)
        log.error(f"{r.peer}: {who} {verdict}, both connections closed: {r.error}")

    def _close(self) -> None:
        """A normal end (the abort path took the sockets already): FIN, not a reset."""
        src, dst, self.src, self.dst = self.src, self.dst, None, None
        for s in (src, dst):
            if s is not None:
                reset_on_close(s, False)
                try:
                    s.close()
                except OSError:
                    pass


def open_forward(opts: ProxyOptions) -> tuple[socket.socket, Bridge | None]:
    """A connection to the next hop (the local QEMU, or the destination's proxy), with TLS
    re-originated on a TLS proxy: (the socket to use, its bridge or None)."""
    raw = connect(opts.forward, opts.connect_timeout)
    if opts.tls is None:
        return raw, None
    bridge = connect_tls(raw, opts.tls)
    return bridge.plain, bridge


__all__ = ["OnSideChannel", "Session", "open_forward"]
