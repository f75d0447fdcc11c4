"""I/O sizes shared by every reader and writer of streams, state files and sockets."""
from __future__ import annotations

#: bytes per read (files, pipes, sockets, the store's state files): big enough that
#: per-chunk work is noise, small enough for constant memory (docs/architecture.md, invariant 7)
CHUNK = 1 << 20
