"""Every deadline and count limit of the live-migration proxy, in one place, with its reason.

The proxy's port is reachable by anyone on the migration network, so each connection
must have a bounded cost before it has proved anything (the way OpenSSH bounds
``LoginGraceTime``/``MaxStartups`` and nginx ``client_header_timeout``/
``worker_connections``).  The defaults are far from what a real migration needs: a
source QEMU sends the QEMU file header in its first write, right after connecting
(or right after the TLS handshake), and then streams RAM pages without pause.

docs/proxy.md and SECURITY.md list the same table; keep them in step.
"""
from __future__ import annotations

import resource
from dataclasses import dataclass

from ..errors import UsageError

#: bytes of the QEMU file header (``QEVM`` + be32 version): what binds a connection
HEADER_LEN = 8
#: file descriptors kept free for sessions (store files, the destination socket, TLS
#: socketpairs) when the unarmed-connection cap is derived from RLIMIT_NOFILE
FD_HEADROOM = 24


@dataclass(frozen=True)
class ProxyLimits:
    """Deadlines (seconds) and caps; see the module docstring for why each exists."""

    #: accept → first byte.  A port scanner or an idle connection is closed after this.
    first_bytes_timeout: float = 10.0
    #: accept → the whole QEMU file header (TLS: handshake included).  Only then is a
    #: connection bound to the armed migration; a slow or silent peer never is.
    header_timeout: float = 20.0
    #: the progress deadline: at least ``progress_min_bytes`` in every window of this many
    #: seconds once the stream flows.  A real migration sends MiBs per second; a stalled
    #: or 1 byte/s peer is cut instead of holding the migration for ever.
    progress_timeout: float = 300.0
    progress_min_bytes: int = 64 << 10
    #: connections accepted but not yet bound (no complete header).  When full, the
    #: *oldest* is reset: a flood of idle connections costs the flooder its connections,
    #: never the real source (which sends its header at once).
    max_unarmed: int = 256
    #: sessions (threads) at once: bound or TLS-handshaking connections.  Beyond it a
    #: connection with a valid header is refused with one line.
    max_sessions: int = 32
    #: TLS connections still in their handshake (or reading the header behind it): each
    #: needs a thread.  When full, the *oldest* is reset, as with ``max_unarmed``; they
    #: do not count against ``max_sessions``, so stalled handshakes cannot fill it.
    max_handshakes: int = 16
    #: multifd (``--parallel``): side channels of one migration.  QEMU opens
    #: ``multifd-channels`` of them (libvirt's ``--parallel-connections``, at most 255);
    #: one more than this fails the whole migration closed (:mod:`.channels`).
    max_channels: int = 32
    #: multifd: the first side channel → its main (``QEVM``) channel.  Side channels are
    #: held unforwarded until the main channel is connected to the local QEMU; a main
    #: channel that never comes fails the migration instead of holding them for ever.
    main_channel_timeout: float = 20.0

    def __post_init__(self) -> None:
        for name in ("first_bytes_timeout", "header_timeout", "progress_timeout", "main_channel_timeout"):
            if not getattr(self, name) > 0:
                raise UsageError(f"proxy limit {name.replace('_', '-')} must be a positive number of seconds")
        if min(self.progress_min_bytes, self.max_unarmed, self.max_sessions, self.max_handshakes,
               self.max_channels) < 1:
            raise UsageError("proxy limits progress-min-bytes, max-unarmed, max-sessions, max-handshakes and "
                             "max-channels must be at least 1")

    def unarmed_cap(self) -> int:
        """``max_unarmed``, lowered so that unarmed connections alone can never use up the
        process's file descriptors (``ulimit -n``; the shipped unit sets 1024)."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            return self.max_unarmed
        return max(4, min(self.max_unarmed, (soft - FD_HEADROOM) // 2))


__all__ = ["FD_HEADROOM", "HEADER_LEN", "ProxyLimits"]
