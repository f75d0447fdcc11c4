"""Write a real QEMU stream with one injected synthetic VFIO device to stdout (for the
concurrency and kill tests: streams are generated into pipes, never stored on disk).

    python3 -m tests.faults.gen_stream REAL_STREAM SEED STATE_BYTES [SHA_OUT]

The device is at PCI slot 5 (idstr ``0000:00:05.0/vfio``), its state is
``SyntheticVfioDevice(seed=SEED)``; at the end SHA_OUT gets two words: the SHA-256 of
the device state and the SHA-256 of the whole stream written (both computed while
writing: no second pass).
"""
from __future__ import annotations

import hashlib
import sys
from typing import BinaryIO

from testkit.synth import SyntheticVfioDevice, inject

IDSTR = "0000:00:05.0/vfio"


class HashedDevice(SyntheticVfioDevice):
    """A synthetic device that hashes the state as it hands it out."""

    def reset(self) -> None:
        super().reset()
        self.hasher = hashlib.sha256()

    def take_state(self, n: int) -> bytes:
        data = super().take_state(n)
        self.hasher.update(data)
        return data


def device(seed: int, state_bytes: int) -> HashedDevice:
    marker = b"STATE-OF-STREAM-%d-" % seed
    return HashedDevice(idstr=IDSTR, precopy_size=min(state_bytes // 4, 8 << 20),
                        stopcopy_size=state_bytes - min(state_bytes // 4, 8 << 20), seed=seed, marker=marker)


class HashingWriter:
    """A binary file wrapper that hashes what goes through it."""

    def __init__(self, out: BinaryIO) -> None:
        self.out = out
        self.hasher = hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.hasher.update(data)
        return self.out.write(data)

    def flush(self) -> None:
        self.out.flush()


def main(argv: list[str]) -> int:
    src, seed, size = argv[0], int(argv[1]), int(argv[2])
    dev = device(seed, size)
    out = HashingWriter(sys.stdout.buffer)
    try:
        inject(src, out, [dev])  # type: ignore[arg-type]
        out.flush()
    except BrokenPipeError:
        return 1
    if len(argv) > 3:
        with open(argv[3], "w") as fh:
            fh.write(f"{dev.hasher.hexdigest()} {out.hasher.hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
