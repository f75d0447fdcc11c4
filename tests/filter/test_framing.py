"""The framing a manifest records is what the stream showed, never a default (issue 16)."""
from __future__ import annotations

import io
from pathlib import Path

import pytest

from libvirt_mdev.errors import UnsupportedStream
from libvirt_mdev.filter import FilterOptions, filter_stream
from libvirt_mdev.store import Store
from libvirt_mdev.stream.writer import encode_configuration
from tests.stream.test_reader import _stream_with, vfio_records

STATE = bytes(range(256)) * 8


def _stream(machine_type: str | None) -> bytes:
    """One VFIO device whose sections carry no v1/v2 evidence; *machine_type* (None: no
    CONFIGURATION record) is then all that can tell the framing."""
    data = _stream_with(*vfio_records(30, STATE))
    if machine_type is None:
        return data
    return data[:8] + encode_configuration(machine_type) + data[8:]


@pytest.mark.parametrize("machine_type", [None, "pc", "microvm"])
def test_undecided_framing_is_refused_and_nothing_is_loadable(tmp_path: Path, machine_type: str | None) -> None:
    out = io.BytesIO()
    with Store.open(tmp_path / "st", create=True) as st:
        with pytest.raises(UnsupportedStream, match=r"framing \(v1 or v2\) cannot be told"):
            filter_stream(io.BytesIO(_stream(machine_type)), out.write, st, FilterOptions(mode="splice"))
        assert not [e for e in st.list() if e.status in ("ready", "spent")]
    # refused before splice forwarded any byte of the device's state
    assert STATE[:64] not in out.getvalue()


@pytest.mark.parametrize("machine_type, framing", [("pc-i440fx-7.2", "v1"), ("pc-q35-8.2", "v2")])
def test_framing_told_by_the_machine_type_is_recorded(tmp_path: Path, machine_type: str, framing: str) -> None:
    with Store.open(tmp_path / "st", create=True) as st:
        results = filter_stream(io.BytesIO(_stream(machine_type)), io.BytesIO().write, st, FilterOptions(mode="token"))
        assert len(results) == 1
        manifests = [e.manifest for e in st.list() if e.manifest is not None]
        assert [m.vfio_framing for m in manifests] == [framing]
