"""The type-match rule, shared by ``libvirt-mdev check`` (dry run) and the hook (gate).

State saved from an mdev of type T must only be loaded into an mdev of type T
(DESIGN §1).  The source type comes from our metadata annotation; the destination
type from wherever the caller looks (sysfs in the hook, node devices in the CLI).
Both callers feed :func:`compare` the same :class:`DomainInfo` and a lookup function,
so the dry run and the gate cannot disagree.

Verdicts per device, and overall:

=================  ========================================================  ====
verdict            meaning                                                   exit
=================  ========================================================  ====
match              annotated source type == destination type                 0
type-mismatch      destination has the mdev with another type                6
missing-on-dest    destination has no active mdev with that uuid             7
not-annotated      no source type recorded (``libvirt-mdev annotate``)       8
no-mdev            the domain has no mdev hostdevs: nothing to check         0
=================  ========================================================  ====

``not-annotated`` blocks only when ``require_annotation`` is on (the default).
Overall: the worst device verdict, in the order mismatch > missing > not-annotated.
No lxml, no libvirt here: the hook imports this.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

from ..errors import MdevError, MdevMissing, NotAnnotated, TypeMismatch

if TYPE_CHECKING:  # keep the hook's import cheap: domain.py pulls in lxml
    from .domain import DomainInfo


class Verdict(str, enum.Enum):
    MATCH = "match"
    TYPE_MISMATCH = "type-mismatch"
    MISSING = "missing-on-dest"
    NOT_ANNOTATED = "not-annotated"
    NO_MDEV = "no-mdev"


#: worst first: the overall verdict is the first of these any device has
_SEVERITY = (Verdict.TYPE_MISMATCH, Verdict.MISSING, Verdict.NOT_ANNOTATED)
_ERROR_FOR = {Verdict.TYPE_MISMATCH: TypeMismatch, Verdict.MISSING: MdevMissing,
              Verdict.NOT_ANNOTATED: NotAnnotated}


@dataclass(frozen=True)
class DestMdev:
    """What the destination says about one mdev uuid (``None`` from the lookup: absent)."""

    type_id: str
    parent: Optional[str] = None


@dataclass(frozen=True)
class DeviceCheck:
    uuid: str
    guest_address: Optional[str]
    idstr: Optional[str]
    source_type: Optional[str]
    source_parent: Optional[str]
    dest_type: Optional[str]
    dest_parent: Optional[str]
    present: bool
    verdict: Verdict

    def to_json(self) -> dict[str, Any]:
        return {"uuid": self.uuid, "guest_address": self.guest_address, "idstr": self.idstr,
                "source_type": self.source_type, "source_parent": self.source_parent,
                "dest_type": self.dest_type, "dest_parent": self.dest_parent,
                "present": self.present, "verdict": self.verdict.value}

    def reason(self, where: str = "this host") -> str:
        """One line for a refusal: names the mdev uuid and both types."""
        src = self.source_type or "not annotated"
        if self.verdict is Verdict.TYPE_MISMATCH:
            return (f"mdev {self.uuid}: source type {src} but {where} has type {self.dest_type}; "
                    f"state must only be loaded into the same type")
        if self.verdict is Verdict.MISSING:
            return (f"mdev {self.uuid} (source type {src}) does not exist on {where}; "
                    f"create it with: mdevctl start -u {self.uuid} -p PARENT -t {src}")
        if self.verdict is Verdict.NOT_ANNOTATED:
            dest = f"{where} has type {self.dest_type}" if self.dest_type else f"absent on {where}"
            return (f"mdev {self.uuid} has no source type annotation ({dest}); "
                    f"run 'libvirt-mdev annotate DOMAIN' on the source")
        return f"mdev {self.uuid}: type {src} matches"


@dataclass(frozen=True)
class CheckResult:
    domain: str
    domain_uuid: Optional[str]
    annotated: bool
    devices: list[DeviceCheck]
    require_annotation: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> Verdict:
        if not self.devices:
            return Verdict.NO_MDEV
        for v in _SEVERITY:
            if v is Verdict.NOT_ANNOTATED and not self.require_annotation:
                continue
            if any(d.verdict is v for d in self.devices):
                return v
        return Verdict.MATCH

    @property
    def allowed(self) -> bool:
        return self.verdict in (Verdict.MATCH, Verdict.NO_MDEV)

    @property
    def exit_code(self) -> int:
        cls = _ERROR_FOR.get(self.verdict)
        return cls.exit_code if cls else 0

    def first_refusal(self) -> Optional[DeviceCheck]:
        v = self.verdict
        return next((d for d in self.devices if d.verdict is v), None) if v in _ERROR_FOR else None

    def error(self, where: str = "this host") -> Optional[MdevError]:
        """The exception the gate raises, or ``None`` when allowed."""
        d = self.first_refusal()
        if d is None:
            return None
        return _ERROR_FOR[d.verdict](f"domain {self.domain}: {d.reason(where)}",
                                     domain=self.domain, mdev=d.uuid,
                                     source_type=d.source_type, dest_type=d.dest_type)


def compare(info: "DomainInfo", dest_lookup: Callable[[str], Optional[DestMdev]],
            require_annotation: bool = True) -> CheckResult:
    """Judge every mdev of *info* against the destination.

    *dest_lookup(uuid)* returns the destination's :class:`DestMdev` or ``None`` when
    the mdev is absent; whatever it raises (unreadable sysfs, ambiguous nodedevs)
    propagates — doubt is never a match.
    """
    ann = info.annotation
    devices: list[DeviceCheck] = []
    for h in info.hostdevs:
        src = ann.get(h.uuid) if ann else None
        dest = dest_lookup(h.uuid)
        if src is None:
            verdict = Verdict.NOT_ANNOTATED
        elif dest is None:
            verdict = Verdict.MISSING
        elif dest.type_id != src.type_id:
            verdict = Verdict.TYPE_MISMATCH
        else:
            verdict = Verdict.MATCH
        devices.append(DeviceCheck(
            uuid=h.uuid, guest_address=str(h.guest_address) if h.guest_address else None,
            idstr=h.idstr, source_type=src.type_id if src else None,
            source_parent=src.parent if src else None,
            dest_type=dest.type_id if dest else None, dest_parent=dest.parent if dest else None,
            present=dest is not None, verdict=verdict))
    return CheckResult(domain=info.name, domain_uuid=info.uuid, annotated=ann is not None,
                       devices=devices, require_annotation=require_annotation)
