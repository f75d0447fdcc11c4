#!/usr/bin/env python3
"""Live migration through the proxy vs directly: QEMU's total-time and downtime.

Two QEMU 7.2 TCG VMs on loopback, driven over QMP (tests/harness/qemu_vm.py).  Guest
RAM is backed by a private mapping of a random file, so every page is non-zero and
really travels (QEMU's zero-page detection would otherwise make RAM free).  The
source's ``max-bandwidth`` is raised to 10 GiB/s (the default cap hides any cost).
Rounds alternate direct / proxy, in ABBA order, so drift and order effects hit both alike.  The proxy runs as the real
CLI in its own process (``libvirt-mdev proxy --once``), as in production; its peak
RSS is read from ``/proc/<pid>/status`` (VmHWM) when it exits.

With ``--channels N`` (N > 1) both QEMUs use multifd with N channels (``virsh migrate
--parallel --parallel-connections N``), run with the armed domain's ``-uuid`` as libvirt
starts them, and the proxy serves the main channel and the N side channels.

    python3 bench/bench_proxy.py [--mib 1024] [--rounds 5] [--mode splice] [--channels 4] [--json]
                                 [--forward-unix] [--baseline /path/to/a/worktree/of/main]
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from libvirt_mdev.store.pending import write_pending  # noqa: E402
from tests.harness.qemu_vm import QemuVM  # noqa: E402

BANDWIDTH = 10 << 30
#: the armed domain's uuid: the QEMUs run with it (-uuid), as libvirt starts them
DOMAIN_UUID = str(uuid.uuid4())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_file(path: Path, mib: int) -> None:
    if path.exists() and path.stat().st_size == mib << 20:
        return
    with open(path, "wb") as fh:
        for _ in range(mib):
            fh.write(os.urandom(1 << 20))


def start_proxy(work: Path, forward: str, mode: str, repo: Path = REPO) -> tuple[subprocess.Popen, int]:
    conf = work / "proxy.conf"
    conf.write_text(f"[libvirt-mdev]\nstore = {work / 'store'}\nruntime_dir = {work / 'run'}\n"
                    f"sysfs_root = {work / 'sys'}\nlog_file = {work / 'proxy.log'}\n"
                    "require_guard = no\n")  # a loopback bench: no nftables guard in front of QEMU (docs/guard.md)
    write_pending(work / "run", {"domain_name": "bench", "domain_uuid": DOMAIN_UUID,
                                 "migration_id": f"bench-{time.monotonic_ns()}", "created": int(time.time()),
                                 "devices": []})
    proc = subprocess.Popen([sys.executable, "-m", "libvirt_mdev.cli", "--config", str(conf), "proxy",
                             "--listen", "127.0.0.1:0", "--forward", forward, "--mode", mode,
                             "--once", "--json-log"], cwd=repo, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    hello = json.loads(proc.stdout.readline())
    return proc, int(hello["listen"].rsplit(":", 1)[1])


def peak_rss_kib(pid: int) -> int:
    """VmHWM of a live process (read just before it exits)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def cpu_seconds(pid: int) -> float:
    """user+system CPU seconds of a live process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def host_cpu() -> tuple[int, int, int]:
    """(busy, steal, all) jiffies of the whole host since boot (``/proc/stat``): a round's
    share of steal says how much a neighbour on the hypervisor took, so a slow round can
    be told from a slow proxy."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    steal = fields[7] if len(fields) > 7 else 0
    total = sum(fields[:8])
    return total - idle - steal, steal, total


