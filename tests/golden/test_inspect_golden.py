"""Golden output of ``libvirt-mdev inspect``: text, ``--all`` and ``--json``, on streams made here from seeds.

The inputs are built at test time, deterministically (testkit/synth.py: QEMU's framing, seeded made-up
contents), so only the expected outputs are committed (tests/golden/data/).  A change in the table's layout,
a JSON field or an error line shows up as a diff of a file; tests/golden/golden.py says how to rewrite them.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from testkit.synth import SyntheticVfioDevice, inject, write_minimal_stream

from .golden import DATA, check_golden, cli

#: libvirt's save-image header (docs/saveimages.md): magic, version, XML length, was_running, format,
#: cookie offset, unused; little-endian on the hosts we run on
_SAVE_HEADER = struct.Struct("<16sIIIII56s")
DOMAIN_XML = ("<domain type='kvm'><name>golden</name><uuid>6b1d3c2e-5f4a-4e3b-9c8d-7a6b5c4d3e2f</uuid>"
              "<devices/></domain>")


def _devices() -> list[SyntheticVfioDevice]:
    """Two devices, one per framing: v1 with precopy data, v2 with switchover-ack and multi-block state."""
    return [SyntheticVfioDevice(idstr="0000:00:05.0/vfio", precopy_size=40_000, stopcopy_size=70_001, seed=7),
            SyntheticVfioDevice(idstr="0000:00:06.0/vfio", precopy_size=5_000, stopcopy_size=2_100_000,
                                framing="v2", switchover_ack=True, seed=8)]


@pytest.fixture(scope="module")
def streams(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("golden-streams")
    plain = d / "plain.stream"
    with open(plain, "wb") as fh:
        write_minimal_stream(fh, ram_pages=64, seed=3)
    vfio = d / "vfio.stream"
    with open(vfio, "wb") as fh:
        inject(str(plain), fh, _devices())
    data = vfio.read_bytes()
    truncated = d / "truncated.stream"
    truncated.write_bytes(data[:len(data) // 2])
    trailing = d / "trailing.stream"
    trailing.write_bytes(data + b"\x00")
    xml = DOMAIN_XML.encode() + b"\0"
    xml += b"\0" * (-len(xml) % 8)
    image = d / "saved.img"
    image.write_bytes(_SAVE_HEADER.pack(b"LibvirtQemudSave", 2, len(xml), 1, 0, 0, bytes(56)) + xml + data)
    stripped = d / "stripped.stream"  # device state moved into a store, token records in its place
    r = cli("strip", str(vfio), str(stripped), "--store", str(d / "store"), "--migration-id", "golden", home=d)
    assert r.code == 0, r.stderr
    return {"plain": plain, "vfio": vfio, "truncated": truncated, "trailing": trailing, "saveimage": image,
            "stripped": stripped}


#: (golden file, stream, options, exit code)
CASES = [
    ("inspect-plain.txt", "plain", (), 0),
    ("inspect-plain.json", "plain", ("--json",), 0),
    ("inspect-vfio.txt", "vfio", (), 0),
    ("inspect-vfio-all.txt", "vfio", ("--all",), 0),
    ("inspect-vfio.json", "vfio", ("--json",), 0),
    ("inspect-saveimage.txt", "saveimage", (), 0),
    ("inspect-saveimage.json", "saveimage", ("--json",), 0),
    ("inspect-stripped.txt", "stripped", (), 0),
    ("inspect-stripped.json", "stripped", ("--json",), 0),
    ("inspect-truncated.json", "truncated", ("--json",), 3),
    ("inspect-trailing.json", "trailing", ("--json",), 3),
]
#: refusals: the one line on standard error is the interface
ERROR_CASES = [
    ("inspect-truncated.err", "truncated", 3),
    ("inspect-trailing.err", "trailing", 3),
]


@pytest.mark.parametrize("golden,stream,options,code", CASES, ids=[c[0] for c in CASES])
def test_inspect_output(streams: dict[str, Path], tmp_path: Path, golden: str, stream: str,
                        options: tuple[str, ...], code: int) -> None:
    r = cli("inspect", str(streams[stream]), *options, home=tmp_path)
    assert r.code == code, r.stderr
    if "--json" in options:
        json.loads(r.stdout)  # one JSON document, also on refusal
    check_golden(golden, r.stdout, streams[stream].parent)


@pytest.mark.parametrize("golden,stream,code", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_inspect_refusal_line(streams: dict[str, Path], tmp_path: Path, golden: str, stream: str, code: int) -> None:
    r = cli("inspect", str(streams[stream]), home=tmp_path)
    assert r.code == code and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("libvirt-mdev: ")
    check_golden(golden, r.stderr, streams[stream].parent)


def test_inputs_are_deterministic(streams: dict[str, Path], tmp_path: Path) -> None:
    """The goldens are only meaningful if the inputs are the same bytes on every run and machine."""
    again = tmp_path / "plain.stream"
    with open(again, "wb") as fh:
        write_minimal_stream(fh, ram_pages=64, seed=3)
    assert again.read_bytes() == streams["plain"].read_bytes()
    twice = tmp_path / "vfio.stream"
    with open(twice, "wb") as fh:
        inject(str(again), fh, _devices())
    assert twice.read_bytes() == streams["vfio"].read_bytes()


def test_every_golden_file_is_used() -> None:
    """A golden file no test reads is a stale promise: remove it with its case."""
    from .test_check_golden import CHECK_CASES
    used = {c[0] for c in CASES} | {c[0] for c in ERROR_CASES} | {c[0] for c in CHECK_CASES}
    assert {p.name for p in DATA.iterdir()} == used
