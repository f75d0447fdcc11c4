"""The hook inside a real libvirtd 9.0: installed into the private host's qemu.d.

A plain guest's define/start/save/restore/destroy still work, and the hook's log shows
every call with its decision.  Then the refusal path: `virsh restore --xml` of that
save image with an mdev hostdev whose annotated type this host has differently (or
lacks).  libvirt runs the `restore begin` hook on the caller's XML before it looks
at the mdev or the ABI (docs/hook.md), so the refusal comes from us, virsh shows
our line, and the guest stays shut off.
"""
from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from libvirt_mdev.cli.hookcmd import HOOK_NAME, install
from libvirt_mdev.mdev.domain import AnnotatedMdev, Annotation, set_annotation
from testkit.fakesysfs import make_fake_sysfs
from tests.harness import HarnessError, HookFile, LibvirtHost
from tests.harness.guests import migratable_guest

pytestmark = pytest.mark.e2e

U2 = "8f1e4a52-6c1e-4c1e-9a3b-5a0b7e3d0002"   # this host: nvidia-224
U9 = "8f1e4a52-6c1e-4c1e-9a3b-5a0b7e3d0009"   # this host: absent
PARENT = "0000:3b:00.0"
LOG = "/var/log/libvirt/libvirt-mdev.log"
LINE_RE = re.compile(r"DEBUG|INFO|WARNING|ERROR")
CALL_RE = re.compile(r" (\w+) (begin|end|-) domain=(\S+): (.*)$")


@pytest.fixture(scope="module")
def hook_host(e2e_tools: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LibvirtHost]:
    base = tmp_path_factory.mktemp("mh")
    make_fake_sysfs(base / "sys", parents={PARENT: ["nvidia-222", "nvidia-224"]},
                    devices={U2: (PARENT, "nvidia-224")})
    hook, _ = install(base / "staging", Path("/etc/libvirt/libvirt-mdev.conf"))
    conf = (f"[libvirt-mdev]\nsysfs_root = {base / 'sys'}\nruntime_dir = /run/libvirt/libvirt-mdev\n"
            f"store = /var/lib/libvirt/mdev-state\nlog_file = {LOG}\nrequire_annotation = yes\n"
            f"log_level = debug\n")  # every call logged, no-ops included
    host = LibvirtHost(name="mhook", base_dir=base, hooks=[HookFile(name=HOOK_NAME, source=hook)],
                       extra_files={"/etc/libvirt/libvirt-mdev.conf": conf})
    host.start()
    try:
        yield host
    finally:
        host.stop()


class HookLog:
    """New hook-log entries since the last look: (op, sub, domain, decision)."""

    def __init__(self, host: LibvirtHost) -> None:
        self.path = host.host_path(LOG)
        self.seen = 0

    def new(self, domain: str) -> list[tuple[str, str, str]]:
        lines = self.path.read_text().splitlines() if self.path.exists() else []
        fresh, self.seen = lines[self.seen:], len(lines)
        out = []
        for line in fresh:
            m = CALL_RE.search(line)
            if m and m.group(3) == domain:
                out.append((m.group(1), m.group(2), m.group(4)))
        return out


def ops(entries: list[tuple[str, str, str]]) -> list[str]:
    """The calls, one per decision (per-mdev detail lines start with "mdev ")."""
    return [f"{op} {sub}" for op, sub, d in entries if not d.startswith("mdev ")]


def test_plain_guest_lifecycle_and_refused_restore(hook_host: LibvirtHost, tmp_path: Path) -> None:
    spec = migratable_guest("mh-plain")
    xml = tmp_path / "plain.xml"
    xml.write_text(spec.to_xml())
    log = HookLog(hook_host)
    image = tmp_path / "plain.save"

    hook_host.virsh("define", str(xml))
    try:
        hook_host.virsh("start", spec.name)
        got = log.new(spec.name)
        assert ops(got) == ["prepare begin", "start begin", "started begin"]
        assert all(d == "no-op" for _, _, d in got)  # started begin of a plain start: no record, no check

        hook_host.virsh("save", spec.name, str(image))
        got = log.new(spec.name)
        assert ops(got) == ["stopped end", "release end"]
        assert got[1][2].startswith("pending record absent")

        hook_host.virsh("restore", str(image))
        got = log.new(spec.name)
        assert ops(got) == ["restore begin", "prepare begin", "start begin", "started begin"]
        assert got[0][2] == "allowed: no mdev hostdevs"
        assert hook_host.domstate(spec.name) == "running"

        hook_host.virsh("destroy", spec.name)
        assert ops(log.new(spec.name)) == ["stopped end", "release end"]
        assert hook_host.domstate(spec.name) == "shut off"

        # --- the refusal path: the same image, restored with an XML that carries an mdev
        saved_xml = hook_host.virsh("save-image-dumpxml", str(image)).stdout
        hostdev = (f"<hostdev mode='subsystem' type='mdev' model='vfio-pci'><source><address uuid='{U2}'/>"
                   f"</source><address type='pci' domain='0x0000' bus='0x00' slot='0x0a' function='0x0'/></hostdev>")
        with_mdev = saved_xml.replace("</devices>", hostdev + "\n  </devices>", 1)
        for uuid, annotated, words, detail in [
            (U2, "nvidia-222", [f"mdev {U2}: source type nvidia-222 but this host has type nvidia-224"],
             "local_type=nvidia-224 verdict=type-mismatch"),
            (U9, "nvidia-222", [f"mdev {U9} (source type nvidia-222) does not exist on this host"],
             "local_type=None verdict=missing-on-dest"),
        ]:
            alt = set_annotation(with_mdev.replace(U2, uuid),
                                 Annotation({uuid: AnnotatedMdev(uuid, annotated, "0000:af:00.0")}, host="src"))
            alt_path = tmp_path / f"alt-{uuid[-4:]}.xml"
            alt_path.write_bytes(alt)
            r = hook_host.virsh("restore", str(image), "--xml", str(alt_path), check=False)
            assert r.returncode != 0
            print(r.stderr.strip())  # what the virsh user sees (shown with pytest -s)
            assert "libvirt-mdev: restore refused: domain mh-plain: " in r.stderr
            for w in words:
                assert w in r.stderr
            assert hook_host.domstate(spec.name) == "shut off"
            got = log.new(spec.name)
            assert ops(got) == ["restore begin"]  # refused before prepare/start: QEMU never ran
            assert got[0][2].startswith(f"mdev {uuid} idstr=0000:00:0a.0/vfio source_type=nvidia-222 {detail}")
            assert got[-1][2].startswith("REFUSED: ")

        # the image itself is untouched: a plain restore still works
        hook_host.virsh("restore", str(image))
        assert hook_host.domstate(spec.name) == "running"
        assert ops(log.new(spec.name))[0] == "restore begin"
        hook_host.virsh("destroy", spec.name)
    finally:
        try:
            if hook_host.domstate(spec.name) != "shut off":
                hook_host.virsh("destroy", spec.name, check=False)
        except HarnessError:
            pass
        hook_host.virsh("undefine", spec.name, check=False)