def one_round(work: Path, ram: Path, dst_ram: Path, mib: int, via_proxy: bool, mode: str, channels: int = 1,
              repo: Path = REPO, forward_unix: bool = False) -> dict:
    qport = free_port()
    args = ["-uuid", DOMAIN_UUID]
    with QemuVM(work, name="bsrc", memory_mib=mib, with_disk=False, ram_file=ram, extra_args=args) as src, \
            QemuVM(work, name="bdst", memory_mib=mib, with_disk=False, ram_file=dst_ram, ram_shared=True,
                   incoming_defer=True, extra_args=args) as dst:
        if channels > 1:
            for vm in (src, dst):
                vm.qmp("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
                vm.qmp("migrate-set-parameters", **{"multifd-channels": channels})
        # the UNIX-socket layout of the destination: QEMU listens on a socket file, the proxy forwards to it
        sock_path = work / f"dst-{qport}.sock"
        local = f"unix:{sock_path}" if via_proxy and forward_unix else f"tcp:127.0.0.1:{qport}"
        dst.incoming(local)
        proxy = None
        port = qport
        if via_proxy:
            proxy, port = start_proxy(work, local.removeprefix("tcp:"), mode, repo)
        time.sleep(0.3)
        cpu0 = cpu_seconds(proxy.pid) if proxy is not None else 0.0  # its start-up (imports) is not the migration's
        host0 = host_cpu()
        src.migrate(f"tcp:127.0.0.1:{port}", max_bandwidth=BANDWIDTH)
        rss = 0
        cpu = 0.0
        info: dict = {}
        while True:
            info = src.query_migrate()
            if proxy is not None and proxy.poll() is None:
                try:
                    rss = max(rss, peak_rss_kib(proxy.pid))
                    cpu = cpu_seconds(proxy.pid)
                except (FileNotFoundError, ProcessLookupError):
                    pass
            if info.get("status") in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.02)
        host1 = host_cpu()
        if info.get("status") != "completed":
            raise RuntimeError(f"migration {info.get('status')}: {info.get('error-desc')}")
        if not info.get("total-time"):  # seen once: a completed migration that reports 0 ms (and 0 downtime)
            raise RuntimeError(f"QEMU reported no total time for a completed migration: {info}")
        dst.wait_status("running", 120)
        out = {"total_ms": info["total-time"], "downtime_ms": info.get("downtime"),
               "mbps": info.get("ram", {}).get("mbps"), "proxy_rss_kib": rss or None,
               "proxy_cpu_s": round(cpu, 2) if proxy is not None else None,
               "proxy_cpu_mig_s": round(cpu - cpu0, 2) if proxy is not None else None,
               # of the host's CPU time (every core) while the migration ran
               "host_busy_pct": round(100 * (host1[0] - host0[0]) / max(1, host1[2] - host0[2])),
               "host_steal_pct": round(100 * (host1[1] - host0[1]) / max(1, host1[2] - host0[2]))}
        if proxy is not None:
            line = proxy.stdout.readline() if proxy.stdout else ""
            proxy.wait(60)
            session = json.loads(line) if line else {}
            if not session.get("ok"):
                raise RuntimeError(f"proxy session failed: {session}")
            out["bytes"] = session["bytes_in"]
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--mode", default="splice", choices=("splice", "token"))
    ap.add_argument("--channels", type=int, default=1, help="multifd channels (1: no multifd)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--forward-unix", action="store_true",
                    help="the destination QEMU listens on a UNIX socket and the proxy forwards to it (the "
                         "UNIX-socket layout; direct rounds stay TCP, as a source on another host must)")
    ap.add_argument("--baseline", type=Path, help="also run the proxy of this checkout (e.g. a worktree of main) "
                    "in every round, so two builds are compared under the same drift")
    ap.add_argument("--workdir", type=Path)
    ap.add_argument("--shm", default="/dev/shm", help="a tmpfs for the destination's RAM file (default /dev/shm)")
    a = ap.parse_args()
    work = a.workdir or Path(tempfile.mkdtemp(prefix="bench-proxy-"))
    work.mkdir(parents=True, exist_ok=True)
    ram = work / "ram.bin"
    random_file(ram, a.mib)
    # the destination's RAM: a tmpfs file written once and mapped shared, reused by every round.  Fresh
    # anonymous memory would be handed out by the kernel page by page as the migration fills it, and on
    # a VM host that takes freed memory back (free page reporting) each round would pay for that at
    # random: the noise would drown a 15 % difference
    dst_ram = Path(a.shm) / f"bench-proxy-dst-{a.mib}.ram"
    random_file(dst_ram, a.mib)
    kinds = ("direct", "proxy") + (("baseline",) if a.baseline else ())
    rows: dict[str, list[dict]] = {k: [] for k in kinds}
    for i in range(a.rounds):
        # ABBA order: whichever kind runs first in a round pays for what the round before
        # left behind (freed guest RAM the host takes back, a cold page cache), so the first
        # place alternates
        for kind in (kinds if i % 2 == 0 else kinds[::-1]):
            args = (work, ram, dst_ram, a.mib, kind != "direct", a.mode, a.channels,
                    a.baseline if kind == "baseline" else REPO, a.forward_unix)
            try:
                r = one_round(*args)
            except RuntimeError as exc:  # one retry, said aloud
                print(f"round {i + 1} {kind}: {exc}; once more", file=sys.stderr)
                r = one_round(*args)
            rows[kind].append(r)
            proxy = (f"  rss {r['proxy_rss_kib'] / 1024:.0f} MiB cpu {r['proxy_cpu_s']} s "
                     f"({r['proxy_cpu_mig_s']} s during the migration)"
                     if r.get('proxy_rss_kib') else "")
            print(f"round {i + 1} {kind:6s} total {r['total_ms']:6d} ms  downtime {r['downtime_ms']:4d} ms  "
                  f"{r['mbps'] or 0:8.0f} Mbit/s  host busy {r['host_busy_pct']:3d}% steal {r['host_steal_pct']:2d}%"
                  + proxy, file=sys.stderr)
    med = {k: {"total_ms": statistics.median(r["total_ms"] for r in v),
               "downtime_ms": statistics.median(r["downtime_ms"] for r in v)} for k, v in rows.items()}
    summary = {"mib": a.mib, "rounds": a.rounds, "mode": a.mode, "channels": a.channels,
               "forward": "unix" if a.forward_unix else "tcp", "median": med,
               "total_ratio": round(med["proxy"]["total_ms"] / med["direct"]["total_ms"], 3),
               "downtime_ratio": round(med["proxy"]["downtime_ms"] / max(1, med["direct"]["downtime_ms"]), 3),
               # each round's proxy run against the direct run next to it: other load on the host
               # drifts, and a pair sees about the same drift
               "paired_total_ratios": [round(p["total_ms"] / d["total_ms"], 3)
                                       for d, p in zip(rows["direct"], rows["proxy"], strict=True)],
               "proxy_peak_rss_mib": round(max(r["proxy_rss_kib"] or 0 for r in rows["proxy"]) / 1024, 1),
               "proxy_cpu_s_per_gib": round(statistics.median(r["proxy_cpu_mig_s"] for r in rows["proxy"])
                                            / (a.mib / 1024), 2),
               "rows": rows}
    if a.baseline:
        summary["baseline_total_ratio"] = round(med["baseline"]["total_ms"] / med["direct"]["total_ms"], 3)
        summary["baseline_downtime_ratio"] = round(med["baseline"]["downtime_ms"]
                                                   / max(1, med["direct"]["downtime_ms"]), 3)
        summary["baseline_cpu_s_per_gib"] = round(statistics.median(r["proxy_cpu_mig_s"] for r in rows["baseline"])
                                                  / (a.mib / 1024), 2)
    if a.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"direct: total {med['direct']['total_ms']} ms, downtime {med['direct']['downtime_ms']} ms (median)")
        print(f"proxy : total {med['proxy']['total_ms']} ms, downtime {med['proxy']['downtime_ms']} ms (median)")
        print(f"paired total ratios (proxy / direct of the same round): {summary['paired_total_ratios']}, "
              f"median {statistics.median(summary['paired_total_ratios'])}x")
        print(f"ratio total {summary['total_ratio']}x, downtime {summary['downtime_ratio']}x, "
              f"proxy peak RSS {summary['proxy_peak_rss_mib']} MiB, proxy CPU {summary['proxy_cpu_s_per_gib']} "
              f"s/GiB of guest RAM during the migration (median)")
        if a.baseline:
            print(f"baseline ({a.baseline}): total {med['baseline']['total_ms']} ms, downtime "
                  f"{med['baseline']['downtime_ms']} ms (median); ratio total {summary['baseline_total_ratio']}x, "
                  f"downtime {summary['baseline_downtime_ratio']}x, CPU {summary['baseline_cpu_s_per_gib']} s/GiB")


if __name__ == "__main__":
    main()
