"""The dry run behind ``check`` and ``place``: what would really decide a migration.

Two views of every mdev, both reported (issue 15: a real mismatch must not hide
behind a missing annotation):

* the **gate view** — exactly what the destination's hook will decide: the incoming
  XML (the source's definition, or the orchestrator's destination XML) paired with
  our annotation by guest address, judged against the destination's mdev of the uuid
  that XML names (:func:`.types.compare`);
* the **live view** — the type the source host really has now (its node devices),
  judged against the same destination mdev.

The device's verdict is the more serious of the two; an operator sees both facts.
When the destination cannot use the named mdev, the report lists what an orchestrator
could remap to: the destination's free mdevs of the source's type (not named by any
domain there) and the parents' ``available_instances`` of it (one can be created with
mdevctl).  Reads only; nothing is changed on any host.  libvirt-python and lxml are
imported here (CLI only, never the hook).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..errors import MdevError, XMLError
from .domain import parse_domain
from .model import AnnotatedMdev, DomainInfo, MdevHostdev
from .nodedev import (
    NodedevMdev,
    NodedevParent,
    domain_xml,
    find_mdev,
    list_mdevs,
    list_parents,
    lookup_domain,
    mdevs_in_use,
    open_connection,
)
from .policy import DRIVER_VERSION_KEY, DriverVersionRule, MatchPolicy
from .sysfs import SysfsEnv
from .types import SEVERITY, CheckResult, DestMdev, DeviceCheck, Verdict, compare, exit_code, judge, worst

UNREACHABLE = "unreachable"
#: problems a remap to another destination mdev can fix (the driver version is host-wide)
_REMAPPABLE = (Verdict.MISSING, Verdict.TYPE_MISMATCH, Verdict.PARENT_MISMATCH)


# --------------------------------------------------------------------------- the two hosts
@dataclass(frozen=True)
class SourceView:
    """The source host's facts, read once (``place`` shares them between destinations)."""

    uri: str
    info: DomainInfo
    live: dict[str, NodedevMdev | None]
    parents: dict[str, NodedevParent]

    def live_facts(self, h: MdevHostdev, annotated: AnnotatedMdev | None) -> AnnotatedMdev | None:
        m = self.live.get(h.uuid)
        if m is None:
            return None
        p = self.parents.get(m.parent or "")
        return AnnotatedMdev(h.uuid, m.type_id, m.parent, guest_address=h.address,
                             driver_version=annotated.driver_version if annotated else None,
                             parent_model=p.model if p else None)


def read_source(uri: str, domain: str) -> SourceView:
    """Raises ConnectError (5), NotFound (12), XMLError (10), MdevError (ambiguous mdev)."""
    conn = open_connection(uri, readonly=True)
    try:
        info = parse_domain(domain_xml(lookup_domain(conn, domain)))
        mdevs = list_mdevs(conn) if info.hostdevs else {}
        parents = list_parents(conn) if info.hostdevs else {}
        live = {h.uuid: find_mdev(mdevs, h.uuid, uri) for h in info.hostdevs}
    finally:
        conn.close()
    return SourceView(uri, info, live, parents)


@dataclass(frozen=True)
class DestView:
    """One destination's mdevs, parents, and which mdevs its domains already name."""

    uri: str
    mdevs: dict[str, list[NodedevMdev]]
    parents: dict[str, NodedevParent]
    in_use: dict[str, str]
    #: the destination's own sysfs (``check`` run on the destination): driver versions
    sysfs: SysfsEnv | None = None

    def lookup(self, uuid: str) -> DestMdev | None:
        m = find_mdev(self.mdevs, uuid, self.uri)
        if m is None:
            return None
        p = self.parents.get(m.parent or "")
        driver, version, model = (p.driver, None, p.model) if p else (None, None, None)
        if self.sysfs is not None and m.parent:
            facts = self.sysfs.parent(m.parent)
            driver, version, model = facts.driver or driver, facts.driver_version, facts.model or model
        return DestMdev(m.type_id, m.parent, driver, version, model)


def read_dest(uri: str, sysfs: SysfsEnv | None = None) -> DestView:
    """Raises ConnectError (5) or XMLError (10)."""
    conn = open_connection(uri, readonly=True)
    try:
        return DestView(uri, list_mdevs(conn), list_parents(conn), mdevs_in_use(conn), sysfs)
    finally:
        conn.close()


def incoming_xml_info(source: DomainInfo, dest_xml: bytes) -> DomainInfo:
    """The orchestrator's destination XML, checked as libvirt would: the same mdevs at
    the same guest addresses (only the host uuids may differ)."""
    info = parse_domain(dest_xml)
    want = sorted(h.address or h.uuid for h in source.hostdevs)
    got = sorted(h.address or h.uuid for h in info.hostdevs)
    if want != got:
        raise XMLError(f"the destination XML has mdevs at {', '.join(got) or 'no address'} but domain "
                       f"{source.name} has them at {', '.join(want) or 'no address'}; libvirt refuses a "
                       f"destination XML that adds, removes or moves devices")
    return info


