"""The live-migration proxy: filters one source→destination migration per connection.

Theory of operation
-------------------
With ``virsh migrate --listen-address 127.0.0.1 --migrateuri tcp://DEST:PORT`` the
destination QEMU listens on loopback and this proxy listens on DEST:PORT (docs/proxy.md,
README "Live migration"); with ``--migrateuri unix:///...`` it carries the bytes between the
two hosts' sockets.  For each connection from a source:

0. **Admission.**  One thread holds every new connection, without reading any
   record, until its first 8 bytes are a QEMU file header (or its first byte starts
   TLS on a ``--tls-dir`` proxy): first-bytes and header deadlines, a cap on such
   unarmed connections (the oldest is reset), an accept loop that survives ``EMFILE``
   (:mod:`.admission`, limits in :mod:`.limits`).  Only then does a session start.
1. **Which domain.**  The ``migrate begin`` hook armed a *pending record* for the
   incoming domain (:mod:`libvirt_mdev.store.pending`).  Exactly one record (or the
   one ``--domain`` names; with several, the ones whose QEMU runs) is served; none, or
   several without ``--domain``, is a refusal.  A record already being served refuses
   a second main (``QEVM``) connection.  Multifd (``--parallel``) side channels are
   bound to the same record by :mod:`.channels` (the uuid in their channel init), held
   until the main channel is connected, and fail with it (one migration, all channels).
2. **Which devices.**  The record lists each mdev (uuid, VFIO section idstr, source
   type).  The types are checked again against this host's sysfs *now* — the mdev
   may have been re-created since the hook ran — and become the filter's bindings:
   state for a device the domain does not have is refused before any of its bytes
   are forwarded (:class:`~libvirt_mdev.filter.StreamFilter`).
3. **Relay.**  Connect to the local QEMU (retrying briefly: it may not listen yet),
   relay destination→source verbatim (:class:`~libvirt_mdev.live.relay.ReturnPath`) and
   source→destination through :class:`~libvirt_mdev.stream.StreamParser` and the
   filter with the store.  Whatever the filter emits for one received chunk is sent
   in one gathered ``sendmsg`` *after* the whole chunk was accepted, so the bytes of
   a refused chunk never leave the proxy.
4. **Fail closed.**  Any error — parse error, unknown section, oversize block, store
   or verification failure, a truncated stream, a socket error, the progress
   deadline — resets *both* connections at once (SO_LINGER 0 is set from accept and
   connect on, so a ``kill -9`` of the proxy resets them too): the destination QEMU's incoming migration fails and the
   source keeps running the guest.  One line says why (syslog + ``log_file``).
5. **One migration per record.**  When the session ends (either way) the pending
   record is removed, so a replayed connection finds nothing to serve.

``mode="relay"`` skips all of that: a verbatim two-way relay for the *source* host
of the UNIX-socket layout, where nothing is armed and the destination proxy filters.
Every connection is relayed on its own, multifd side channels too (the destination
proxy binds them and puts the main channel first).

``mode="sign"`` (the source host of the signed layout) signs the main channel; its
multifd side channels are grouped with the signing session of their domain by
:mod:`.signchannels`.  On a ``--tls-dir`` proxy each side channel is found behind its
own TLS (:meth:`.session.Session.run`) and handed on like a plain one; a reset of it
resets the TLS peer too (:class:`~.tlsbridge.PlainEnd`).
"""
from __future__ import annotations

import os
import socket
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable

from ..config import Config
from ..errors import MdevError, UsageError
from .admission import Admission, OnSideChannel
from .arming import Claims
from .channels import Channels
from .options import MODES, ProxyOptions, SessionResult
from .relay import Endpoint, abort_socket, listen
from .session import Session, log
from .signchannels import SignChannels

#: results kept in memory (:attr:`MigrationProxy.results`)
KEEP_RESULTS = 256


