"""What a proxy is told (:class:`ProxyOptions`) and what it reports per connection
(:class:`SessionResult`): plain data shared by the server (:mod:`.proxy`), its sessions
(:mod:`.session`) and the owners of multifd side channels (:mod:`.channels`,
:mod:`.signchannels`)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..configfile import PROXY_MODES
from ..errors import UsageError
from .limits import ProxyLimits
from .relay import Endpoint
from .tlsbridge import TlsCreds

MODES = PROXY_MODES


@dataclass
class ProxyOptions:
    forward: Endpoint
    mode: str = "splice"
    #: serve only this domain's pending record (uuid or name)
    domain: str | None = None
    #: seconds to keep retrying the local QEMU
    connect_timeout: float = 10.0
    #: seconds to wait for the destination to close after the stream ended
    drain_timeout: float = 30.0
    #: SHA-256 of both directions' bytes (tests, audits; costs CPU on big streams)
    digest: bool = False
    #: re-hash each stored state from disk before QEMU may finish loading it
    verify: bool = True
    #: ``sign`` mode (source host, issue 8): the domain's XML (default: ask libvirt at *libvirt_uri*)
    domain_xml: Path | None = None
    libvirt_uri: str = "qemu:///system"
    #: TLS migrations: terminate the source's TLS and re-originate it to the local QEMU
    tls: TlsCreds | None = None
    #: deadlines and caps against hostile peers (:mod:`.limits`)
    limits: ProxyLimits = field(default_factory=ProxyLimits)
    #: where to look for the QEMU processes of armed domains (stale pending records are
    #: skipped when several are armed; None: do not look)
    proc_root: Path | None = Path("/proc")

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UsageError(f"unknown proxy mode {self.mode!r} (use one of {', '.join(MODES)})")


@dataclass
class SessionResult:
    """What happened to one connection (logged; ``--json-log`` prints it)."""

    peer: str
    mode: str
    ok: bool = False
    error: str | None = None
    error_kind: str | None = None
    exit_code: int = 0
    domain_name: str | None = None
    domain_uuid: str | None = None
    migration_id: str | None = None
    #: bytes received from the source / sent to the destination / returned to the source
    bytes_in: int = 0
    bytes_out: int = 0
    bytes_back: int = 0
    sha256_in: str | None = None
    sha256_out: str | None = None
    devices: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    #: "TLS 1.3" when the source's TLS was terminated here
    tls: str | None = None
    #: multifd: the side channels of this migration, and their bytes from the source / to
    #: the destination when the main channel ended (a side channel may still be finishing)
    channels: int = 0
    channel_bytes_in: int = 0
    channel_bytes_out: int = 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


__all__ = ["MODES", "ProxyOptions", "SessionResult"]
