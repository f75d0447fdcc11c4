"""Fast checks of the harness pieces that need no daemon: guest XML, RAM fill files, the logging hook."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from lxml import etree

from tests.harness import HarnessError, LibvirtHost, logging_hook
from tests.harness.guests import QEMU_NS, RAM_FILL_ADDR, GuestSpec, make_ram_file

REPO = Path(__file__).resolve().parents[1]


def parse(spec: GuestSpec) -> etree._Element:
    return etree.fromstring(spec.to_xml())


def test_default_guest_is_the_tcg_guest_libvirt_runs_here() -> None:
    dom = parse(GuestSpec(name="g"))
    assert dom.get("type") == "qemu"
    assert dom.find("os/type").get("machine") == "pc"
    assert dom.find("os/boot").get("dev") == "network"
    assert dom.find("memory").text == "256" and dom.find("memory").get("unit") == "MiB"
    assert dom.find("devices/interface").get("type") == "user"
    assert dom.find("devices/interface/model").get("type") == "virtio"
    assert dom.find("devices/controller[@type='usb']").get("model") == "qemu-xhci"
    assert dom.find("devices/serial").get("type") == "pty"
    assert dom.find("devices/console/target").get("type") == "serial"
    assert dom.find("devices/memballoon").get("model") == "none"
    assert dom.find("devices/disk") is None and dom.find("metadata") is None


def test_optional_parts_are_rendered_where_libvirt_expects_them(tmp_path: Path) -> None:
    spec = GuestSpec(name="g", boot_network=False, net=None, usb_model="ich9-ehci1", disk=tmp_path / "d.raw",
                     disk_format="raw", metadata=['<m:x xmlns:m="urn:t">1</m:x>'],
                     extra_devices=["<hostdev mode='subsystem' type='mdev' model='vfio-pci'/>"])
    dom = parse(spec)
    assert dom.find("os/boot") is None and dom.find("devices/interface") is None
    assert dom.find("devices/controller[@type='usb']").get("model") == "ich9-ehci1"
    assert dom.find("devices/disk/driver").get("type") == "raw"
    assert dom.find("devices/disk/source").get("file") == str(tmp_path / "d.raw")
    assert dom.find("metadata/{urn:t}x").text == "1"
    assert dom.find("devices/hostdev").get("type") == "mdev"
    assert dom.find("uuid").text == spec.uuid


def test_ram_fill_loads_the_file_through_qemu_commandline(tmp_path: Path) -> None:
    dom = parse(GuestSpec(name="g", ram_fill=tmp_path / "fill.bin"))
    args = [a.get("value") for a in dom.findall(f"{{{QEMU_NS}}}commandline/{{{QEMU_NS}}}arg")]
    assert args == ["-device", f"loader,file={tmp_path / 'fill.bin'},addr={RAM_FILL_ADDR:#x},force-raw=on"]


def test_ram_file_is_sized_and_reproducible(tmp_path: Path) -> None:
    one, two, other = (make_ram_file(tmp_path / n, 2, seed=s) for n, s in (("a", 7), ("b", 7), ("c", 8)))
    assert one.stat().st_size == 2 << 20
    assert one.read_bytes() == two.read_bytes() != other.read_bytes()


def test_logging_hook_drains_stdin_logs_argv_and_prints_nothing(tmp_path: Path) -> None:
    log = tmp_path / "hooks.log"
    script = tmp_path / "hook"
    script.write_bytes(logging_hook(log=str(log)).data())
    script.chmod(0o755)
    proc = subprocess.run([str(script), "dom", "migrate", "begin", "-"], input="<domain/>" * 10000,
                          capture_output=True, text=True, check=True)
    assert proc.stdout == ""  # on `migrate begin` stdout would replace the domain XML
    assert log.read_text() == "dom migrate begin -\n"


def test_host_path_maps_namespace_paths_and_refuses_others(tmp_path: Path) -> None:
    host = LibvirtHost("h", tmp_path)
    assert host.host_path("/var/log/libvirt/hooks.log") == tmp_path / "h" / "log" / "hooks.log"
    assert host.host_path("/run/libvirt/mig/x.sock") == tmp_path / "h" / "run" / "mig" / "x.sock"
    assert host.uri == f"qemu+unix:///system?socket={tmp_path}/h/run/libvirt-sock"
    try:
        host.host_path("/etc/passwd")
    except HarnessError as exc:
        assert "/etc/passwd" in str(exc)
    else:
        raise AssertionError("host_path accepted a path outside the per-host directories")


def test_no_e2e_env_skips_e2e_tests_visibly() -> None:
    env = {**os.environ, "LIBVIRT_MDEV_NO_E2E": "1"}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rs",
                           "tests/e2e/test_harness.py"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "passed" not in proc.stdout and " skipped" in proc.stdout
    assert "LIBVIRT_MDEV_NO_E2E=1" in proc.stdout
