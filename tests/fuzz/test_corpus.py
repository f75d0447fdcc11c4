"""The corpus builder on a real QEMU stream, and (when atheris is installed) a short
run of each atheris harness over it, so the long-run tooling cannot rot unnoticed."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .make_corpus import build
from .targets import parse_checked

REPO = Path(__file__).resolve().parents[2]
TARGETS = ("stream", "saveimage", "filter", "token", "domain")


@pytest.fixture(scope="module")
def corpus(real_qmp_stream: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    counts = build(out, real_qmp_stream)
    assert set(counts) == set(TARGETS) and all(counts.values())
    return out


@pytest.mark.e2e
def test_seeds_are_real_framing_cut_small(corpus: Path, real_qmp_stream: Path):
    seeds = {p.name: p.read_bytes() for p in (corpus / "stream").iterdir()}
    for name, data in seeds.items():
        _evs, err = parse_checked(data[1:])
        # whole (cut-down) streams parse; only the prefixes are truncated on purpose
        assert (err is None) == (not name.startswith("prefix-")), (name, err)
    assert len(seeds["vfio-only-c0"]) < 1024 and len(seeds["micro-vfio2-c0"]) < 4096
    real = real_qmp_stream.read_bytes()
    assert seeds["prefix-4096-c0"][1:] == real[:4096]


@pytest.mark.e2e
@pytest.mark.parametrize("target", TARGETS)
def test_atheris_harness_runs(corpus: Path, tmp_path: Path, target: str):
    pytest.importorskip("atheris")
    (tmp_path / "work").mkdir()
    r = subprocess.run([sys.executable, "-m", f"tests.fuzz.atheris_{target}", str(tmp_path / "work"),
                        str(corpus / target), "-runs=200", "-max_len=2048", f"-artifact_prefix={tmp_path}/"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "Done 200 runs" in r.stderr
