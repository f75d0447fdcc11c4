"""Shared fixtures: real libvirtd/QEMU artefacts produced at test time (see tests/harness/).

Expensive fixtures are session-scoped and write into one session tmp dir. When libvirtd or QEMU is missing the
fixtures FAIL with a message saying what to install, so CI cannot go green by skipping; set LIBVIRT_MDEV_NO_E2E=1
to skip the e2e tests instead (a visible skip, for machines without virtualisation).
Files these fixtures return are shared by the whole session: copy them before modifying.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Iterator

import pytest

from tests.harness import LibvirtHost, logging_hook
from tests.harness.guests import GuestSpec, full_guest
from tests.harness.qemu_vm import QemuVM

NO_E2E_ENV = "LIBVIRT_MDEV_NO_E2E"
REQUIRED_TOOLS = ("libvirtd", "virtlogd", "virsh", "qemu-system-x86_64", "qemu-img", "unshare", "nsenter", "ip")
SAVE_GUEST_NAME = "lm-save"

# Wall-clock seconds of harness steps, printed at the end of the run (pytest_terminal_summary).
TIMINGS: dict[str, float] = {}


def e2e_disabled() -> bool:
    return os.environ.get(NO_E2E_ENV) == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not e2e_disabled():
        return
    skip = pytest.mark.skip(reason=f"{NO_E2E_ENV}=1: end-to-end tests against real libvirtd/QEMU are disabled")
    for item in items:
        if "e2e" in item.keywords:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if TIMINGS:
        terminalreporter.section("harness timings (s)")
        for key, value in TIMINGS.items():
            terminalreporter.write_line(f"{key:32s} {value:8.2f}")


def record_timing(key: str, seconds: float) -> None:
    TIMINGS[key] = seconds


@pytest.fixture(scope="session")
def e2e_tools() -> None:
    """Fail (or, with LIBVIRT_MDEV_NO_E2E=1, skip) when this machine cannot run real libvirt/QEMU."""
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None
               and not Path("/usr/sbin", tool).exists()]
    problem = ""
    if missing:
        problem = f"missing {', '.join(missing)}: run .ci/setup (Debian: libvirt-daemon-system qemu-system-x86 ...)"
    elif os.geteuid() != 0:
        problem = "the libvirt/QEMU harness needs root (mount namespaces, private libvirtd)"
    if problem:
        if e2e_disabled():
            pytest.skip(f"{NO_E2E_ENV}=1 and {problem}")
        pytest.fail(f"cannot run end-to-end tests: {problem} (or set {NO_E2E_ENV}=1 to skip them)", pytrace=False)


@pytest.fixture(scope="session")
def harness_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's scratch dir for hosts, images and streams (short path: UNIX sockets live under it)."""
    return tmp_path_factory.mktemp("lmh")


@pytest.fixture(scope="session")
def libvirt_host(e2e_tools: None, harness_dir: Path) -> Iterator[LibvirtHost]:
    """One running private libvirt host with the logging hook `10-log` (log: host.log_dir / 'hooks.log')."""
    host = LibvirtHost(name="host", base_dir=harness_dir / "hosts", hooks=[logging_hook()])
    host.start()
    record_timing("libvirt_host start", host.start_seconds)
    try:
        yield host
    finally:
        host.stop()


@pytest.fixture(scope="session")
def real_save_guest(libvirt_host: LibvirtHost, harness_dir: Path) -> GuestSpec:
    """The guest behind real_save_image: 256 MiB, virtio-net (user), qemu-xhci, serial, qcow2 disk."""
    return full_guest(SAVE_GUEST_NAME, harness_dir / "images")


@pytest.fixture(scope="session")
def real_save_image(libvirt_host: LibvirtHost, real_save_guest: GuestSpec, harness_dir: Path) -> Path:
    """A `virsh save` image of the RUNNING real_save_guest, made through the private libvirtd.

    After this the domain is defined but shut off on libvirt_host; a test that `virsh restore`s the image must
    destroy the domain again when done.
    """
    xml = harness_dir / f"{real_save_guest.name}.xml"
    xml.write_text(real_save_guest.to_xml())
    started = time.monotonic()
    libvirt_host.virsh("define", str(xml))
    record_timing("define (first, incl. caps probe)", time.monotonic() - started)
    started = time.monotonic()
    libvirt_host.virsh("start", real_save_guest.name)
    record_timing("start guest", time.monotonic() - started)
    time.sleep(1.0)  # let SeaBIOS run so device state is not all reset values
    path = harness_dir / "real.save"
    started = time.monotonic()
    libvirt_host.virsh("save", real_save_guest.name, str(path))
    record_timing("virsh save", time.monotonic() - started)
    return path


@pytest.fixture(scope="session")
def real_qmp_stream(e2e_tools: None, harness_dir: Path) -> Path:
    """A raw QEMU 7.2 migration stream (QMP `migrate` to `exec:cat > file`) of a running 256 MiB TCG VM with
    virtio-net (user), qemu-xhci, serial and a qcow2 virtio disk."""
    workdir = harness_dir / "qmp"
    path = harness_dir / "real.stream"
    with QemuVM(workdir, name="qmp-src", memory_mib=256) as vm:
        time.sleep(0.5)
        started = time.monotonic()
        vm.migrate_to_file(path)
        record_timing("qmp migrate to file", time.monotonic() - started)
    return path
