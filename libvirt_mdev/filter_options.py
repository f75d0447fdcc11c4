"""What the caller tells the stream filter before the stream starts, and what it reports
per device: options, the domain's bindings (which mdev each VFIO section is for), results."""
from __future__ import annotations

import uuid as uuidlib
from dataclasses import dataclass, field
from typing import Any

from .stream.events import Bytes


@dataclass(frozen=True)
class Binding:
    """Which mdev a VFIO section belongs to, and its source type (from our annotation)."""

    mdev_uuid: str
    mdev_type: str | None
    #: the VFIO section's instance id: a hostdev registers exactly one, instance 0
    instance_id: int = 0
    #: the source's vendor driver version and parent model (annotation / pending record), recorded in
    #: the manifest so ``load`` can apply the compatibility policy again (docs/orchestrators.md)
    driver_version: str | None = None
    parent_model: str | None = None


@dataclass(frozen=True)
class FilterOptions:
    """What the caller decides before the stream starts (never changed while it runs: what
    the stream itself tells, a save image's domain or a signed hello, is kept by
    :class:`StreamFilter`)."""

    mode: str = "splice"
    migration_id: str = field(default_factory=lambda: uuidlib.uuid4().hex)
    domain_name: str | None = None
    domain_uuid: str | None = None
    source_host: str | None = None
    #: idstr -> binding; None when the domain is unknown (state is then stored unbound)
    bindings: dict[str, Binding] | None = None
    #: whether token records in the input may be resolved (offline splice only)
    accept_tokens: bool = False
    #: re-hash each committed state file from disk before QEMU may finish loading it
    verify: bool = True
    #: take bindings from a save image's own domain XML when none were given
    bind_from_save_image: bool = True
    #: what the stored states are for (store gc keeps ``image`` states until spent)
    stream_kind: str = "migration"
    #: what holds them (a stripped image's path), for ``store list``
    holder: str | None = None
    #: accept the stream when its end passed every check (the proxy); offline tools
    #: accept explicitly once their output is complete
    accept_at_end: bool = True


@dataclass
class DeviceResult:
    idstr: str
    instance_id: int
    section_id: int
    mdev_uuid: str | None
    mdev_type: str | None
    length: int
    sha256: str
    token: str
    blocks: int

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def bindings_from_domain_xml(xml: Bytes) -> tuple[dict[str, Binding], str | None, str | None]:
    """(bindings by VFIO idstr, domain name, domain uuid) from a domain definition."""
    from .mdev.domain import parse_domain
    info = parse_domain(bytes(xml))
    out: dict[str, Binding] = {}
    for h in info.hostdevs:
        if h.idstr is None:
            continue
        # by guest address (what survives a remapped destination XML), by uuid only for old annotations
        ann, _how = info.source_of(h)
        out[h.idstr] = Binding(h.uuid, ann.type_id if ann else None,
                               driver_version=ann.driver_version if ann else None,
                               parent_model=ann.parent_model if ann else None)
    return out, info.name, info.uuid
