"""Run in a fresh process: parse a stream whose vmdesc has a given JSON shape, print the
outcome and this process's peak RSS (VmHWM).  Used by test_bounds.py."""
from __future__ import annotations

import io
import json
import resource
import sys
import time

from libvirt_mdev.errors import StreamError
from libvirt_mdev.stream import iter_events
from libvirt_mdev.stream.wire import MAX_VMDESC_LEN
from libvirt_mdev.stream.writer import encode_eof, encode_file_header, encode_vmdesc


class _Lazy(io.RawIOBase):
    """The stream, made piece by piece as it is read (the child's own peak must be the parser's)."""

    def __init__(self, head: bytes, unit: bytes, count: int, tail: bytes) -> None:
        self._parts = iter([head] + [unit * 65536] * (count // 65536) + [unit * (count % 65536), tail])
        self._cur = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, view: memoryview) -> int:  # type: ignore[override]
        while not self._cur:
            nxt = next(self._parts, None)
            if nxt is None:
                return 0
            self._cur = memoryview(nxt)
        n = min(len(view), len(self._cur))
        view[:n] = self._cur[:n]
        self._cur = self._cur[n:]
        return n


def lazy_stream(shape: str, size: int) -> io.RawIOBase:
    pre = encode_file_header() + encode_eof()
    if shape == "deep":
        k = (size - 6) // 2
        return _Lazy(pre + encode_vmdesc(b"")[:1] + (6 + 2 * k).to_bytes(4, "big") + b'{"a":' + b"[" * k,
                     b"]", k, b"}")
    unit = {"empty-lists": b"[],", "zeros": b"0,", "objects": b"{},", "strings": b'"",',
            "pairs": b'[0],'}[shape]
    k = (size - 10) // len(unit)
    n = 6 + k * len(unit) + 3
    return _Lazy(pre + encode_vmdesc(b"")[:1] + n.to_bytes(4, "big") + b'{"a":[', unit, k, b"0]}")


def main() -> None:
    shape, size = sys.argv[1], min(int(sys.argv[2]), MAX_VMDESC_LEN)
    src = io.BufferedReader(lazy_stream(shape, size))
    t = time.monotonic()
    try:
        for _ev in iter_events(src):
            pass
        outcome = "accepted"
    except StreamError as exc:
        outcome = f"refused: {exc}"
    hwm = 0
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1]) * 1024
    print(json.dumps({"shape": shape, "size": size, "outcome": outcome, "seconds": round(time.monotonic() - t, 2),
                      "vmhwm": hwm, "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


if __name__ == "__main__":
    main()
