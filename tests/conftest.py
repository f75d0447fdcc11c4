"""Shared fixtures: real libvirtd/QEMU artefacts produced at test time (see tests/harness/).

Expensive fixtures are session-scoped and write into one session tmp dir. When libvirtd or QEMU is missing the
fixtures FAIL with a message saying what to install, so CI cannot go green by skipping; set LIBVIRT_MDEV_NO_E2E=1
to skip the e2e tests instead (a visible skip, for machines without virtualisation).
Files these fixtures return are shared by the whole session: copy them before modifying.
"""
from __future__ import annotations

import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import LibvirtHost, logging_hook
from tests.harness.caps_cache import set_default_caps_cache
from tests.harness.guests import GuestSpec, full_guest, make_ram_file
from tests.harness.qemu_vm import QemuVM
from tests.harness.twohosts import TwoHosts

NO_E2E_ENV = "LIBVIRT_MDEV_NO_E2E"
REQUIRED_TOOLS = ("libvirtd", "virtlogd", "virsh", "qemu-system-x86_64", "qemu-img", "unshare", "nsenter", "ip")
SAVE_GUEST_NAME = "lm-save"
FILLED_GUEST_NAME = "lm-save-filled"
RAM_FILL_MIB = 64

# Wall-clock seconds of harness steps, printed at the end of the run (pytest_terminal_summary).
TIMINGS: dict[str, float] = {}


def e2e_disabled() -> bool:
    return os.environ.get(NO_E2E_ENV) == "1"


def pytest_configure(config: pytest.Config) -> None:
    # timeout(1) in .ci/test and CI runners stop a run with SIGTERM, which would end Python without running the
    # fixtures' teardown or atexit: private libvirtds, QEMUs and network namespaces would outlive the run. As a
    # KeyboardInterrupt, pytest tears every fixture down and exits with "interrupted" (exit code 2).
    signal.signal(signal.SIGTERM, _interrupt_on_sigterm)


def _interrupt_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum} (SIGTERM): stopping the test run and tearing the harness down")


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
    """The session's scratch dir for hosts, images and streams (short path: UNIX sockets live under it).

    Also where every LibvirtHost of this run shares its QEMU capability cache: only the first host pays the probe.
    """
    path = tmp_path_factory.mktemp("lmh")
    set_default_caps_cache(path / "caps-cache")
    return path


@pytest.fixture(scope="session")
def libvirt_host(e2e_tools: None, harness_dir: Path) -> Iterator[LibvirtHost]:
    """One running private libvirt host with the logging hook `10-log` (log: host.log_dir / 'hooks.log')."""
    with LibvirtHost(name="host", base_dir=harness_dir / "hosts", hooks=[logging_hook()]) as host:
        record_timing("libvirt_host start", host.start_seconds)
        yield host


@pytest.fixture(scope="session")
def real_save_guest(libvirt_host: LibvirtHost, harness_dir: Path) -> GuestSpec:
    """The guest behind real_save_image: 256 MiB, virtio-net (user), qemu-xhci, serial, qcow2 disk."""
    return full_guest(SAVE_GUEST_NAME, harness_dir / "images")


def save_running_guest(host: LibvirtHost, spec: GuestSpec, path: Path, label: str) -> Path:
    """Define and start *spec* on *host*, let it run a moment, `virsh save` it to *path* (domain left shut off)."""
    xml = path.with_suffix(".xml")
    xml.write_text(spec.to_xml())
    started = time.monotonic()
    host.virsh("define", str(xml))
    host.virsh("start", spec.name)
    record_timing(f"define+start {label}", time.monotonic() - started)
    time.sleep(1.0)  # let SeaBIOS run so device state is not all reset values
    started = time.monotonic()
    host.virsh("save", spec.name, str(path))
    record_timing(f"virsh save {label}", time.monotonic() - started)
    return path


@pytest.fixture(scope="session")
def real_save_image(libvirt_host: LibvirtHost, real_save_guest: GuestSpec, harness_dir: Path) -> Path:
    """A `virsh save` image of the RUNNING real_save_guest, made through the private libvirtd.

    After this the domain is defined but shut off on libvirt_host; a test that `virsh restore`s the image must
    destroy the domain again when done.
    """
    return save_running_guest(libvirt_host, real_save_guest, harness_dir / "real.save", "save guest")


@pytest.fixture(scope="session")
def ram_fill_file(harness_dir: Path) -> Path:
    """RAM_FILL_MIB MiB of seeded random bytes that the *_filled fixtures load into guest RAM."""
    return make_ram_file(harness_dir / "ram-fill.bin", RAM_FILL_MIB, seed=1)


@pytest.fixture(scope="session")
def real_save_image_filled(libvirt_host: LibvirtHost, harness_dir: Path, ram_fill_file: Path) -> Path:
    """Like real_save_image (guest FILLED_GUEST_NAME), but ram_fill_file's bytes sit in guest RAM at
    guests.RAM_FILL_ADDR, so the image carries that many MiB of non-zero RAM pages."""
    spec = full_guest(FILLED_GUEST_NAME, harness_dir / "images")
    spec.ram_fill = ram_fill_file
    return save_running_guest(libvirt_host, spec, harness_dir / "real-filled.save", "filled guest")


def qmp_stream(workdir: Path, path: Path, ram_file: Path | None, label: str) -> Path:
    with QemuVM(workdir, name="qmp-src", memory_mib=256, ram_file=ram_file) as vm:
        time.sleep(0.5)
        started = time.monotonic()
        vm.migrate_to_file(path)
        record_timing(f"qmp migrate to file{label}", time.monotonic() - started)
    return path


@pytest.fixture(scope="session")
def real_qmp_stream(e2e_tools: None, harness_dir: Path) -> Path:
    """A raw QEMU migration stream (QMP `migrate` to `exec:cat > file`) of a running 256 MiB TCG VM with
    virtio-net (user), qemu-xhci, serial and a qcow2 virtio disk."""
    return qmp_stream(harness_dir / "qmp", harness_dir / "real.stream", None, "")


@pytest.fixture(scope="session")
def real_qmp_stream_filled(e2e_tools: None, harness_dir: Path) -> Path:
    """Like real_qmp_stream, but all 256 MiB of guest RAM are seeded random bytes (file-backed RAM), so the
    stream is ~257 MiB of real pages. The RAM file is harness_dir / 'qmp-ram.bin' (make_ram_file seed 2)."""
    ram = make_ram_file(harness_dir / "qmp-ram.bin", 256, seed=2)
    return qmp_stream(harness_dir / "qmp-filled", harness_dir / "real-filled.stream", ram, " (filled)")


@pytest.fixture(scope="session")
def two_hosts(e2e_tools: None, harness_dir: Path) -> Iterator[TwoHosts]:
    """Hosts A and B (`two_hosts.a`, `two_hosts.b`) in their own network namespaces, joined by a veth, both with
    the logging hook `10-log`. Started on first use only; for tests marked e2e and slow."""
    with TwoHosts(harness_dir / "two", hooks=[logging_hook()]) as hosts:
        record_timing("two_hosts start", hosts.start_seconds)
        yield hosts
