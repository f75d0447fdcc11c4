"""The live-migration proxy: filters one source→destination migration per connection.

Theory of operation
-------------------
With ``virsh migrate --listen-address 127.0.0.1 --migrateuri tcp://DEST:PORT`` the
destination QEMU listens on loopback and this proxy listens on DEST:PORT (DESIGN §8,
LIBVIRT.md §2); with ``--migrateuri unix:///...`` it carries the bytes between the
two hosts' sockets.  For each connection from a source:

1. **Which domain.**  The ``migrate begin`` hook armed a *pending record* for the
   incoming domain (:mod:`libvirt_mdev.store.pending`).  Exactly one record (or the
   one ``--domain`` names) is served; none, or several without ``--domain``, is a
   refusal.  A record already being served refuses extra connections: multifd
   (``--parallel``) opens several, and those side channels cannot be filtered.
2. **Which devices.**  The record lists each mdev (uuid, VFIO section idstr, source
   type).  The types are checked again against this host's sysfs *now* — the mdev
   may have been re-created since the hook ran — and become the filter's bindings:
   state for a device the domain does not have is refused before any of its bytes
   are forwarded (:class:`~libvirt_mdev.filter.StreamFilter`).
3. **Relay.**  Connect to the local QEMU (retrying briefly: it may not listen yet),
   relay destination→source verbatim (:class:`~libvirt_mdev.relay.ReturnPath`) and
   source→destination through :class:`~libvirt_mdev.stream.StreamParser` and the
   filter with the store.  Whatever the filter emits for one received chunk is sent
   in one gathered ``sendmsg`` *after* the whole chunk was accepted, so the bytes of
   a refused chunk never leave the proxy.
4. **Fail closed.**  Any error — parse error, unknown section, oversize block, store
   or verification failure, a truncated stream, a socket error — resets *both*
   connections at once: the destination QEMU's incoming migration fails and the
   source keeps running the guest.  One line says why (syslog + ``log_file``).
5. **One migration per record.**  When the session ends (either way) the pending
   record is removed, so a replayed connection finds nothing to serve.

``mode="relay"`` skips all of that: a verbatim two-way relay for the *source* host
of the UNIX-socket layout, where nothing is armed and the destination proxy filters.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from collections import deque
from typing import Any, Callable, Optional

from .arming import Claims
from .config import Config
from .errors import UsageError
from .relay import Endpoint, listen, tune
from .session import MODES, ProxyOptions, Session, SessionResult, log

#: results kept in memory (:attr:`MigrationProxy.results`)
KEEP_RESULTS = 256


# --------------------------------------------------------------------------- the server
class MigrationProxy:
    """Accepts source connections and runs a :class:`Session` for each, in a thread.

    Use :meth:`bind` (or pass a listening socket, e.g. systemd's), then
    :meth:`serve` (blocks) — or :meth:`start` for a background thread in tests.
    """

    def __init__(self, config: Config, opts: ProxyOptions,
                 on_result: Optional[Callable[[SessionResult], None]] = None,
                 listener: Optional[socket.socket] = None) -> None:
        self.config, self.opts = config, opts
        self.on_result = on_result
        self.claims = Claims()
        #: the latest sessions' results (bounded: a service runs for months)
        self.results: deque[SessionResult] = deque(maxlen=KEEP_RESULTS)
        self._listener = listener
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._thread: Optional[threading.Thread] = None
        self._lock = threading.Lock()

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

    def serve(self, once: bool = False) -> Optional[SessionResult]:
        """Accept until :meth:`stop` (or, with *once*, until the first session ended;
        extra connections meanwhile are still refused).  Returns the first session's
        result with *once*."""
        if self._listener is None:
            raise UsageError("bind() the proxy before serve()")
        self._listener.settimeout(0.2)
        first: Optional[threading.Thread] = None
        box: list[SessionResult] = []
        try:
            while not self._stop.is_set():
                if once and first is not None and not first.is_alive():
                    break
                try:
                    conn, addr = self._listener.accept()
                except socket.timeout:
                    continue
                except OSError:
                    if self._stop.is_set():
                        break
                    raise
                conn.settimeout(None)
                tune(conn)
                t = threading.Thread(target=self._session, args=(conn, _peer(addr), box if first is None else None),
                                     daemon=True, name="libvirt-mdev-session")
                first = first or t
                with self._lock:
                    self._threads = [x for x in self._threads if x.is_alive()]
                    self._threads.append(t)
                t.start()
        finally:
            self.join(self.opts.drain_timeout)
        return box[0] if box else None

    def _session(self, conn: socket.socket, peer: str, box: Optional[list[SessionResult]] = None) -> None:
        res = Session(self.config, self.opts, self.claims, conn, peer).run()
        if res.ok:
            log.info(f"{peer}: domain {res.domain_name} migration {res.migration_id} done: "
                     f"{res.bytes_in} bytes in, {res.bytes_out} out, {res.bytes_back} back, "
                     f"{len(res.devices)} device state(s) stored, {res.seconds}s")
        with self._lock:
            self.results.append(res)
        if box is not None:
            box.append(res)
        if self.on_result is not None:
            self.on_result(res)

    def start(self) -> "MigrationProxy":
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

    def __enter__(self) -> "MigrationProxy":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _peer(addr: Any) -> str:
    if isinstance(addr, tuple) and len(addr) >= 2:
        return f"{addr[0]}:{addr[1]}"
    return f"unix:{addr or '?'}"


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


__all__ = ["MODES", "MigrationProxy", "ProxyOptions", "Session", "SessionResult"]
