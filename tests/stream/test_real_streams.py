"""The codec on streams a real QEMU 7.2 wrote at test time (virsh save, QMP migrate).

Every section accounted for, pass-through byte-identical, and after injecting
synthetic VFIO devices the reader reports exactly those devices.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from libvirt_mdev.stream import (
    Eof,
    FileHeader,
    SaveImageHeader,
    SectionFooter,
    SectionHeader,
    StreamEnd,
    VMDescription,
    iter_events,
    passthrough,
)
from libvirt_mdev.summary import Summarizer
from testkit.synth import SyntheticVfioDevice, inject
from tests.harness.versions import machine_type

pytestmark = pytest.mark.e2e

DEVICES = ("virtio-net", "xhci", "virtio-blk", "serial")


def _check_accounting(path: Path) -> dict:
    """Walk all events: every byte covered exactly once, every section header closed by
    its footer, vmdesc names every FULL section the stream has."""
    pos = 0
    open_id = None
    fulls: set[tuple[str, int]] = set()
    kinds: list[type] = []
    desc = None
    with open(path, "rb") as fh:
        for ev in iter_events(fh, chunk=256 << 10):
            assert ev.offset == pos, f"gap or overlap at {pos}"
            pos = ev.end
            kinds.append(type(ev))
            if isinstance(ev, SectionHeader):
                assert open_id is None
                open_id = ev.section_id
                if ev.type.name == "SECTION_FULL":
                    fulls.add((ev.idstr, ev.instance_id))
            elif isinstance(ev, SectionFooter):
                assert ev.section_id == open_id
                open_id = None
            elif isinstance(ev, VMDescription):
                desc = json.loads(bytes(ev.json))
    assert pos == path.stat().st_size
    assert kinds[-1] is StreamEnd and Eof in kinds
    assert desc is not None
    described = {(d["name"], d["instance_id"]) for d in desc["devices"]}
    assert fulls == described, "vmdesc and the FULL sections disagree"
    return {"fulls": fulls, "kinds": kinds}


@pytest.mark.parametrize("which", ["real_qmp_stream", "real_save_image"])
def test_every_byte_and_section_accounted_for(which, request):
    path: Path = request.getfixturevalue(which)
    info = _check_accounting(path)
    names = " ".join(i for i, _ in info["fulls"])
    for dev in DEVICES:
        assert dev in names, f"{dev} section missing from a guest that has it"
    assert (SaveImageHeader in info["kinds"]) == (which == "real_save_image")
    assert FileHeader in info["kinds"]


@pytest.mark.parametrize("which", ["real_qmp_stream", "real_save_image"])
@pytest.mark.parametrize("chunk", [1 << 20, 4093])
def test_passthrough_is_byte_identical(which, chunk, request, tmp_path):
    path: Path = request.getfixturevalue(which)
    out = io.BytesIO()
    from libvirt_mdev.stream import StreamParser, StreamWriter
    parser = StreamParser()
    with StreamWriter(out) as w:
        for ev in iter_events(open(path, "rb"), parser, chunk=chunk):
            w.write(ev)
    assert out.getvalue() == path.read_bytes()


def test_save_image_names_its_domain(real_save_image, real_save_guest):
    s = Summarizer()
    for ev in iter_events(open(real_save_image, "rb")):
        s.add(ev)
    assert s.summary.kind == "save-image"
    assert s.summary.domain_name == real_save_guest.name
    assert s.summary.save_image_complete
    assert s.summary.ram_pages > 0 and s.summary.machine_type == machine_type("pc")


@pytest.mark.parametrize("which", ["real_qmp_stream", "real_save_image"])
def test_injected_devices_are_reported_exactly(which, request, tmp_path):
    path: Path = request.getfixturevalue(which)
    devs = [SyntheticVfioDevice(idstr="0000:00:05.0/vfio", precopy_size=300_000, stopcopy_size=5_000_000 + 17,
                                block_size=1 << 20, seed=3, marker=b"MARK-A"),
            SyntheticVfioDevice(idstr="0000:00:06.0/vfio", instance_id=0, stopcopy_size=1, framing="v2", seed=4),
            SyntheticVfioDevice(idstr="0000:00:02.0:00.0/vfio", stopcopy_size=0, seed=5)]
    out = tmp_path / "injected"
    with open(out, "wb") as fh:
        inject(str(path), fh, devs)
    _check_accounting(out)
    s = Summarizer()
    from libvirt_mdev.stream import StreamParser
    p = StreamParser()
    for ev in iter_events(open(out, "rb"), p):
        s.add(ev)
    got = {(d.idstr, d.instance_id): d.state_bytes for d in s.finish(p).vfio}
    assert got == {(d.idstr, d.instance_id): d.state_bytes for d in devs}
    # and removing them again (a validating copy of the original) is still the original
    assert passthrough(open(path, "rb"), io.BytesIO()).done
