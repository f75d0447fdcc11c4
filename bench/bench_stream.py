#!/usr/bin/env python3
"""Throughput and memory of the codec and the filter, each against `cat` doing the same I/O.

Not a test: numbers for the issue notes.

Like with like.  Every case names a baseline of the same shape, run in the same session and interleaved with it
(round by round), so machine noise hits both:

  ========================  =====================================  ====================================
  shape                     case                                   baseline
  ========================  =====================================  ====================================
  read a file               inspect FILE                           cat FILE > /dev/null
  pipe in                   cat FILE | inspect -                   cat FILE | cat > /dev/null
  file to file              passthrough/strip/splice FILE OUT      cat FILE > OUT
  pipe to pipe              cat FILE | passthrough - - | cat       cat FILE | cat | cat
  ========================  =====================================  ====================================

``ratio`` is baseline seconds / case seconds (1.0: as fast as cat).

Peak RSS of each process, not of the pipeline.  A figure taken from wait4()/RUSAGE_CHILDREN includes the
memory of whoever forked the process: Linux keeps the larger of the pre-exec image's high-water mark and the
new program's, so a `cat` started from this Python script reported ~28 MiB.  Here every process of a pipeline is
started by this script directly (no shell) and its own high-water mark, ``VmHWM`` in /proc/PID/status, is read
when it stops at its exit under ptrace (PTRACE_O_TRACEEXIT: its memory is still mapped then).  exec gives a
process a new address space, so VmHWM counts only the program that runs.  Where ptrace is not allowed VmHWM is
sampled every --sample-ms instead (a lower bound by what the process allocates in its last interval).

    python3 bench/bench_stream.py [--workdir DIR] [--size-gib 2] [--rounds 3] [--json OUT]
    python3 bench/bench_stream.py --size-gib 0.5 --rounds 5 --zero-records 5000000 --rss-gib 0.5
                                  # a modest run: about a minute on a shared 2-core machine (root, for QEMU)

Streams (made once, kept in --workdir):
  mixed-SIZE   real QEMU 7.2 header + device sections, SIZE GiB of RAM pages (clustered
               zero/non-zero runs), one VFIO device with --vfio-mib of state (v1 framing)
  zero-N       only zero pages (9-byte records: the per-record worst case)
  mixed-G      for --rss-gib: peak RSS of inspect and strip at two sizes (constant memory)
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
CLI = [PY, "-m", "libvirt_mdev.cli"]
CAT = ["cat"]


@dataclass
class Pipeline:
    """Processes joined by pipes: the first reads what its argv names (stdin is /dev/null), the last writes
    *stdout_file* (``None``: /dev/null).  *measured* is the index of the process whose memory the case is about."""

    stages: list[list[str]]
    stdout_file: Path | None = None
    measured: int = 0
    before: list[Path] = field(default_factory=list)  # directories removed before each run (a fresh store)


@dataclass
class Result:
    seconds: float
    peaks_kib: list[int | None]


def _vmhwm_kib(pid: int) -> int | None:
    """The process's own peak resident set (KiB), or None once it has exited."""
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None  # a zombie: its memory is gone


class _ExitStop:
    """ptrace(2): each process asks to be traced before it execs (PTRACE_TRACEME), stops right after the exec,
    and gets PTRACE_O_TRACEEXIT, so it stops once more when it exits, with its memory still mapped: its final
    VmHWM is read exactly, however short its life.  Needs ptrace permission (root, or a permissive Yama)."""

    TRACEME, SETOPTIONS, CONT = 0, 0x4200, 7
    O_TRACEEXIT, O_EXITKILL, EVENT_EXIT = 0x40, 0x100000, 6
    WALL = 0x40000000  # __WALL: wait for every kind of child, and report ptrace stops

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
        self._libc.ptrace.restype = ctypes.c_long
        self._armed: set[int] = set()

    def traceme(self) -> None:
        """In the child, before exec (a failure leaves it untraced; it is then sampled)."""
        self._libc.ptrace(self.TRACEME, 0, None, None)

    def stopped(self, pid: int, status: int) -> bool:
        """Handle a ptrace stop of *pid*; True when it is the exit stop (read VmHWM, then call resume)."""
        if pid not in self._armed and os.WSTOPSIG(status) == signal.SIGTRAP:  # the stop after exec
            self._armed.add(pid)
            self._libc.ptrace(self.SETOPTIONS, pid, None, ctypes.c_void_p(self.O_TRACEEXIT | self.O_EXITKILL))
            self.resume(pid, 0)
            return False
        if status >> 16 == self.EVENT_EXIT:
            return True
        self.resume(pid, os.WSTOPSIG(status))  # a signal stop: deliver the signal as it would have been
        return False

    def traced(self, pid: int) -> bool:
        return pid in self._armed

    def resume(self, pid: int, sig: int) -> None:
        self._libc.ptrace(self.CONT, pid, None, ctypes.c_void_p(sig))


