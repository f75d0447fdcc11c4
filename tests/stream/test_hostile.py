"""Corrupted, truncated and random input: StreamError (with an offset) or success, nothing else.

The invariant (STYLE §5): any bytes yield events or a StreamError; never IndexError,
struct.error, KeyError, UnicodeDecodeError, and never a hang.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from libvirt_mdev.errors import StreamError

from .builders import small_stream
from .test_reader import _stream_with, parse, reassembled, vfio_records

BASE = small_stream()
VFIO = _stream_with(*vfio_records(30, b"state" * 50))
ROOT = Path(__file__).resolve().parents[2]


def _check(data: bytes, chunks: list[int]) -> None:
    try:
        evs = parse(data, chunks)
    except StreamError as exc:
        assert exc.offset is not None and 0 <= exc.offset <= len(data)
        return
    assert reassembled(evs) == data  # whatever parses must round-trip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(base=st.sampled_from([BASE, VFIO]), flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4),
       chunk=st.integers(1, 4096))
def test_mutated_streams(base, flips, chunk):
    data = bytearray(base)
    for pos, val in flips:
        data[pos % len(data)] = val
    _check(bytes(data), [chunk] * (len(data) + 1))


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=600), prefix=st.sampled_from([b"", b"QEVM\x00\x00\x00\x03", BASE[:300]]))
def test_random_bytes(data, prefix):
    _check(prefix + data, [max(1, len(data) // 3)] * 10)


@settings(max_examples=200, deadline=None)
@given(cut=st.integers(0, len(VFIO) - 2), junk=st.binary(max_size=40))
def test_truncated_or_spliced(cut, junk):
    _check(VFIO[:cut] + junk, [64] * 1000)


def run_cli(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "libvirt_mdev.cli", *args], input=stdin,
                          capture_output=True, cwd=ROOT, timeout=60)


def test_cli_reports_one_line_and_exit_3(tmp_path):
    bad = tmp_path / "trunc.bin"
    bad.write_bytes(VFIO[: len(VFIO) // 2])
    r = run_cli("inspect", str(bad))
    assert r.returncode == 3
    err = r.stderr.decode().strip().splitlines()
    assert len(err) == 1 and err[0].startswith("libvirt-mdev: ") and "at byte" in err[0]
    assert b"Traceback" not in r.stderr
    r = run_cli("inspect", "--json", "-", stdin=b"garbage that is not a stream")
    assert r.returncode == 3 and b'"kind": "stream"' in r.stdout and b"magic" in r.stderr
