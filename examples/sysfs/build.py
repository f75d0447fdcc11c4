#!/usr/bin/env python3
"""Build a fake sysfs tree from a JSON spec, laid out as the kernel does (symlinks and all).

    python3 examples/sysfs/build.py examples/sysfs/dest-host.json /tmp/fake-sys
    printf '[libvirt-mdev]\\nsysfs_root = /tmp/fake-sys\\n' > /tmp/mdev.conf

Spec: {"parents": {PARENT: {TYPE: {"name", "device_api", "available_instances",
"description"}}}, "devices": {UUID: [PARENT, TYPE]}}.  Then, e.g.:

    readlink -f /tmp/fake-sys/bus/mdev/devices/8f1e4a52-6c1e-4c1e-9a3b-5a0b7e3d0002/mdev_type
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout

from testkit.fakesysfs import make_fake_sysfs


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        print("usage: build.py SPEC.json ROOT", file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    devices = {u: (p, t) for u, (p, t) in spec.get("devices", {}).items()}
    env = make_fake_sysfs(argv[1], parents=spec["parents"], devices=devices)
    for uuid in sorted(devices):
        m = env.mdev(uuid)
        print(f"{m.uuid}  {m.type_id:<12} parent {m.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