def _start(p: Pipeline, out: IO[bytes] | int, err: IO[bytes], tracer: _ExitStop) -> list[subprocess.Popen[bytes]]:
    procs: list[subprocess.Popen[bytes]] = []
    prev: IO[bytes] | None = None
    for i, argv in enumerate(p.stages):
        last = i == len(p.stages) - 1
        proc = subprocess.Popen(argv, cwd=REPO, stdin=prev if prev is not None else subprocess.DEVNULL,
                                stdout=out if last else subprocess.PIPE, stderr=err,
                                preexec_fn=tracer.traceme)
        if prev is not None:
            prev.close()  # the next process holds its own copy
        prev = proc.stdout
        procs.append(proc)
    return procs


def _run_stages(p: Pipeline, out: IO[bytes] | int, sample_ms: float) -> tuple[float, list[int | None], list[str]]:
    """Start the processes and wait for all of them: (wall seconds, peak KiB of each or None, errors).

    Each peak is the process's VmHWM read at its ptrace exit stop; a process that could not be traced is
    sampled every *sample_ms* instead (a lower bound by what it allocates in its last interval), and is None
    when it ended before the first sample."""
    tracer = _ExitStop()
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        procs = _start(p, out, err, tracer)
        by_pid = {proc.pid: k for k, proc in enumerate(procs)}
        peaks: list[int | None] = [None] * len(procs)
        done = threading.Event()

        def note(k: int, v: int | None) -> None:
            if v is not None:
                peaks[k] = max(peaks[k] or 0, v)

        def sample() -> None:
            while not done.is_set():
                for pid, k in by_pid.items():
                    if not tracer.traced(pid) and procs[k].returncode is None:
                        note(k, _vmhwm_kib(pid))
                done.wait(sample_ms / 1000)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        left = len(procs)
        while left:
            pid, status = os.waitpid(-1, _ExitStop.WALL)
            if pid not in by_pid:
                continue
            if os.WIFSTOPPED(status):
                if tracer.stopped(pid, status):
                    note(by_pid[pid], _vmhwm_kib(pid))
                    tracer.resume(pid, 0)
                continue
            procs[by_pid[pid]].returncode = os.waitstatus_to_exitcode(status)  # reaped: Popen must not wait
            left -= 1
        wall = time.perf_counter() - t0
        done.set()
        sampler.join()
        err.seek(0)
        text = err.read().decode(errors="replace")
    errors = [f"{proc.args!r}: exit {proc.returncode}" for proc in procs if proc.returncode != 0]
    return wall, peaks, errors + ([text] if errors else [])


def run(p: Pipeline, sample_ms: float) -> Result:
    """Wall seconds of the whole pipeline and each process's sampled VmHWM."""
    for d in p.before:
        shutil.rmtree(d, ignore_errors=True)
    with contextlib.ExitStack() as stack:
        out: IO[bytes] | int = stack.enter_context(open(p.stdout_file, "wb")) if p.stdout_file else \
            subprocess.DEVNULL
        wall, peaks, errors = _run_stages(p, out, sample_ms)
    if errors:
        raise SystemExit("benchmark command failed:\n" + "\n".join(errors))
    return Result(wall, peaks)


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


def make(work: Path, name: str, args: list[str], template: Path) -> Path:
    out = work / f"{name}.stream"
    if not out.exists():
        subprocess.run([PY, "bench/make_stream.py", "--template", str(template), *args, str(out)], cwd=REPO,
                       check=True)
    return out


def baselines(f: Path, out: Path) -> dict[str, Pipeline]:
    s = str(f)
    return {
        "cat FILE": Pipeline([[*CAT, s]]),
        "cat FILE | cat": Pipeline([[*CAT, s], CAT], measured=1),
        "cat FILE > OUT": Pipeline([[*CAT, s]], stdout_file=out),
        "cat FILE | cat | cat": Pipeline([[*CAT, s], CAT, CAT], measured=1),
    }


def cases(f: Path, out: Path, store: Path) -> dict[str, tuple[Pipeline, str]]:
    """label -> (pipeline, its baseline)."""
    s, o, st = str(f), str(out), str(store)
    return {
        "inspect FILE": (Pipeline([[*CLI, "inspect", s]]), "cat FILE"),
        "cat FILE | inspect -": (Pipeline([[*CAT, s], [*CLI, "inspect", "-"]], measured=1), "cat FILE | cat"),
        "passthrough FILE OUT": (Pipeline([[PY, "bench/passthrough.py", s, o]]), "cat FILE > OUT"),
        "strip FILE OUT (fsync'd state)": (Pipeline([[*CLI, "strip", s, o, "--store", st]], before=[store]),
                                           "cat FILE > OUT"),
        "splice FILE OUT (store+verify)": (Pipeline([[*CLI, "splice", s, o, "--store", st]], before=[store]),
                                           "cat FILE > OUT"),
        "cat | passthrough - - | cat": (Pipeline([[*CAT, s], [PY, "bench/passthrough.py", "-", "-"], CAT],
                                                 measured=1), "cat FILE | cat | cat"),
        "cat | python relay | cat (reference)": (Pipeline([[*CAT, s], [PY, "-c", RELAY], CAT], measured=1),
                                                 "cat FILE | cat | cat"),
    }


