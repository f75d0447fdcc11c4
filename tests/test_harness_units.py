"""Fast checks of the harness pieces that need no daemon: guest XML, RAM fill files, the logging hook."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from lxml import etree

from tests.harness import HarnessError, LibvirtHost, logging_hook, qemu_vm, versions
from tests.harness.guests import QEMU_NS, RAM_FILL_ADDR, GuestSpec, make_ram_file
from tests.harness.libvirt_host import in_chroot
from tests.harness.qemu_vm import QemuVM

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


def _refusing_socket(path: Path) -> socket.socket:
    """A UNIX socket file that exists but refuses connections: bound, not listening (QEMU's state between the two)."""
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    return sock


def _serve_qmp_later(sock: socket.socket, delay: float, done: threading.Event) -> threading.Thread:
    """After *delay*, listen on *sock* and answer one QMP client's greeting and capabilities negotiation."""

    def serve() -> None:
        time.sleep(delay)
        sock.listen(1)
        conn, _ = sock.accept()
        with conn:
            conn.sendall(b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 9}, "package": ""}, '
                         b'"capabilities": []}}\r\n')
            data = b""
            while b"qmp_capabilities" not in data:  # the client sends a JSON object with no newline after it
                chunk = conn.recv(4096)
                if not chunk:
                    return
                data += chunk
            assert json.loads(data)["execute"] == "qmp_capabilities"
            conn.sendall(b'{"return": {}}\r\n')
            done.wait(30)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread


def test_qmp_connect_waits_out_a_socket_that_refuses(tmp_path: Path) -> None:
    vm = QemuVM(tmp_path, name="fake", with_disk=False)
    sock = _refusing_socket(vm.qmp_path)
    done = threading.Event()
    server = _serve_qmp_later(sock, 0.5, done)
    vm.proc = subprocess.Popen(["sleep", "60"])  # stands in for QEMU: alive, stopped by vm.stop()
    try:
        started = time.monotonic()
        vm._connect()
        assert vm._qmp is not None and time.monotonic() - started >= 0.5
    finally:
        done.set()
        vm.stop()
        sock.close()
    server.join(10)
    assert vm.proc is None


def test_qmp_connect_gives_up_at_its_timeout_and_stops_qemu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qemu_vm, "QMP_TIMEOUT", 1.0)
    vm = QemuVM(tmp_path, name="fake", with_disk=False)
    sock = _refusing_socket(vm.qmp_path)
    vm.proc = subprocess.Popen(["sleep", "60"])
    pid = vm.proc.pid
    try:
        with pytest.raises(HarnessError, match=r"QMP .*fake\.qmp still refuses after 1s \(([2-9]|\d\d+) attempts\)"):
            vm._connect()
    finally:
        sock.close()
    assert vm.proc is None and not Path(f"/proc/{pid}").exists()


def test_qmp_connect_reports_qemu_that_exits(tmp_path: Path) -> None:
    vm = QemuVM(tmp_path, name="fake", with_disk=False)
    vm.stderr_log.write_text("qemu-system-x86_64: -device nope: 'nope' is not a valid device model name\n")
    vm.proc = subprocess.Popen(["sh", "-c", "exit 1"])
    with pytest.raises(HarnessError, match="exited with 1: .*not a valid device model"):
        vm._connect()
