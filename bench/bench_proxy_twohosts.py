#!/usr/bin/env python3
"""`virsh migrate --live` between two private libvirt hosts: direct vs through the proxy.

The setup of tests/proxy/test_libvirt_migrate.py (TwoHosts in network namespaces, our
hook on B with ``arm_all``, the proxy inside B's namespaces), a 256 MiB TCG guest
migrated A→B and back to A each round.  Reports libvirt's completed-job ``Downtime``
and ``Time elapsed`` (``virsh domjobinfo --completed`` on the source) and virsh's wall
time, medians over the rounds.

    python3 bench/bench_proxy_twohosts.py [--rounds 5]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from libvirt_mdev.cli.hookcmd import HOOK_NAME, install  # noqa: E402
from tests.harness import HookFile  # noqa: E402
from tests.harness.caps_cache import set_default_caps_cache  # noqa: E402
from tests.harness.guests import migratable_guest  # noqa: E402
from tests.harness.twohosts import TwoHosts  # noqa: E402

CONF = "/etc/libvirt/libvirt-mdev.conf"
PORT = 49300
#: e.g. ["nice", "-n", "-10"] (--nice): does scheduling latency explain downtime outliers?
NICE: list[str] = []


def jobinfo(host, domain: str) -> dict[str, float]:
    out = host.virsh("domjobinfo", "--completed", domain).stdout
    vals = {}
    for key, name in (("Time elapsed", "elapsed_ms"), ("Total downtime", "downtime_ms")):
        m = re.search(rf"^{key}:\s+(\d+)\s+ms", out, re.M)
        if m:
            vals[name] = float(m.group(1))
    return vals


def migrate(hosts: TwoHosts, name: str, via_proxy: bool) -> dict[str, float]:
    a, b = hosts.a, hosts.b
    proxy = None
    if via_proxy:
        proxy = b.popen_in_ns([*NICE, sys.executable, "-m", "libvirt_mdev.cli", "--config", CONF, "proxy", "--once",
                               "--json-log", "--listen", f"{hosts.address('B')}:{PORT}",
                               "--forward", f"127.0.0.1:{PORT}"],
                              env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)
        assert proxy.stdout is not None
        json.loads(proxy.stdout.readline())
    started = time.monotonic()
    # direct: B's QEMU listens on B's address itself; proxied: on loopback, the proxy on B's address
    hosts.migrate(name, *(("--listen-address", "127.0.0.1") if via_proxy else ()), port=PORT)
    wall = (time.monotonic() - started) * 1000
    info = jobinfo(a, name)
    if proxy is not None:
        out, _ = proxy.communicate(timeout=60)
        assert json.loads(out.splitlines()[0])["ok"]
    # back to A directly (not measured)
    b.virsh("migrate", "--live", name, a.uri, "--migrateuri", f"tcp://{hosts.address('A')}:{PORT + 1}")
    return {"wall_ms": wall, **info}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--nice", type=int, help="run the proxy with this nice value")
    a = ap.parse_args()
    if a.nice is not None:
        NICE[:] = ["nice", "-n", str(a.nice)]
    base = Path(tempfile.mkdtemp(prefix="bpx"))
    set_default_caps_cache(base / "caps")
    hook, _ = install(base / "staging", Path(CONF))
    conf = (f"[libvirt-mdev]\nruntime_dir = /run/libvirt/libvirt-mdev\nstore = /var/lib/libvirt/mdev-state\n"
            f"log_file = /var/log/libvirt/libvirt-mdev.log\narm_all = yes\nsysfs_root = {base}/sys\n"
            "require_guard = no\n")  # measures the proxy's cost, not the guard (docs/guard.md)
    hosts = TwoHosts(base / "two", hooks_b=[HookFile(name=HOOK_NAME, source=hook)], extra_files_b={CONF: conf})
    hosts.start()
    spec = migratable_guest("bench-px")
    try:
        xml = base / "g.xml"
        xml.write_text(spec.to_xml())
        hosts.a.virsh("define", str(xml))
        hosts.a.virsh("start", spec.name)
        time.sleep(1)
        rows: dict[str, list[dict[str, float]]] = {"direct": [], "proxy": []}
        for i in range(a.rounds):
            for kind in ("direct", "proxy"):
                r = migrate(hosts, spec.name, kind == "proxy")
                rows[kind].append(r)
                print(f"round {i + 1} {kind:6s} " + " ".join(f"{k} {v:.0f}" for k, v in r.items()), file=sys.stderr)
        for kind, rs in rows.items():
            med = {k: statistics.median(r[k] for r in rs if k in r) for k in rs[0]}
            print(f"{kind:6s} median " + " ".join(f"{k} {v:.0f}" for k, v in med.items()))
    finally:
        hosts.stop()


if __name__ == "__main__":
    main()
