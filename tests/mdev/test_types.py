"""The type-match rule shared by check and the hook."""
from __future__ import annotations

import pytest

from libvirt_mdev.errors import MdevMissing, NotAnnotated, TypeMismatch
from libvirt_mdev.mdev.domain import AnnotatedMdev, Annotation, DomainInfo, GuestAddress, MdevHostdev
from libvirt_mdev.mdev.types import DestMdev, Verdict, compare

U1 = "4b20d080-1b54-4048-85b3-a6a62d165c01"
U2 = "4b20d080-1b54-4048-85b3-a6a62d165c02"


def info(ann: dict[str, str] | None, uuids: tuple[str, ...] = (U1, U2)) -> DomainInfo:
    hd = [MdevHostdev(u, "vfio-pci", GuestAddress(0, 0, 5 + i, 0), f"0000:00:{5 + i:02x}.0/vfio")
          for i, u in enumerate(uuids)]
    a = Annotation({u: AnnotatedMdev(u, t) for u, t in ann.items()}) if ann is not None else None
    return DomainInfo("vm", None, hd, a)


def dest(types: dict[str, str]):  # type: ignore[no-untyped-def]
    return lambda u: DestMdev(types[u], "p") if u in types else None


def test_all_match() -> None:
    r = compare(info({U1: "a", U2: "b"}), dest({U1: "a", U2: "b"}))
    assert r.allowed and r.verdict is Verdict.MATCH and r.exit_code == 0
    assert [d.verdict for d in r.devices] == [Verdict.MATCH, Verdict.MATCH]
    assert r.error() is None
    assert r.devices[1].to_json()["idstr"] == "0000:00:06.0/vfio"


def test_mismatch_beats_missing_and_names_both_types() -> None:
    r = compare(info({U1: "a", U2: "b"}), dest({U2: "c"}))
    assert [d.verdict for d in r.devices] == [Verdict.MISSING, Verdict.TYPE_MISMATCH]
    assert r.verdict is Verdict.TYPE_MISMATCH and not r.allowed and r.exit_code == 6
    err = r.error("host2")
    assert isinstance(err, TypeMismatch)
    assert U2 in err.message and "source type b" in err.message and "host2 has type c" in err.message


def test_missing_on_dest() -> None:
    r = compare(info({U1: "a"}, (U1,)), dest({}))
    assert r.verdict is Verdict.MISSING and r.exit_code == 7
    assert isinstance(r.error(), MdevMissing)
    assert not r.devices[0].present


def test_not_annotated_blocks_only_when_required() -> None:
    r = compare(info(None, (U1,)), dest({U1: "a"}))
    assert not r.annotated and r.verdict is Verdict.NOT_ANNOTATED and r.exit_code == 8
    assert isinstance(r.error(), NotAnnotated)
    lax = compare(info(None, (U1,)), dest({U1: "a"}), require_annotation=False)
    assert lax.allowed and lax.verdict is Verdict.MATCH and lax.error() is None


def test_partially_annotated_domain() -> None:
    r = compare(info({U1: "a"}), dest({U1: "a", U2: "b"}))
    assert r.annotated
    assert [d.verdict for d in r.devices] == [Verdict.MATCH, Verdict.NOT_ANNOTATED]
    assert r.first_refusal().uuid == U2  # type: ignore[union-attr]


def test_no_mdev_is_allowed() -> None:
    r = compare(info(None, ()), dest({}))
    assert r.allowed and r.verdict is Verdict.NO_MDEV and r.exit_code == 0


def test_lookup_errors_propagate() -> None:
    def boom(uuid: str) -> DestMdev | None:
        raise RuntimeError("unreadable")

    with pytest.raises(RuntimeError):
        compare(info({U1: "a"}, (U1,)), boom)