# --------------------------------------------------------------------------- the server
class MigrationProxy:
    """Accepts source connections and runs a :class:`Session` for each, in a thread.

    Use :meth:`bind` (or pass a listening socket, e.g. systemd's), then
    :meth:`serve` (blocks) — or :meth:`start` for a background thread in tests.
    """

    def __init__(self, config: Config, opts: ProxyOptions,
                 on_result: Callable[[SessionResult], None] | None = None,
                 listener: socket.socket | None = None) -> None:
        self.config, self.opts = config, opts
        self.on_result = on_result
        self.claims = Claims()
        #: the latest sessions' results (bounded: a service runs for months)
        self.results: deque[SessionResult] = deque(maxlen=KEEP_RESULTS)
        self._listener = listener
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._once = False
        self._started_one = False
        self._first: list[SessionResult] = []
        self._admission: Admission | None = None
        #: TLS sessions not bound yet (handshake, header), oldest first
        self._handshaking: OrderedDict[int, Session] = OrderedDict()
        #: multifd side channels (--parallel) of the filtering modes (TLS or not)
        self.channels: Channels | None = None
        #: those of the signing mode (grouped with the signing session of their domain)
        self.sign_channels: SignChannels | None = None
        if opts.mode == "sign":
            self.sign_channels = SignChannels(config, opts)
        elif opts.mode != "relay":  # relay carries every connection verbatim, side channels too
            self.channels = Channels(config, opts)
        #: TLS sessions' claim on being the first (decided once their header arrived: a side
        #: channel found behind TLS is no session and must not take it)
        self._firsts: dict[int, bool] = {}

    def bind(self, ep: Endpoint) -> Endpoint:
        """Listen on *ep*; returns the address actually bound (port 0 → a real port)."""
        self._listener = listen(ep)
        return self.address

    @property
    def address(self) -> Endpoint:
        if self._listener is None:
            raise UsageError("the proxy is not listening yet")
        name = self._listener.getsockname()
        if self._listener.family == socket.AF_UNIX:
            return Endpoint(path=name)
        return Endpoint(host=name[0], port=name[1])

    def serve(self, once: bool = False) -> SessionResult | None:
        """Accept until :meth:`stop` (or, with *once*, until the first session ended;
        extra connections meanwhile are still refused).  Returns the first session's
        result with *once*.

        The path of one connection: :class:`~.admission.Admission` (accept, QEMU header,
        deadlines, caps) → :meth:`_admitted` (a session thread) → :meth:`Session.run`
        (arm, re-check, connect and forward)."""
        if self._listener is None:
            raise UsageError("bind() the proxy before serve()")
        self._once = once
        self._admission = Admission(self._listener, self.opts.limits, self._admitted, self._refused,
                                    relay=self.opts.mode == "relay", tls=self.opts.tls is not None,
                                    stop=self._stop, on_side_channel=self._side_channels(), mode=self.opts.mode)
        try:
            self._admission.run()
        finally:
            self.join(self.opts.drain_timeout)
        return self._first[0] if self._first else None

    def _admitted(self, conn: socket.socket, peer: str, header: bytes, accepted: float, tls: bool) -> None:
        """A connection passed the admission: run its session in a thread of its own.
        A TLS one is still *handshaking* (not yet bound) until its header arrived behind
        TLS: those are capped apart (``max_handshakes``, the oldest is reset)."""
        lim = self.opts.limits
        with self._lock:
            self._threads = [x for x in self._threads if x.is_alive()]
            busy = len(self._threads) - len(self._handshaking)
        if busy >= lim.max_sessions:
            why = MdevError(f"{busy} migrations are already being served (the proxy's max-sessions limit)")
            log.error(f"{peer}: connection REFUSED, reset: {why.message}")
            abort_socket(conn)
            self._refused(peer, why)
            return
        make: Callable[..., Session] = Session
        if self.channels is not None:
            make = self.channels.main_session
        elif self.sign_channels is not None:
            make = self.sign_channels.main_session
        session = make(self.config, self.opts, self.claims, conn, peer, header=header, accepted=accepted,
                       on_bound=self._bound if tls else None,
                       on_side_channel=self.channels.side_channel if self.channels is not None else None)
        victim: Session | None = None
        if tls:
            with self._lock:
                if len(self._handshaking) >= lim.max_handshakes:
                    _, victim = self._handshaking.popitem(last=False)
                self._handshaking[id(session)] = session
        if victim is not None:
            log.warning(f"{victim.result.peer}: {lim.max_handshakes} TLS handshakes in progress (the proxy's "
                        f"max-handshakes): resetting the oldest one")
            victim.evict(f"TLS from {victim.result.peer}: reset as the oldest of {lim.max_handshakes} TLS "
                         f"handshakes in progress (the proxy's max-handshakes limit)")
        first = None if tls else self._take_first()
        t = threading.Thread(target=self._session, args=(session, first), daemon=True,
                             name="libvirt-mdev-session")
        with self._lock:
            self._threads.append(t)
        t.start()

    def _side_channels(self) -> OnSideChannel | None:
        """Where the admission sends multifd side channels (None: it refuses them)."""
        if self.channels is not None:
            return self.channels.side_channel
        if self.sign_channels is not None:
            return self.sign_channels.side_channel
        return None

    def _bound(self, session: Session) -> None:
        """A TLS session's header matched: it is a main channel, no longer a handshake."""
        first = self._take_first()
        with self._lock:
            self._handshaking.pop(id(session), None)
            self._firsts[id(session)] = first

    def _unbind(self, session: Session) -> bool | None:
        """The session ended: forget it as a handshake; its claim on being the first."""
        with self._lock:
            self._handshaking.pop(id(session), None)
            return self._firsts.pop(id(session), None)

    def _refused(self, peer: str, exc: MdevError) -> None:
        """The admission refused a connection (logged there): record it like a session."""
        self._record(SessionResult(peer=peer, mode=self.opts.mode, error=exc.message, error_kind=exc.kind,
                                   exit_code=exc.exit_code), self._take_first())

    def _take_first(self) -> bool:
        with self._lock:
            first, self._started_one = not self._started_one, True
        return first

    def _session(self, session: Session, first: bool | None) -> None:
        """Run *session*; record its result (*first*: None for a TLS session, which takes
        its claim once bound, or at its end when refused before)."""
        try:
            res = session.run()
        finally:
            bound_first = self._unbind(session)
        if session.handed_off:  # a multifd side channel behind TLS: its migration reports it
            return
        if first is None:
            first = bound_first if bound_first is not None else self._take_first()
        peer = res.peer
        if res.ok:
            log.info(f"{peer}: domain {res.domain_name} migration {res.migration_id} done: "
                     f"{res.bytes_in} bytes in, {res.bytes_out} out, {res.bytes_back} back, "
                     f"{len(res.devices)} device state(s) stored, {res.seconds}s"
                     + (f", {res.tls}" if res.tls else "")
                     + (self.channels.summary(session) if self.channels is not None else "")
                     + (self.sign_channels.summary(session) if self.sign_channels is not None else ""))
        if self.channels is not None:
            self.channels.main_ended(session, res)
        if self.sign_channels is not None:
            self.sign_channels.main_ended(session, res)
        self._record(res, first)

    def _record(self, res: SessionResult, first: bool) -> None:
        with self._lock:
            self.results.append(res)
        if first:
            self._first.append(res)
            if self._once:
                self._stop.set()
        if self.on_result is not None:
            self.on_result(res)

    @property
    def admission(self) -> Admission | None:
        """The accept stage (its counters: shed, expired, fd_exhausted), once serving."""
        return self._admission

    def start(self) -> MigrationProxy:
        """Serve in a background thread (tests, embedding)."""
        self._thread = threading.Thread(target=self.serve, daemon=True, name="libvirt-mdev-proxy")
        self._thread.start()
        return self

    def join(self, timeout: float) -> None:
        with self._lock:
            threads = list(self._threads)
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        for side in (self.channels, self.sign_channels):
            if side is not None:
                side.join(max(0.0, deadline - time.monotonic()))

    def request_stop(self) -> None:
        """Stop accepting (signal-handler safe); :meth:`serve` returns soon after."""
        self._stop.set()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        if self._listener is not None:
            if self._listener.family == socket.AF_UNIX:
                _unlink_quietly(self._listener.getsockname())
            self._listener.close()
            self._listener = None

    def __enter__(self) -> MigrationProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


__all__ = ["MODES", "MigrationProxy", "ProxyOptions", "Session", "SessionResult"]