# --------------------------------------------------------------------------- reports
@dataclass(frozen=True)
class DeviceReport:
    """Both views of one mdev, what decides, and what an orchestrator could remap to."""

    gate: DeviceCheck
    source_uuid: str
    live_type: str | None
    live_verdict: Verdict | None
    verdict: Verdict
    problems: list[Verdict]
    free: list[NodedevMdev] = field(default_factory=list)
    parents: list[tuple[str, int | None]] = field(default_factory=list)
    #: the source's live facts (``None`` when the source has no such active mdev)
    live: AnnotatedMdev | None = None

    @property
    def creatable(self) -> list[tuple[str, int]]:
        return [(p, n) for p, n in self.parents if n]

    @property
    def wanted_type(self) -> str | None:
        return self.live_type or self.gate.source_type

    @property
    def remappable(self) -> bool:
        return bool(self.problems) and all(v in _REMAPPABLE for v in self.problems)

    def to_json(self) -> dict[str, Any]:
        g = self.gate
        return {"guest_address": g.guest_address, "idstr": g.idstr, "uuid": g.uuid, "source_uuid": self.source_uuid,
                "source_type": self.wanted_type, "source_live_type": self.live_type,
                "annotated_type": g.source_type, "matched_by": g.matched_by,
                "source_parent": g.source_parent or (self.live.parent if self.live else None),
                "dest_type": g.dest_type, "dest_parent": g.dest_parent, "present": g.present,
                "source_driver_version": g.source_driver_version, "dest_driver_version": g.dest_driver_version,
                "source_parent_model": g.source_parent_model or (self.live.parent_model if self.live else None),
                "dest_parent_model": g.dest_parent_model,
                "gate_verdict": g.verdict.value,
                "live_verdict": self.live_verdict.value if self.live_verdict else None,
                "verdict": self.verdict.value, "problems": [v.value for v in self.problems], "detail": g.detail,
                "free_mdevs": [{"uuid": m.uuid, "type": m.type_id, "parent": m.parent} for m in self.free],
                "parents": [{"parent": p, "type": self.wanted_type, "available_instances": n}
                            for p, n in self.parents]}


@dataclass(frozen=True)
class DestReport:
    """One destination's answer (``place`` prints one row per report)."""

    dest: str
    verdict: str
    exit_code: int
    devices: list[DeviceReport] = field(default_factory=list)
    gate: CheckResult | None = None
    remap: str = "not-needed"
    can_take: bool = False
    how: str | None = None
    why: str = ""
    #: how an orchestrator could remap the blocking mdevs (empty when it cannot or need not)
    plan: str = ""
    notes: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)
    error: dict[str, Any] | None = None

    @property
    def allowed(self) -> bool:
        return self.verdict in (Verdict.MATCH.value, Verdict.NO_MDEV.value)


def evaluate(source: SourceView, dest: DestView, *, dest_xml: bytes | None = None,
             require_annotation: bool = True, policy: MatchPolicy | None = None) -> DestReport:
    """Judge *source*'s domain against *dest* (see the module docstring)."""
    policy = policy or MatchPolicy()
    notes: list[str] = []
    unchecked: list[str] = []
    if policy.driver_version is not DriverVersionRule.OFF and dest.sysfs is None:
        policy = dataclasses.replace(policy, driver_version=DriverVersionRule.OFF)
        unchecked.append(DRIVER_VERSION_KEY)
        notes.append(f"{DRIVER_VERSION_KEY} is checked by the destination's hook only: libvirt does not report "
                     f"vendor driver versions (run check on the destination with --dest-sysfs /sys to see it)")
    incoming = source.info if dest_xml is None else incoming_xml_info(source.info, dest_xml)
    if dest_xml is not None and incoming.annotation is None and source.info.annotation is not None:
        notes.append("the destination XML carries no libvirt-mdev metadata although the source domain has it: "
                     "the hook will see none; keep the <metadata> element when writing the destination XML")
    gate = compare(incoming, dest.lookup, require_annotation=require_annotation, policy=policy)
    by_addr = {h.address or h.uuid: h for h in source.info.hostdevs}
    taken = {h.uuid for h in incoming.hostdevs}
    devices = []
    for h_in, g in zip(incoming.hostdevs, gate.devices, strict=True):
        h_src = by_addr.get(h_in.address or h_in.uuid, h_in)
        devices.append(_device(source, dest, h_src, g, policy, require_annotation, taken, notes))
    return _summarise(dest.uri, gate, devices, require_annotation, notes, unchecked)


