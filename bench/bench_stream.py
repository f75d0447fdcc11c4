#!/usr/bin/env python3
"""Throughput and memory of the codec and the filter, against `cat FILE | cat > /dev/null`.

Not a test: numbers for the issue notes.  Every command runs as a subprocess, timed
by wall clock, with its peak RSS taken from wait4(); the `cat | cat` baseline runs
in the same session, interleaved, so machine noise hits both.

    python3 bench/bench_stream.py [--workdir DIR] [--size-gib 2] [--rounds 3] [--json OUT]

Streams (made once, kept in --workdir):
  mixed-2g   real QEMU 7.2 header + device sections, ~2 GiB of RAM pages (clustered
             zero/non-zero runs), one VFIO device with 256 MiB of state (v1 framing)
  zero       almost only zero pages (9-byte records: the per-record worst case)
  rss-1g, rss-4g  like mixed, for peak-RSS at two sizes
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
CLI = [PY, "-m", "libvirt_mdev.cli"]


def run(cmd: str, env: dict[str, str] | None = None) -> tuple[float, int]:
    """(wall seconds, peak RSS KiB of the biggest process in the pipeline)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(["bash", "-c", cmd], cwd=REPO, env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _pid, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"benchmark command failed: {cmd}\n{p.stderr.read().decode() if p.stderr else ''}")
    return wall, ru.ru_maxrss


def make_template(work: Path) -> Path:
    """A real QEMU 7.2 stream (QMP migrate of a small TCG guest)."""
    out = work / "template.stream"
    if out.exists():
        return out
    sys.path.insert(0, str(REPO))
    from tests.harness.qemu_vm import QemuVM  # the test harness drives QEMU through qemu.qmp
    with QemuVM(work / "qemu", name="bench-tpl", memory_mib=256) as vm:
        time.sleep(0.5)
        vm.migrate_to_file(out)
    return out


def make(work: Path, name: str, args: str, template: Path) -> Path:
    out = work / f"{name}.stream"
    if not out.exists():
        subprocess.run(f"{PY} bench/make_stream.py --template {template} {args} {out}", shell=True,
                       cwd=REPO, check=True)
    return out


def measure(label: str, cmd: str, size: int, rounds: int, base: list[float], results: dict) -> None:
    walls, rss = [], 0
    for _ in range(rounds):
        b, _ = run(base_cmd(results["_file"]))
        base.append(b)
        w, r = run(cmd)
        walls.append(w)
        rss = max(rss, r)
    med = statistics.median(walls)
    results[label] = {"seconds": round(med, 3), "MiB_per_s": round(size / med / 2**20, 1), "peak_rss_MiB": round(rss / 1024, 1)}


def base_cmd(path: str) -> str:
    return f"cat {path} | cat > /dev/null"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "libvirt-mdev-bench")
    ap.add_argument("--size-gib", type=float, default=2.0)
    ap.add_argument("--zero-records", type=int, default=50_000_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-rss", action="store_true", help="skip the 1 GiB / 4 GiB peak-RSS runs")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    work = a.workdir
    work.mkdir(parents=True, exist_ok=True)
    tpl = make_template(work)
    mixed = make(work, "mixed", f"--size-gib {a.size_gib} --vfio-mib 256", tpl)
    zero = make(work, "zero", f"--zero-records {a.zero_records}", tpl)
    store = work / "store"
    out = work / "out.stream"
    res: dict = {"_file": str(mixed)}
    size = mixed.stat().st_size
    base: list[float] = []
    q = shlex.quote
    m = q(str(mixed))
    cases = {
        "inspect": f"{' '.join(CLI)} inspect {m}",
        "passthrough file->file": f"{PY} bench/passthrough.py {m} {q(str(out))}",
        "passthrough pipe->pipe": f"cat {m} | {PY} bench/passthrough.py - - | cat > /dev/null",
        "plain python relay pipe->pipe (reference)": f"cat {m} | {PY} -c {q(RELAY)} | cat > /dev/null",
        "cat FILE > OUT (reference)": f"cat {m} > {q(str(out))}",
        "strip file->file (fsync'd state)": f"rm -rf {q(str(store))}; {' '.join(CLI)} strip {m} {q(str(out))} --store {q(str(store))}",
        "splice file->file (store+verify)": f"rm -rf {q(str(store))}; {' '.join(CLI)} splice {m} {q(str(out))} --store {q(str(store))}",
    }
    for label, cmd in cases.items():
        measure(label, cmd, size, a.rounds, base, res)
    cat_med = statistics.median(base)
    res["cat | cat"] = {"seconds": round(cat_med, 3), "MiB_per_s": round(size / cat_med / 2**20, 1)}
    for label in cases:
        res[label]["ratio_vs_cat|cat"] = round(cat_med / res[label]["seconds"], 3)
    # zero-page stream: records per second
    res["_file"] = str(zero)
    zbase: list[float] = []
    zres: dict = {"_file": str(zero)}
    measure("inspect zero-page stream", f"{' '.join(CLI)} inspect {q(str(zero))}", zero.stat().st_size, a.rounds, zbase, zres)
    zres["inspect zero-page stream"]["records_per_s"] = round(a.zero_records / zres["inspect zero-page stream"]["seconds"])
    res.update({k: v for k, v in zres.items() if not k.startswith("_")})
    if not a.skip_rss:
        for gib in (1, 4):
            f = make(work, f"rss-{gib}g", f"--size-gib {gib} --vfio-mib 256", tpl)
            for label, cmd in (("inspect", f"{' '.join(CLI)} inspect {q(str(f))}"),
                               ("strip", f"rm -rf {q(str(store))}; {' '.join(CLI)} strip {q(str(f))} {q(str(out))} --store {q(str(store))}")):
                _w, r = run(cmd)
                res[f"peak RSS {label} {gib} GiB stream"] = {"peak_rss_MiB": round(r / 1024, 1)}
    res.pop("_file", None)
    res["stream_bytes"] = size
    width = max(len(k) for k in res)
    for k, v in res.items():
        print(f"{k:{width}}  {v}")
    if a.json:
        a.json.write_text(json.dumps(res, indent=2))


RELAY = """
import os
buf = bytearray(1 << 20); mv = memoryview(buf)
while True:
    n = os.readv(0, [buf])
    if not n: break
    v = mv[:n]
    while v:
        v = v[os.write(1, v):]
"""

if __name__ == "__main__":
    main()
