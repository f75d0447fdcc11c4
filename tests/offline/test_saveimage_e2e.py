"""Save images on a real libvirtd: strip + gc + sign on "A", verifying splice on "B", permit, `virsh restore`.

Measured first (libvirt 9.0, QEMU 7.2): when the ``restore begin`` hook runs, libvirtd
already holds the save image open (a read-only fd in /proc/<libvirtd>/fd); so the hook
here calls :func:`admit_restore` with its parent's pid, as hook.py will.

The guest has no VFIO device (no mdev hardware here), so QEMU could not load injected
VFIO state: the device-state half of the flow (tokens, signatures over device state,
tampering) runs on synthetic images in test_signed_images.py; this test shows the
real image survives the whole pipeline and that the hook admits exactly the verified file.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.harness import HookFile, LibvirtHost
from tests.harness.guests import migratable_guest
from tests.harness.migration import define_and_start

from .saveimg import REPO, cli, one_line
from .test_signed_images import host

pytestmark = pytest.mark.e2e

HOOK = """#!{python}
import os, re, sys
sys.path.insert(0, {repo!r})
xml = sys.stdin.read()
if sys.argv[2:4] == ["restore", "begin"]:
    from libvirt_mdev.errors import MdevError, one_line
    from libvirt_mdev.store.permit import admit_restore
    uuid = re.search(r"<uuid>([0-9a-f-]+)</uuid>", xml).group(1)
    try:
        admit_restore({run!r}, uuid, os.getppid(), require_signer=True)
    except MdevError as exc:
        print(one_line(exc), file=sys.stderr)
        sys.exit(1)
"""


def test_save_strip_gc_sign_splice_permit_restore(e2e_tools: None, tmp_path: Path) -> None:
    a, pub_a = host(tmp_path, "A", require=False)
    trusted = tmp_path / "trusted"
    trusted.mkdir(mode=0o755)
    (trusted / "A.pub").write_bytes(pub_a.read_bytes())
    b, _ = host(tmp_path, "B", [trusted / "A.pub"])
    run_b = tmp_path / "B" / "run"
    hook = HOOK.format(python=sys.executable, repo=str(REPO), run=str(run_b))
    lv = LibvirtHost(name="si", base_dir=tmp_path, hooks=[HookFile(name="20-admit", content=hook)])
    lv.start()
    spec = migratable_guest("si-guest")
    try:
        define_and_start(lv, spec, tmp_path)
        img = tmp_path / "vm.save"
        lv.virsh("save", spec.name, str(img))
        # A: strip, gc with retention 0 (the stripped image's state stays), sign
        stripped, signed, verified = tmp_path / "vm.stripped", tmp_path / "vm.signed", tmp_path / "vm.verified"
        assert cli("strip", str(img), str(stripped), config=a).returncode == 0
        gc = cli("store", "gc", "--retention", "0", "--json", config=a)
        assert gc.returncode == 0 and json.loads(gc.stdout)["removed_manifests"] == []
        r = cli("sign", str(stripped), str(signed), config=a)
        assert r.returncode == 0, r.stderr
        # B: unsigned refused; signed verified, permit written
        one_line(cli("splice", str(img), str(tmp_path / "x"), config=b), 11, "no signed statement")
        r = cli("splice", str(signed), str(verified), "--permit", config=b)
        assert r.returncode == 0, r.stderr
        assert verified.read_bytes() == img.read_bytes()
        # an unverified image: the hook refuses, virsh shows our line, the guest stays off
        r = lv.virsh("restore", str(img), check=False)
        assert r.returncode != 0 and "libvirt-mdev splice" in r.stderr, r.stderr
        assert lv.domstate(spec.name) == "shut off"
        # the verified one: admitted (permit spent), restored, running
        lv.virsh("restore", str(verified))
        assert lv.domstate(spec.name) == "running"
        lv.wait_guest_executes(spec.name)
        assert not os.listdir(run_b / "permits")
    finally:
        lv.virsh("destroy", spec.name, check=False)
        lv.stop()