def _device(source: SourceView, dest: DestView, h_src: MdevHostdev, g: DeviceCheck, policy: MatchPolicy,
            require: bool, taken: set[str], notes: list[str]) -> DeviceReport:
    annotated, _ = source.info.source_of(h_src)
    live = source.live_facts(h_src, annotated)
    live_verdict = judge(live, dest.lookup(g.uuid), policy)[0] if live is not None else None
    if live is not None and g.source_type and live.type_id != g.source_type:
        notes.append(f"mdev {h_src.uuid}: annotated type {g.source_type} but the source now has {live.type_id}; "
                     f"the live type decides here (the hook would trust the annotation): re-run libvirt-mdev annotate")
    if g.verdict is Verdict.NOT_ANNOTATED and live is not None:
        notes.append(f"mdev {h_src.uuid}: the source has type {live.type_id} but it is not recorded; "
                     f"run libvirt-mdev annotate {source.info.name} --connect SRC")
    problems: list[Verdict] = sorted({v for v in (g.verdict, live_verdict) if v is not None and v is not Verdict.MATCH},
                                     key=SEVERITY.index)
    verdict = worst(problems, require)
    rep = DeviceReport(g, h_src.uuid, live.type_id if live else None, live_verdict, verdict, problems, live=live)
    want = rep.wanted_type
    if verdict is Verdict.MATCH or want is None or not any(v in _REMAPPABLE for v in problems):
        return rep
    free = [m for u, ms in sorted(dest.mdevs.items()) for m in ms
            if m.active and m.type_id == want and u not in dest.in_use and u not in taken]
    parents = [(p.address, p.available.get(want)) for _, p in sorted(dest.parents.items()) if want in p.available]
    return dataclasses.replace(rep, free=free, parents=parents)


def _summarise(uri: str, gate: CheckResult, devices: list[DeviceReport], require: bool,
               notes: list[str], unchecked: list[str]) -> DestReport:
    if not devices:
        return DestReport(uri, Verdict.NO_MDEV.value, 0, [], gate, can_take=True, how="as-is",
                          why="no mdev hostdevs", notes=notes, unchecked=unchecked)
    verdict = worst([d.verdict for d in devices], require)
    blocking = [d for d in devices if d.verdict is not Verdict.MATCH
                and not (d.verdict is Verdict.NOT_ANNOTATED and not require)]
    if not blocking:
        return DestReport(uri, verdict.value, 0, devices, gate, can_take=True, how="as-is",
                          why=f"{len(devices)} mdev(s) match", notes=notes, unchecked=unchecked)
    first = next(d for d in blocking if d.verdict is verdict)
    why = _reason(first, uri)
    remap, plan = _plan(blocking)
    can_take = remap in ("free", "create")
    if remap == "impossible" and plan:
        why, plan = f"{why}; {plan}", ""
    return DestReport(uri, verdict.value, exit_code(verdict), devices, gate, remap=remap, can_take=can_take,
                      how=("remap" if remap == "free" else "remap+create") if can_take else None,
                      why=why, plan=plan, notes=notes, unchecked=unchecked)


def _reason(d: DeviceReport, uri: str) -> str:
    if d.verdict is d.gate.verdict:
        return d.gate.reason(uri)
    live = dataclasses.replace(d.gate, verdict=d.verdict, source_type=d.live_type)
    return live.reason(uri) + " (live source type; not yet annotated)" * (d.gate.source_type is None)


def _plan(blocking: list[DeviceReport]) -> tuple[str, str]:
    """Can every blocking device get another destination mdev?  (status, one phrase)."""
    if not all(d.remappable for d in blocking):
        return "impossible", ""
    used: set[str] = set()
    room: dict[tuple[str, str], int] = {}
    steps: list[str] = []
    create = False
    for d in blocking:
        want = d.wanted_type or "?"
        free = next((m for m in d.free if m.uuid not in used), None)
        if free is not None:
            used.add(free.uuid)
            steps.append(f"{d.gate.guest_address or d.source_uuid} -> free mdev {free.uuid} ({want})")
            continue
        for parent, n in d.creatable:
            room.setdefault((parent, want), n)
        target = next((p for p, _ in d.creatable if room[(p, want)] > 0), None)
        if target is None:
            if not d.parents:
                return "impossible", f"no free {want} mdev and no parent here offers type {want}"
            return "impossible", f"no free {want} mdev and no parent can create one (available_instances 0)"
        room[(target, want)] -= 1
        create = True
        steps.append(f"{d.gate.guest_address or d.source_uuid} -> create {want} on {target} "
                     f"(mdevctl start -u NEW-UUID -p {target} -t {want})")
    return ("create" if create else "free"), "; ".join(steps)


def evaluate_uri(source: SourceView, uri: str, **kwargs: Any) -> DestReport:
    """:func:`evaluate` for one destination URI, any user-facing error turned into a row
    (``place``: one unreachable host must not hide the others)."""
    sysfs = kwargs.pop("dest_sysfs", None)
    try:
        return evaluate(source, read_dest(uri, sysfs), **kwargs)
    except MdevError as exc:
        kind = UNREACHABLE if exc.exit_code == 5 else exc.kind
        return DestReport(uri, kind, exc.exit_code, why=exc.message, error=exc.to_json())
