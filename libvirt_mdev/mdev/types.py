"""The match rule, shared by ``libvirt-mdev check``/``place`` (dry run) and the hook (gate).

State saved from an mdev of type T must only be loaded into an mdev of type T, and —
when the policy asks (:mod:`.policy`) — under a vendor driver that is the same or
newer, on the same parent model.  The source facts come from our metadata
annotation, matched to each hostdev of the *incoming* XML by guest PCI address
(:meth:`.model.Annotation.match`): the uuid in that XML is whatever the destination
will really use (an orchestrator's destination XML, a rewriting qemu.d hook), and its
facts come from wherever the caller looks (sysfs in the hook, node devices in the
CLI).  Both callers feed :func:`compare` the same :class:`DomainInfo` and a lookup
function, so the dry run and the gate cannot disagree.

Verdicts per device, and overall:

=================  ========================================================  ====
verdict            meaning                                                   exit
=================  ========================================================  ====
match              the destination mdev satisfies the policy                 0
type-mismatch      the destination mdev has another type                     6
driver-mismatch    vendor driver version rule fails or cannot be decided     6
parent-mismatch    parent model rule fails or cannot be decided              6
missing-on-dest    the destination has no active mdev with that uuid         7
not-annotated      no source facts recorded (``libvirt-mdev annotate``)      8
no-mdev            the domain has no mdev hostdevs: nothing to check         0
=================  ========================================================  ====

``not-annotated`` blocks only when ``require_annotation`` is on (the default).
Overall: the worst device verdict, in the table's order.
No lxml, no libvirt here: the hook imports this.
"""
from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import MdevError, MdevMissing, NotAnnotated, TypeMismatch
from .policy import MatchPolicy, driver_problem, parent_problem

if TYPE_CHECKING:  # keep the hook's import cheap
    from .model import AnnotatedMdev, DomainInfo


class Verdict(str, enum.Enum):
    MATCH = "match"
    TYPE_MISMATCH = "type-mismatch"
    DRIVER_MISMATCH = "driver-mismatch"
    PARENT_MISMATCH = "parent-mismatch"
    MISSING = "missing-on-dest"
    NOT_ANNOTATED = "not-annotated"
    NO_MDEV = "no-mdev"


#: worst first: the overall verdict is the first of these any device has
SEVERITY = (Verdict.TYPE_MISMATCH, Verdict.DRIVER_MISMATCH, Verdict.PARENT_MISMATCH, Verdict.MISSING,
            Verdict.NOT_ANNOTATED)
ERROR_FOR: dict[Verdict, type[MdevError]] = {
    Verdict.TYPE_MISMATCH: TypeMismatch, Verdict.DRIVER_MISMATCH: TypeMismatch,
    Verdict.PARENT_MISMATCH: TypeMismatch, Verdict.MISSING: MdevMissing, Verdict.NOT_ANNOTATED: NotAnnotated}


def worst(verdicts: list[Verdict], require_annotation: bool = True) -> Verdict:
    """The most serious of *verdicts* (``match`` when none is a problem)."""
    for v in SEVERITY:
        if v is Verdict.NOT_ANNOTATED and not require_annotation:
            continue
        if v in verdicts:
            return v
    return Verdict.MATCH


def exit_code(verdict: Verdict) -> int:
    cls = ERROR_FOR.get(verdict)
    return cls.exit_code if cls else 0


class SourceFacts(Protocol):
    """What the rule needs to know about the source mdev (an annotation entry, or the
    live source as ``check`` sees it)."""

    @property
    def type_id(self) -> str: ...
    @property
    def driver_version(self) -> str | None: ...
    @property
    def parent_model(self) -> str | None: ...


@dataclass(frozen=True)
class DestMdev:
    """What the destination says about one mdev uuid (``None`` from the lookup: absent)."""

    type_id: str
    parent: str | None = None
    driver: str | None = None
    driver_version: str | None = None
    parent_model: str | None = None


_DEFAULT_POLICY = MatchPolicy()


def judge(source: SourceFacts | None, dest: DestMdev | None,
          policy: MatchPolicy = _DEFAULT_POLICY) -> tuple[Verdict, str | None]:
    """The verdict for one device, and the policy's reason when a policy rule refuses."""
    if source is None:
        return Verdict.NOT_ANNOTATED, None
    if dest is None:
        return Verdict.MISSING, None
    if dest.type_id != source.type_id:
        return Verdict.TYPE_MISMATCH, None
    why = driver_problem(policy.driver_version, source.driver_version, dest.driver_version)
    if why:
        return Verdict.DRIVER_MISMATCH, why
    why = parent_problem(policy.parent_model, source.parent_model, dest.parent_model)
    if why:
        return Verdict.PARENT_MISMATCH, why
    return Verdict.MATCH, None


