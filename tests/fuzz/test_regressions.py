"""Every finding of the fuzz campaigns, replayed through its target (tests/fuzz/regressions/).

File names start with the target: ``stream-*`` inputs go to targets.run_stream (first
byte = chunking selector).  Findings so far:

* stream-guard-order-1/2 (atheris, stream target): a FULL body holding both a hidden VFIO
  PART and, later, a hidden VFIO section header was refused with a different record
  (and offset) when fed whole than when fed in pieces: BodyGuard checked all header
  candidates of what it held before any PART candidate.  It now reports the earliest.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from libvirt_mdev.errors import StreamError

from .targets import chunk_size, parse_checked, run_stream

REGRESSIONS = sorted((Path(__file__).parent / "regressions").iterdir())


@pytest.mark.parametrize("path", REGRESSIONS, ids=[p.name for p in REGRESSIONS])
def test_regression_input(path: Path):
    data = path.read_bytes()
    assert path.name.startswith("stream-")
    run_stream(data)


def test_guard_reports_the_earliest_hidden_record_whatever_the_cut():
    data = (Path(__file__).parent / "regressions" / "stream-guard-order-2").read_bytes()[1:]
    verdicts = set()
    for chunk in (0, 1, 7, 64, 4096):
        _evs, err = parse_checked(data, chunk)
        assert isinstance(err, StreamError) and "hidden inside the body" in str(err)
        verdicts.add((str(err), err.offset))
    assert len(verdicts) == 1, verdicts
    assert chunk_size(0) == 0
