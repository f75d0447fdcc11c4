"""The dry run's judgement without libvirt: hand-made source and destination views."""
from __future__ import annotations

from libvirt_mdev.mdev.domain import parse_domain
from libvirt_mdev.mdev.dryrun import DestView, SourceView, evaluate
from libvirt_mdev.mdev.nodedev import NodedevMdev, NodedevParent
from libvirt_mdev.mdev.types import Verdict

from .test_domain import domain, hostdev
from .test_match import ann

S1 = "4b20d080-1b54-4048-85b3-a6a62d165c01"
S2 = "4b20d080-1b54-4048-85b3-a6a62d165c02"
F1 = "9d3c1e4f-0000-4000-8000-0000000000f1"
P = "0000:3b:00.0"


def source(annotated: str | None, live: dict[str, str]) -> SourceView:
    a = ann(*((u, annotated, f"0000:00:{5 + i:02x}.0") for i, u in enumerate(live))) if annotated else ""
    info = parse_domain(domain("".join(hostdev(u, slot=5 + i) for i, u in enumerate(live)), a))
    return SourceView("test:///src", info, {u: NodedevMdev(u, t, "0000:af:00.0", "n") for u, t in live.items()},
                      {"0000:af:00.0": NodedevParent("pci", "0000:af:00.0", "10de:1eb8", None, {})})


def dest(mdevs: dict[str, str], available: int, in_use: tuple[str, ...] = ()) -> DestView:
    return DestView("test:///dst", {u: [NodedevMdev(u, t, P, "n")] for u, t in mdevs.items()},
                    {P: NodedevParent("pci_0000_3b_00_0", P, "10de:1eb8", None, {"nvidia-222": available})},
                    dict.fromkeys(in_use, "other"))


def test_stale_annotation_the_live_type_decides() -> None:
    rep = evaluate(source("nvidia-222", {S1: "nvidia-223"}), dest({S1: "nvidia-222"}, 4))
    d = rep.devices[0]
    assert d.gate.verdict is Verdict.MATCH  # the hook would trust the annotation...
    assert d.live_verdict is Verdict.TYPE_MISMATCH and rep.verdict == "type-mismatch" and rep.exit_code == 6
    assert any("annotated type nvidia-222 but the source now has nvidia-223" in n for n in rep.notes)


def test_two_devices_share_one_free_mdev_then_create() -> None:
    rep = evaluate(source("nvidia-222", {S1: "nvidia-222", S2: "nvidia-222"}), dest({F1: "nvidia-222"}, 1))
    assert rep.verdict == "missing-on-dest" and rep.remap == "create" and rep.how == "remap+create"
    assert f"0000:00:05.0 -> free mdev {F1}" in rep.plan and "0000:00:06.0 -> create nvidia-222" in rep.plan


def test_capacity_is_counted_across_devices() -> None:
    rep = evaluate(source("nvidia-222", {S1: "nvidia-222", S2: "nvidia-222"}), dest({}, 1))
    assert rep.remap == "impossible" and not rep.can_take


def test_mdevs_in_use_are_not_offered() -> None:
    rep = evaluate(source("nvidia-222", {S1: "nvidia-222"}), dest({F1: "nvidia-222"}, 0, in_use=(F1,)))
    assert rep.devices[0].free == [] and rep.remap == "impossible"


def test_not_annotated_cannot_be_remapped_away() -> None:
    rep = evaluate(source(None, {S1: "nvidia-222"}), dest({F1: "nvidia-222"}, 4))
    assert rep.verdict == "missing-on-dest" and rep.devices[0].problems == [Verdict.MISSING, Verdict.NOT_ANNOTATED]
    assert not rep.can_take and rep.remap == "impossible"
