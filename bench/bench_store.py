"""Store write/verify throughput and peak memory (run as root: python3 bench/bench_store.py).

Writes one state of SIZE bytes in 1 MiB memoryview chunks through the streaming
writer (hash + write + fsync + rename + manifest), then re-hashes it (verify), and
compares with the raw cost of the same bytes: hashing alone, and write+fsync alone.
Each measurement runs in a fresh subprocess so its peak RSS is its own.
"""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CHUNK = 1 << 20


def _child(kind: str, root: str, size: int) -> dict[str, float]:
    import hashlib

    from libvirt_mdev.store import StateMeta, Store
    buf = memoryview(os.urandom(CHUNK))
    n = size // CHUNK
    t0 = time.perf_counter()
    out: dict[str, float] = {}
    if kind == "store":
        st = Store.open(root, create=True)
        meta = StateMeta(idstr="0000:00:05.0/vfio", instance_id=0, version_id=1,
                         vfio_framing="v1", migration_id=f"bench-{time.time_ns()}")
        with st.begin_state(meta) as w:
            for _ in range(n):
                w.write(buf)
            m = w.commit()
        out["write_s"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        os.posix_fadvise(os.open(Path(root) / m.state_name, os.O_RDONLY), 0, 0,
                         os.POSIX_FADV_DONTNEED)
        st.verify(m.id)
        out["verify_s"] = time.perf_counter() - t1
    elif kind == "hash":
        h = hashlib.sha256()
        for _ in range(n):
            h.update(buf)
        out["write_s"] = time.perf_counter() - t0
    elif kind == "raw":
        fd = os.open(Path(root) / "raw", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        for _ in range(n):
            os.write(fd, buf)
        os.fsync(fd)
        os.close(fd)
        out["write_s"] = time.perf_counter() - t0
        os.unlink(Path(root) / "raw")
    out["maxrss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def run(kind: str, root: str, size: int) -> dict[str, float]:
    p = subprocess.run([sys.executable, __file__, "--child", kind, root, str(size)],
                       capture_output=True, text=True, check=True)
    return json.loads(p.stdout)  # type: ignore[no-any-return]


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(_child(sys.argv[2], sys.argv[3], int(sys.argv[4]))))
        return
    sizes = [int(x) << 20 for x in (sys.argv[1:] or ["256", "1024", "2048"])]
    with tempfile.TemporaryDirectory(prefix="bench-store-", dir=os.environ.get("BENCH_DIR")) as d:
        root = os.path.join(d, "store")
        for size in sizes:
            mib = size >> 20
            for kind in ("hash", "raw", "store"):
                r = run(kind, root if kind == "store" else d, size)
                line = (f"{kind:5} {mib:5} MiB  {mib / r['write_s']:7.0f} MiB/s  "
                        f"peak RSS {r['maxrss_mib']:.0f} MiB")
                if "verify_s" in r:
                    line += f"  verify {mib / r['verify_s']:.0f} MiB/s"
                print(line, flush=True)
            subprocess.run([sys.executable, "-c",
                            f"import sys; sys.path.insert(0, {str(REPO)!r});"
                            f"from libvirt_mdev.store import Store; Store.open({root!r}).gc(0)"],
                           check=True)


if __name__ == "__main__":
    main()
