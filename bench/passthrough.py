#!/usr/bin/env python3
"""Validating copy: parse a stream and write it unchanged (``-`` = stdin/stdout).

    python3 bench/passthrough.py IN OUT
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from libvirt_mdev.stream import passthrough


def main() -> None:
    src = sys.stdin.buffer if sys.argv[1] == "-" else open(sys.argv[1], "rb")
    dst = sys.stdout.buffer if sys.argv[2] == "-" else open(sys.argv[2], "wb")
    with src, dst:
        passthrough(src, dst)


if __name__ == "__main__":
    main()
