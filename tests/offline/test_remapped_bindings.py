"""Issue 17 in the filter: a save image (or a migration) whose domain XML names *another*
mdev uuid than the one the source annotated is bound by guest PCI address, and the
manifest records the source's driver version and parent model for ``load``'s policy.

Each test fails on the code before this change: bindings were looked up by uuid, so a
remapped hostdev was stored unbound (``mdev_type`` null) and the manifest had no source facts.
"""
from __future__ import annotations

from pathlib import Path

from libvirt_mdev.filter import bindings_from_domain_xml
from libvirt_mdev.live.arming import bindings_from_pending
from libvirt_mdev.store import Store, resolve_token
from libvirt_mdev.store.pending import PendingRecord

from .saveimg import DOM_UUID, U5, U6, mdev_xml, save_image, token_filtered

SRC5 = "11111111-2222-4333-8444-555555550005"  # the uuid the source host used for slot 5
VERSION, MODEL = "550.54.14", "10de:1eb8"


def remapped_xml(*, address: bool = True) -> str:
    """Slot 5 and 6 name the destination's uuids; the annotation names the source's for slot 5."""
    where = " address='0000:00:05.0'" if address else ""
    rows = (f"<lm:device uuid='{SRC5}' type='nvidia-63'{where} parent='0000:af:00.0' device_api='vfio-pci' "
            f"driver='nvidia' driver_version='{VERSION}' parent_model='{MODEL}'/>"
            f"<lm:device uuid='{U6}' type='nvidia-64' parent='0000:af:00.0' device_api='vfio-pci'/>")
    meta = (f"<metadata><lm:migration xmlns:lm='urn:libvirt-mdev:metadata:1' host='src.example' "
            f"time='2026-12-01T13:00:00Z'>{rows}</lm:migration></metadata>")
    return (f"<domain type='kvm'><name>img1</name><uuid>{DOM_UUID}</uuid>{meta}"
            f"<devices>{mdev_xml(5, U5)}{mdev_xml(6, U6)}</devices></domain>")


def test_bindings_follow_the_guest_address_not_the_uuid() -> None:
    bindings, name, uuid = bindings_from_domain_xml(remapped_xml().encode())
    assert (name, uuid) == ("img1", DOM_UUID)
    b5, b6 = bindings["0000:00:05.0/vfio"], bindings["0000:00:06.0/vfio"]
    # slot 5: the destination's uuid, the type and facts the source recorded for that address
    assert (b5.mdev_uuid, b5.mdev_type, b5.driver_version, b5.parent_model) == (U5, "nvidia-63", VERSION, MODEL)
    # slot 6: an old-style entry without an address still matches by uuid
    assert (b6.mdev_uuid, b6.mdev_type, b6.driver_version) == (U6, "nvidia-64", None)


def test_an_addressless_entry_for_another_uuid_binds_nothing() -> None:
    """Without a recorded address only the uuid can match; a remapped uuid is then unknown (fail closed)."""
    bindings, _, _ = bindings_from_domain_xml(remapped_xml(address=False).encode())
    assert bindings["0000:00:05.0/vfio"].mdev_type is None


def test_pending_record_facts_reach_the_binding() -> None:
    record = PendingRecord.from_dict({
        "domain_name": "vm1", "domain_uuid": DOM_UUID, "migration_id": "m1", "created": 1,
        "devices": [{"idstr": "0000:00:05.0/vfio", "mdev_uuid": U5, "type": "nvidia-63",
                     "driver_version": VERSION, "parent_model": MODEL},
                    {"idstr": "0000:00:06.0/vfio", "mdev_uuid": U6, "type": "nvidia-64"}]})
    b = bindings_from_pending(record)
    assert (b["0000:00:05.0/vfio"].driver_version, b["0000:00:05.0/vfio"].parent_model) == (VERSION, MODEL)
    assert b["0000:00:06.0/vfio"].driver_version is None


def test_the_manifest_records_the_source_facts(tmp_path: Path) -> None:
    img = save_image(tmp_path / "g.save", remapped_xml())
    with Store.open(tmp_path / "store", create=True) as st:
        flt = token_filtered(st, img)
        assert flt.accepted
        by_idstr = {r.idstr: resolve_token(st, r.token, r.mdev_uuid or "") for r in flt.results}
        flt.close()
    m5, m6 = by_idstr["0000:00:05.0/vfio"], by_idstr["0000:00:06.0/vfio"]
    assert (m5.mdev_uuid, m5.mdev_type, m5.driver_version, m5.parent_model) == (U5, "nvidia-63", VERSION, MODEL)
    assert (m6.mdev_uuid, m6.mdev_type, m6.driver_version, m6.parent_model) == (U6, "nvidia-64", None, None)
