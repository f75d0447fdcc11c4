"""Issue 17: binding by guest address, the compatibility policy, and the gate the hook/proxy call."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from libvirt_mdev.errors import ConfigError, MdevMissing, TypeMismatch, XMLError
from libvirt_mdev.mdev.domain import (
    METADATA_NS,
    AnnotatedMdev,
    Annotation,
    annotation_xml,
    merge_annotations,
    parse_annotation,
    parse_domain,
    set_annotation,
)
from libvirt_mdev.mdev.gate import armed_device, gate_check, recheck_armed
from libvirt_mdev.mdev.policy import DriverVersionRule, MatchPolicy, compare_versions
from libvirt_mdev.mdev.types import DestMdev, Verdict, compare
from libvirt_mdev.store.pending import PendingDevice
from testkit.fakesysfs import FakeParent, make_fake_sysfs

from .test_domain import domain, hostdev

SRC1 = "4b20d080-1b54-4048-85b3-a6a62d165c01"   # the source's mdevs
SRC2 = "4b20d080-1b54-4048-85b3-a6a62d165c02"
DST1 = "9d3c1e4f-0000-4000-8000-0000000000d1"   # what the orchestrator gives the guest on the destination
DST2 = "9d3c1e4f-0000-4000-8000-0000000000d2"
P = "0000:3b:00.0"
NEWER = MatchPolicy(DriverVersionRule.SAME_OR_NEWER)


def ann(*devs: tuple[str, str, str | None], version: str | None = None, model: str | None = None) -> str:
    """Our metadata element: (source uuid, type, guest address or None for an old annotation)."""
    items = "".join(f'<mdev:device uuid="{u}" type="{t}"' + (f' address="{a}"' if a else "")
                    + (f' driver_version="{version}"' if version else "")
                    + (f' parent_model="{model}"' if model else "") + "/>" for u, t, a in devs)
    return f'<mdev:migration xmlns:mdev="{METADATA_NS}" host="src">{items}</mdev:migration>'


def dest(types: dict[str, str], version: str | None = None, model: str | None = None):  # type: ignore[no-untyped-def]
    return lambda u: DestMdev(types[u], P, "nvidia", version, model) if u in types else None


# --------------------------------------------------------------------------- binding by guest address
def test_orchestrator_remap_same_type_is_allowed_and_paired_by_address() -> None:
    incoming = parse_domain(domain(hostdev(DST1, slot=5), ann((SRC1, "nvidia-222", "0000:00:05.0"))))
    r = compare(incoming, dest({DST1: "nvidia-222"}))
    assert r.allowed and r.verdict is Verdict.MATCH
    d = r.devices[0]
    assert (d.uuid, d.source_uuid, d.matched_by, d.source_type) == (DST1, SRC1, "guest-address", "nvidia-222")


def test_orchestrator_remap_other_type_is_refused_naming_both_uuids() -> None:
    incoming = parse_domain(domain(hostdev(DST1, slot=5), ann((SRC1, "nvidia-222", "0000:00:05.0"))))
    r = compare(incoming, dest({DST1: "nvidia-223"}))
    assert r.verdict is Verdict.TYPE_MISMATCH and r.exit_code == 6
    err = r.error("this host")
    assert isinstance(err, TypeMismatch)
    assert DST1 in err.message and SRC1 in err.message and "0000:00:05.0" in err.message
    assert "nvidia-222" in err.message and "nvidia-223" in err.message


def test_swapping_uuids_between_devices_is_caught_by_address() -> None:
    """An attacker who rewrites the XML chooses the uuids, not the guest addresses (ABI check)."""
    a = ann((SRC1, "nvidia-222", "0000:00:05.0"), (SRC2, "nvidia-223", "0000:00:06.0"))
    swapped = parse_domain(domain(hostdev(SRC2, slot=5) + hostdev(SRC1, slot=6), a))
    # on the destination SRC1 is a 222 and SRC2 a 223: by uuid everything would "match"
    r = compare(swapped, dest({SRC1: "nvidia-222", SRC2: "nvidia-223"}))
    assert [d.verdict for d in r.devices] == [Verdict.TYPE_MISMATCH, Verdict.TYPE_MISMATCH]


def test_old_annotation_without_addresses_still_matches_by_uuid() -> None:
    info = parse_domain(domain(hostdev(SRC1), ann((SRC1, "nvidia-222", None))))
    r = compare(info, dest({SRC1: "nvidia-222"}))
    assert r.allowed and r.devices[0].matched_by == "uuid"
    # ...but an old annotation cannot follow a remapped uuid: not annotated, never a guess
    remapped = parse_domain(domain(hostdev(DST1), ann((SRC1, "nvidia-222", None))))
    assert compare(remapped, dest({DST1: "nvidia-222"})).verdict is Verdict.NOT_ANNOTATED


def test_entry_for_another_address_does_not_describe_this_device() -> None:
    info = parse_domain(domain(hostdev(SRC1, slot=5), ann((SRC1, "nvidia-222", "0000:00:09.0"))))
    assert compare(info, dest({SRC1: "nvidia-222"})).verdict is Verdict.NOT_ANNOTATED


def test_annotation_roundtrip_with_new_attributes_and_duplicate_address() -> None:
    a = Annotation({SRC1: AnnotatedMdev(SRC1, "nvidia-222", "0000:af:00.0", "vfio-pci", "0000:00:05.0",
                                        "nvidia", "550.54.14", "10de:1eb8")}, host="h")
    text = annotation_xml(a)
    assert 'address="0000:00:05.0"' in text and 'driver_version="550.54.14"' in text
    assert parse_annotation(text) == a
    dup = ann((SRC1, "a", "0000:00:05.0"), (SRC2, "b", "0000:00:05.0"))
    with pytest.raises(XMLError, match="guest address 0000:00:05.0 is annotated twice"):
        parse_domain(domain(hostdev(SRC1), dup))
    with pytest.raises(XMLError, match="invalid value"):
        parse_domain(domain(hostdev(SRC1), ann((SRC1, "a", "0000:00:5.0"))))


def test_merge_drops_an_old_entry_for_a_reannotated_address() -> None:
    old = Annotation({SRC1: AnnotatedMdev(SRC1, "a", guest_address="0000:00:05.0"),
                      SRC2: AnnotatedMdev(SRC2, "b", guest_address="0000:00:06.0")})
    new = Annotation({DST1: AnnotatedMdev(DST1, "c", guest_address="0000:00:05.0")})
    merged = merge_annotations(old, new)
    assert set(merged.devices) == {SRC2, DST1}


def test_two_mdevs_at_one_guest_address_is_malformed() -> None:
    with pytest.raises(XMLError, match="two mdevs at guest address"):
        parse_domain(domain(hostdev(SRC1, slot=5) + hostdev(SRC2, slot=5)))


def test_set_annotation_keeps_the_new_attributes() -> None:
    a = Annotation({SRC1: AnnotatedMdev(SRC1, "t", guest_address="0000:00:05.0", driver_version="1.2")})
    out = set_annotation(domain(hostdev(SRC1)), a)
    assert parse_domain(out).annotation == a


# --------------------------------------------------------------------------- policy
@pytest.mark.parametrize("a,b,want", [("550.54.14", "550.54.14", 0), ("535.129.03", "550.54.14", -1),
                                      ("550.127.05", "550.54.14", 1), ("550.54", "550.54.1", -1),
                                      ("16.2", "16.10", -1), ("1.0-rc1", "1.0", 1)])
def test_compare_versions(a: str, b: str, want: int) -> None:
    assert compare_versions(a, b) == want


def _versioned(version: str | None = "550.54.14", model: str | None = "10de:1eb8"):  # type: ignore[no-untyped-def]
    return parse_domain(domain(hostdev(DST1), ann((SRC1, "nvidia-222", "0000:00:05.0"), version=version,
                                                  model=model)))


def test_older_vendor_driver_refused_when_policy_asks_same_or_newer_allowed_when_off() -> None:
    older = dest({DST1: "nvidia-222"}, version="535.129.03")
    r = compare(_versioned(), older, policy=NEWER)
    assert r.verdict is Verdict.DRIVER_MISMATCH and r.exit_code == 6
    err = r.error()
    assert isinstance(err, TypeMismatch) and "535.129.03" in err.message and "550.54.14" in err.message
    assert "upgrade the destination's driver" in err.message
    assert compare(_versioned(), older).allowed  # policy off (the default)
    assert compare(_versioned(), dest({DST1: "nvidia-222"}, version="550.127.05"), policy=NEWER).allowed
    same = MatchPolicy(DriverVersionRule.SAME)
    assert compare(_versioned(), dest({DST1: "nvidia-222"}, version="550.127.05"), policy=same).verdict \
        is Verdict.DRIVER_MISMATCH


def test_undecidable_version_rule_refuses() -> None:
    r = compare(_versioned(version=None), dest({DST1: "nvidia-222"}, version="550.54.14"), policy=NEWER)
    assert r.verdict is Verdict.DRIVER_MISMATCH and "re-run libvirt-mdev annotate" in r.devices[0].detail  # type: ignore[operator]
    r = compare(_versioned(), dest({DST1: "nvidia-222"}, version=None), policy=NEWER)
    assert r.verdict is Verdict.DRIVER_MISMATCH and "unknown" in r.devices[0].detail  # type: ignore[operator]


def test_parent_model_rule() -> None:
    on = MatchPolicy(parent_model=True)
    assert compare(_versioned(), dest({DST1: "nvidia-222"}, model="10de:1eb8"), policy=on).allowed
    r = compare(_versioned(), dest({DST1: "nvidia-222"}, model="10de:20b5"), policy=on)
    assert r.verdict is Verdict.PARENT_MISMATCH and "10de:20b5" in r.devices[0].detail  # type: ignore[operator]
    assert compare(_versioned(), dest({DST1: "nvidia-222"}, model="10de:20b5")).allowed


def test_type_mismatch_outranks_the_policy_verdicts() -> None:
    r = compare(_versioned(), dest({DST1: "nvidia-999"}, version="1.0"), policy=NEWER)
    assert r.verdict is Verdict.TYPE_MISMATCH


def test_policy_from_config_values_and_defaults() -> None:
    class Conf:
        match_driver_version = "same-or-newer"
        match_parent_model = "yes"
        source = "/etc/x.conf"

    assert MatchPolicy.from_config(Conf()) == MatchPolicy(DriverVersionRule.SAME_OR_NEWER, True)
    assert MatchPolicy.from_config(object()) == MatchPolicy()  # a Config without the keys: defaults
    assert not MatchPolicy().active and NEWER.active
    Conf.match_driver_version = "newest"
    with pytest.raises(ConfigError, match="/etc/x.conf: match_driver_version must be one of off, same, same-or-newer"):
        MatchPolicy.from_config(Conf())
    with pytest.raises(ConfigError, match="match_parent_model must be yes or no"):
        MatchPolicy.parse("off", "maybe")


# --------------------------------------------------------------------------- the gate on a fake sysfs
def _sysfs(tmp_path: Path, version: str | None):  # type: ignore[no-untyped-def]
    return make_fake_sysfs(tmp_path / "sys", parents={P: ["nvidia-222", "nvidia-223"]},
                           devices={DST1: (P, "nvidia-222")},
                           parent_info={P: FakeParent(version=version)})


def test_sysfs_reads_driver_module_version_and_parent_model(tmp_path: Path) -> None:
    env = _sysfs(tmp_path, "535.129.03")
    m = env.mdev(DST1)
    assert (m.driver, m.driver_version, m.parent_model) == ("nvidia", "535.129.03", "10de:1eb8")
    bare = make_fake_sysfs(tmp_path / "bare", parents={P: ["nvidia-222"]}, devices={DST1: (P, "nvidia-222")})
    m = bare.mdev(DST1)
    assert (m.driver, m.driver_version, m.parent_model) == (None, None, None)


def test_gate_check_reads_the_version_from_sysfs(tmp_path: Path) -> None:
    root = _sysfs(tmp_path, "535.129.03").root
    assert gate_check(_versioned(), root).allowed
    r = gate_check(_versioned(), root, policy=NEWER)
    assert r.verdict is Verdict.DRIVER_MISMATCH and r.devices[0].dest_driver_version == "535.129.03"
    newer = _sysfs(tmp_path / "n", "550.127.05").root
    assert gate_check(_versioned(), newer, policy=NEWER).allowed
    no_version = _sysfs(tmp_path / "v", None).root
    assert gate_check(_versioned(), no_version, policy=NEWER).verdict is Verdict.DRIVER_MISMATCH


def test_armed_device_and_recheck(tmp_path: Path) -> None:
    env = _sysfs(tmp_path, "550.54.14")
    result = gate_check(_versioned(), env.root, policy=NEWER)
    rec = armed_device(result.devices[0])
    assert rec == PendingDevice(mdev_uuid=DST1, idstr="0000:00:05.0/vfio", type="nvidia-222",
                                driver_version="550.54.14", parent_model="10de:1eb8")
    assert recheck_armed("vm1", rec, env.root, NEWER).verdict is Verdict.MATCH
    # the driver was downgraded between migrate begin and the connection
    _sysfs(tmp_path, "535.129.03")
    with pytest.raises(TypeMismatch, match="older than 550.54.14"):
        recheck_armed("vm1", rec, env.root, NEWER)
    with pytest.raises(MdevMissing):
        recheck_armed("vm1", replace(rec, mdev_uuid=SRC2), env.root)
    with pytest.raises(TypeMismatch):  # a record from an older hook: only the type is known
        recheck_armed("vm1", PendingDevice(mdev_uuid=DST1, idstr="x", type="nvidia-223"), env.root)
