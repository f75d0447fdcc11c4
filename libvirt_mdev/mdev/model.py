"""The model: what a domain's mdevs are, and what the source recorded about them.

Plain dataclasses, no lxml and no libvirt: the hook's gate and the proxy use them
without paying for an XML library.  :mod:`.domain` fills them from domain XML.

Binding rule (issue 17): the annotation is matched to a hostdev **by guest PCI
address** — the one thing a migration cannot change (libvirt's ABI-stability check
rejects a destination XML or hook output that moves a device) and the thing that
names the device's VFIO section in the stream.  The host mdev uuid is chosen by
whoever writes the destination XML (an orchestrator, a qemu.d hook), so it is only a
fallback for annotations written before addresses were recorded.
"""
from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

_ADDRESS_RE = re.compile(r"^([0-9a-f]{4}):([0-9a-f]{2}):([0-9a-f]{2})\.([0-7])$")


@dataclass(frozen=True)
class GuestAddress:
    """A guest PCI address as libvirt writes it; ``str()`` is ``0000:00:05.0``."""

    domain: int
    bus: int
    slot: int
    function: int

    def __str__(self) -> str:
        return f"{self.domain:04x}:{self.bus:02x}:{self.slot:02x}.{self.function:x}"

    @classmethod
    def parse(cls, text: str) -> GuestAddress:
        """The inverse of ``str()`` (case-insensitive); ``ValueError`` otherwise."""
        m = _ADDRESS_RE.match(text.strip().lower())
        if not m:
            raise ValueError(text)
        d, b, s, f = (int(g, 16) for g in m.groups())
        return cls(d, b, s, f)


@dataclass(frozen=True)
class MdevHostdev:
    """One mdev the domain uses: host uuid, model, guest address and stream idstr.

    ``guest_address``/``idstr`` are ``None`` when the XML gives no PCI address (libvirt
    assigns one on define; ``virsh dumpxml`` always has it) or a bus we cannot place.
    """

    uuid: str
    model: str | None
    guest_address: GuestAddress | None
    idstr: str | None

    @property
    def address(self) -> str | None:
        return str(self.guest_address) if self.guest_address is not None else None


@dataclass(frozen=True)
class AnnotatedMdev:
    """What the source recorded about one mdev in our metadata.

    ``uuid`` is the *source* host's mdev uuid (information since addresses are
    recorded); ``guest_address`` is the binding key.  ``driver_version`` and
    ``parent_model`` feed the optional compatibility policy (:mod:`.policy`).
    """

    uuid: str
    type_id: str
    parent: str | None = None
    device_api: str | None = None
    guest_address: str | None = None
    driver: str | None = None
    driver_version: str | None = None
    parent_model: str | None = None


class MatchedBy(str, enum.Enum):
    """How an annotation entry was found for a hostdev."""

    ADDRESS = "guest-address"
    UUID = "uuid"  #: an old annotation without addresses: the uuid must not have changed


@dataclass(frozen=True)
class Annotation:
    """Our metadata element: per source mdev, its type (and facts for the policy)."""

    devices: Mapping[str, AnnotatedMdev] = field(default_factory=dict)
    host: str | None = None
    time: str | None = None

    def get(self, uuid: str) -> AnnotatedMdev | None:
        return self.devices.get(uuid.lower())

    def by_address(self, address: str) -> AnnotatedMdev | None:
        return next((d for d in self.devices.values() if d.guest_address == address), None)

    def match(self, uuid: str, address: str | None) -> tuple[AnnotatedMdev | None, MatchedBy | None]:
        """The entry for the hostdev with *uuid* at guest *address*.

        By address first.  By uuid only when the entry records no address (written
        by an older ``annotate``) or the hostdev has none: an entry recorded for
        another address describes another device, whatever uuid it names.
        """
        if address is not None:
            found = self.by_address(address)
            if found is not None:
                return found, MatchedBy.ADDRESS
        found = self.get(uuid)
        if found is not None and (found.guest_address is None or address is None):
            return found, MatchedBy.UUID
        return None, None


@dataclass(frozen=True)
class DomainInfo:
    name: str
    uuid: str | None
    hostdevs: list[MdevHostdev]
    annotation: Annotation | None

    def hostdev(self, uuid: str) -> MdevHostdev | None:
        return next((h for h in self.hostdevs if h.uuid == uuid.lower()), None)

    def hostdev_at(self, address: str) -> MdevHostdev | None:
        return next((h for h in self.hostdevs if h.address == address), None)

    def source_of(self, h: MdevHostdev) -> tuple[AnnotatedMdev | None, MatchedBy | None]:
        """The annotation entry that describes hostdev *h* (see :meth:`Annotation.match`)."""
        if self.annotation is None:
            return None, None
        return self.annotation.match(h.uuid, h.address)