def _mib(kib: int | None) -> float | None:
    """MiB with one decimal; None (printed as null) when the process could be neither traced nor sampled."""
    return None if kib is None else round(kib / 1024, 1)


def measure(label: str, case: Pipeline, base_label: str, base: Pipeline, size: int, rounds: int,
            sample_ms: float, base_times: dict[str, list[float]], base_peaks: dict[str, int]) -> dict[str, Any]:
    """Interleaved rounds of baseline and case: the case's median seconds, its ratio to its baseline's median."""
    walls: list[float] = []
    peak: int | None = None
    for _ in range(rounds):
        b = run(base, sample_ms)
        base_times.setdefault(base_label, []).append(b.seconds)
        if (bp := b.peaks_kib[base.measured]) is not None:
            base_peaks[base_label] = max(base_peaks.get(base_label, 0), bp)
        r = run(case, sample_ms)
        walls.append(r.seconds)
        if (cp := r.peaks_kib[case.measured]) is not None:
            peak = max(peak or 0, cp)
    med = statistics.median(walls)
    return {"seconds": round(med, 3), "MiB_per_s": round(size / med / 2**20, 1), "baseline": base_label,
            "ratio": round(statistics.median(base_times[base_label]) / med, 3),
            "peak_rss_MiB": _mib(peak)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "libvirt-mdev-bench")
    ap.add_argument("--size-gib", type=float, default=2.0, help="RAM data in the mixed stream")
    ap.add_argument("--vfio-mib", type=int, default=256, help="device state in the mixed stream")
    ap.add_argument("--zero-records", type=int, default=50_000_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rss-gib", type=float, nargs="*", default=[1.0, 4.0],
                    help="stream sizes for the peak-RSS runs of inspect and strip (none: skip)")
    ap.add_argument("--skip-rss", action="store_true", help="same as --rss-gib with no sizes")
    ap.add_argument("--sample-ms", type=float, default=5.0, help="VmHWM sampling interval")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    work = a.workdir
    work.mkdir(parents=True, exist_ok=True)
    tpl = make_template(work)
    mixed = make(work, f"mixed-{a.size_gib:g}g-{a.vfio_mib}m", ["--size-gib", str(a.size_gib), "--vfio-mib",
                                                                 str(a.vfio_mib)], tpl)
    zero = make(work, f"zero-{a.zero_records}", ["--zero-records", str(a.zero_records)], tpl)
    store, out = work / "store", work / "out.stream"
    size = mixed.stat().st_size
    res: dict[str, Any] = {}
    base_times: dict[str, list[float]] = {}
    base_peaks: dict[str, int] = {}
    bases = baselines(mixed, out)
    for label, (case, base_label) in cases(mixed, out, store).items():
        res[label] = measure(label, case, base_label, bases[base_label], size, a.rounds, a.sample_ms, base_times,
                             base_peaks)
    for label, times in base_times.items():
        med = statistics.median(times)
        res[f"{label} (baseline)"] = {"seconds": round(med, 3), "MiB_per_s": round(size / med / 2**20, 1),
                                      "peak_rss_MiB": _mib(base_peaks.get(label))}
    zbase = baselines(zero, out)["cat FILE"]
    zcase = Pipeline([[*CLI, "inspect", str(zero)]])
    zt: dict[str, list[float]] = {}
    z = measure("inspect zero-page FILE", zcase, "cat FILE", zbase, zero.stat().st_size, a.rounds, a.sample_ms,
                zt, {})
    z["records_per_s"] = round(a.zero_records / z["seconds"])
    res["inspect zero-page FILE"] = z
    for gib in ([] if a.skip_rss else a.rss_gib):
        f = make(work, f"mixed-{gib:g}g-{a.vfio_mib}m", ["--size-gib", str(gib), "--vfio-mib", str(a.vfio_mib)], tpl)
        for label, p in (("inspect", Pipeline([[*CLI, "inspect", str(f)]])),
                         ("strip", Pipeline([[*CLI, "strip", str(f), str(out), "--store", str(store)]],
                                            before=[store]))):
            r = run(p, a.sample_ms)
            res[f"peak RSS {label}, {gib:g} GiB of RAM data"] = {"peak_rss_MiB": _mib(r.peaks_kib[0])}
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
