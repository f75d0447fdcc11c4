#!/usr/bin/env python3
"""Write examples/out/example.stream: a small QEMU-7.2-shaped migration stream carrying two
synthetic VFIO devices (mdev vGPUs at guest PCI 0000:00:05.0 and 0000:00:06.0), framed exactly
as QEMU frames VFIO device state.  No QEMU or mdev hardware needed.

    python3 examples/make_example_stream.py [OUT]
"""
from __future__ import annotations

import os
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from testkit.synth import SyntheticVfioDevice, inject, write_minimal_stream


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "out", "example.stream")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with tempfile.NamedTemporaryFile(suffix=".stream") as base:
        write_minimal_stream(base)
        base.flush()
        devices = [SyntheticVfioDevice(idstr="0000:00:05.0/vfio", precopy_size=65536, stopcopy_size=3 << 20,
                                       marker=b"EXAMPLE-VGPU-STATE-A", seed=1),
                   SyntheticVfioDevice(idstr="0000:00:06.0/vfio", stopcopy_size=1 << 20,
                                       marker=b"EXAMPLE-VGPU-STATE-B", seed=2)]
        with open(out, "wb") as fh:
            inject(base.name, fh, devices)
    print(f"wrote {out} ({os.path.getsize(out)} bytes, {len(devices)} VFIO devices)")


if __name__ == "__main__":
    main()