@dataclass(frozen=True)
class DeviceCheck:
    """One hostdev of the incoming XML judged against the destination.

    ``uuid`` is the mdev the incoming XML names (the one the destination will use);
    ``source_uuid`` the one the annotation recorded on the source (equal unless an
    orchestrator gave the guest another mdev); ``matched_by`` says how they were paired.
    """

    uuid: str
    guest_address: str | None
    idstr: str | None
    source_type: str | None
    source_parent: str | None
    dest_type: str | None
    dest_parent: str | None
    present: bool
    verdict: Verdict
    source_uuid: str | None = None
    matched_by: str | None = None
    source_driver_version: str | None = None
    dest_driver_version: str | None = None
    source_parent_model: str | None = None
    dest_parent_model: str | None = None
    detail: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"uuid": self.uuid, "guest_address": self.guest_address, "idstr": self.idstr,
                "source_type": self.source_type, "source_parent": self.source_parent,
                "dest_type": self.dest_type, "dest_parent": self.dest_parent,
                "present": self.present, "verdict": self.verdict.value,
                "source_uuid": self.source_uuid, "matched_by": self.matched_by,
                "source_driver_version": self.source_driver_version,
                "dest_driver_version": self.dest_driver_version,
                "source_parent_model": self.source_parent_model, "dest_parent_model": self.dest_parent_model,
                "detail": self.detail}

    def _remapped(self) -> str:
        """Said after the reason (the reason's start is what virsh users and log greps know)."""
        if self.source_uuid and self.source_uuid != self.uuid:
            return f" (the guest's device at {self.guest_address} used mdev {self.source_uuid} on the source)"
        return ""

    def reason(self, where: str = "this host") -> str:
        """One line for a refusal: names the mdev and both types (or the policy rule)."""
        src = self.source_type or "not annotated"
        if self.verdict is Verdict.TYPE_MISMATCH:
            return (f"mdev {self.uuid}: source type {src} but {where} has type {self.dest_type}; "
                    f"state must only be loaded into the same type{self._remapped()}")
        if self.verdict in (Verdict.DRIVER_MISMATCH, Verdict.PARENT_MISMATCH):
            return f"mdev {self.uuid} (type {src}): {self.detail}{self._remapped()}"
        if self.verdict is Verdict.MISSING:
            return (f"mdev {self.uuid} (source type {src}) does not exist on {where}; "
                    f"create it with: mdevctl start -u {self.uuid} -p PARENT -t {src}{self._remapped()}")
        if self.verdict is Verdict.NOT_ANNOTATED:
            dest = f"{where} has type {self.dest_type}" if self.dest_type else f"absent on {where}"
            at = f" at guest {self.guest_address}" if self.guest_address else ""
            return (f"mdev {self.uuid}{at} has no source type annotation ({dest}); "
                    f"run 'libvirt-mdev annotate DOMAIN' on the source")
        return f"mdev {self.uuid}: type {src} matches"


@dataclass(frozen=True)
class CheckResult:
    domain: str
    domain_uuid: str | None
    annotated: bool
    devices: list[DeviceCheck]
    require_annotation: bool = True
    notes: list[str] = field(default_factory=list)
    policy: MatchPolicy = _DEFAULT_POLICY

    @property
    def verdict(self) -> Verdict:
        if not self.devices:
            return Verdict.NO_MDEV
        return worst([d.verdict for d in self.devices], self.require_annotation)

    @property
    def allowed(self) -> bool:
        return self.verdict in (Verdict.MATCH, Verdict.NO_MDEV)

    @property
    def exit_code(self) -> int:
        return exit_code(self.verdict)

    def first_refusal(self) -> DeviceCheck | None:
        v = self.verdict
        return next((d for d in self.devices if d.verdict is v), None) if v in ERROR_FOR else None

    def error(self, where: str = "this host") -> MdevError | None:
        """The exception the gate raises, or ``None`` when allowed."""
        d = self.first_refusal()
        if d is None:
            return None
        return ERROR_FOR[d.verdict](f"domain {self.domain}: {d.reason(where)}",
                                    domain=self.domain, mdev=d.uuid, source_mdev=d.source_uuid,
                                    guest_address=d.guest_address,
                                    source_type=d.source_type, dest_type=d.dest_type)


def check_device(uuid: str, src: AnnotatedMdev | None, dest: DestMdev | None, policy: MatchPolicy, *,
                 guest_address: str | None = None, idstr: str | None = None,
                 source_uuid: str | None = None, matched_by: str | None = None) -> DeviceCheck:
    """Judge the mdev *uuid* the destination will use (*dest*: what this host shows of
    it, ``None`` when absent) against the recorded source facts *src*, under *policy*."""
    verdict, detail = judge(src, dest, policy)
    return DeviceCheck(
        uuid=uuid, guest_address=guest_address, idstr=idstr,
        source_type=src.type_id if src else None, source_parent=src.parent if src else None,
        dest_type=dest.type_id if dest else None, dest_parent=dest.parent if dest else None,
        present=dest is not None, verdict=verdict, source_uuid=source_uuid, matched_by=matched_by,
        source_driver_version=src.driver_version if src else None,
        dest_driver_version=dest.driver_version if dest else None,
        source_parent_model=src.parent_model if src else None,
        dest_parent_model=dest.parent_model if dest else None, detail=detail)


def compare(info: DomainInfo, dest_lookup: Callable[[str], DestMdev | None],
            require_annotation: bool = True, policy: MatchPolicy | None = None) -> CheckResult:
    """Judge every mdev of *info* (the incoming XML) against the destination.

    *dest_lookup(uuid)* returns the destination's :class:`DestMdev` for the uuid the
    XML names, or ``None`` when the mdev is absent; whatever it raises (unreadable
    sysfs, ambiguous nodedevs) propagates — doubt is never a match.
    """
    policy = policy or MatchPolicy()
    devices: list[DeviceCheck] = []
    for h in info.hostdevs:
        src, how = info.source_of(h)
        devices.append(check_device(h.uuid, src, dest_lookup(h.uuid), policy, guest_address=h.address,
                                    idstr=h.idstr, source_uuid=src.uuid if src else None,
                                    matched_by=how.value if how else None))
    return CheckResult(domain=info.name, domain_uuid=info.uuid, annotated=info.annotation is not None,
                       devices=devices, require_annotation=require_annotation, policy=policy)
