"""The README's first command runs examples/demo.sh: it must keep working and say the right things."""
from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_demo_runs_end_to_end():
    r = subprocess.run(["bash", "examples/demo.sh"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=300)
    out = r.stdout
    assert r.returncode == 0, out
    assert "(exit status 6: 6 = type mismatch" in out
    assert "result: allowed (match)" in out
    assert "stripped.stream:0" in out and "example.stream:2" in out
    assert "loaded 3211264 bytes of state" in out
    assert "source type nvidia-223 but this host has type nvidia-224; state must only be loaded into the same type" in out
    assert "restored.stream is byte-identical to example.stream" in out
