"""Small helpers the e2e tests share: a free loopback port, a file of random bytes."""
from __future__ import annotations

import os
import socket
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def random_file(path: Path, mib: int) -> Path:
    """*path* filled with *mib* MiB of random bytes (guest RAM whose pages all travel:
    QEMU skips zero pages); kept when it already has that size."""
    if not (path.exists() and path.stat().st_size == mib << 20):
        with open(path, "wb") as fh:
            for _ in range(mib):
                fh.write(os.urandom(1 << 20))
    return path
