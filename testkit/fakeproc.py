"""A fake ``/proc`` with QEMU processes (``-uuid``) for the pending-record staleness rule.

:func:`libvirt_mdev.store.pending.qemu_start_times` reads ``<proc>/stat`` (``btime``),
``<proc>/<pid>/cmdline``, ``<proc>/uptime`` and field 22 (start time in clock ticks) of ``<proc>/<pid>/stat``.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

BTIME = 1_700_000_000


def make_fake_proc(root: Path, qemus: dict[str, float]) -> Path:
    """*qemus*: domain uuid → unix start time.  Returns the fake proc root."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "stat").write_text(f"cpu  1 2 3 4\nbtime {BTIME}\nprocesses 1\n")
    (root / "uptime").write_text(f"{time.time() - BTIME:.2f} 0.00\n")
    hz = os.sysconf("SC_CLK_TCK")
    for i, (uuid, started) in enumerate(qemus.items(), start=100):
        d = root / str(i)
        d.mkdir()
        (d / "cmdline").write_bytes(b"\0".join([b"/usr/bin/qemu-system-x86_64", b"-name", b"guest=x",
                                                 b"-uuid", uuid.encode(), b"-incoming", b"defer", b""]))
        ticks = int((started - BTIME) * hz)
        (d / "stat").write_text(f"{i} (qemu-system-x86) " + " ".join(["S"] + ["0"] * 18 + [str(ticks)] + ["0"] * 10))
    (root / "1").mkdir()
    (root / "1" / "cmdline").write_bytes(b"/sbin/init\0")
    return root


__all__ = ["make_fake_proc"]
