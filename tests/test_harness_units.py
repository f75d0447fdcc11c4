"""Fast checks of the harness pieces that need no daemon: guest XML, RAM fill files, the logging hook."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from lxml import etree

from tests.harness import HarnessError, LibvirtHost, logging_hook, versions
from tests.harness.guests import QEMU_NS, RAM_FILL_ADDR, GuestSpec, make_ram_file
from tests.harness.libvirt_host import in_chroot

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
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "passed" not in proc.stdout and " skipped" in proc.stdout
    assert "LIBVIRT_MDEV_NO_E2E=1" in proc.stdout


def test_version_strings_of_both_targets_parse() -> None:
    assert versions._version("QEMU emulator version 10.0.13 (Debian 1:10.0.13+ds-0+deb13u1)", "qemu") == (10, 0, 13)
    assert versions._version("QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u18)", "qemu") == (7, 2, 19)
    assert versions._version("libvirtd (libvirt) 11.3.0", "libvirtd") == (11, 3, 0)
    try:
        versions._version("no digits here", "libvirtd")
    except HarnessError as exc:
        assert "libvirtd" in str(exc)
    else:
        raise AssertionError("a version-less string parsed")


def test_hook_calls_keep_order_and_the_extra_argument_of_one_domain() -> None:
    log = ("lm-a prepare begin -\nlm-ab prepare begin -\nlm-a stopped end -\nlm-a release end destroyed\n"
           "lm-a release\n")
    assert versions.hook_calls(log, "lm-a") == [("prepare", "begin", "-"), ("stopped", "end", "-"),
                                                ("release", "end", "destroyed")]
    assert versions.hook_calls(log, "lm-b") == []


def test_chroot_is_told_from_mountinfo() -> None:
    host = "22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n30 22 0:5 / /dev rw - devtmpfs udev rw\n"
    bound_root = host + "90 80 254:0 /var/tmp/r /  rw,relatime - ext4 /dev/vda rw\n".replace("/  ", "/ ")
    plain_chroot = "31 22 0:5 / /dev rw - devtmpfs udev rw\n"  # "/" is outside the root: not listed at all
    assert not in_chroot(host)
    assert in_chroot(bound_root) and in_chroot(plain_chroot)
