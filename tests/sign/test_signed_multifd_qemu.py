"""A real QEMU destination that gets a signed statement packet on a multifd side channel (a verifying proxy
bypassed): the migration never completes and the destination never runs; once the destination is gone (the job
aborted), the source's migration fails and the guest runs on the source (docs/signing-wire.md, "Device state on
multifd side channels").  QEMU 10.0's multifd receive thread refuses the packet (no device is registered under the
statement's idstr; QEMU's qemu_loadvm_load_state_buffer: "Unknown idstr ... for load state buffer"), and its
incoming migration then stalls, and so does the source's, whose monitor may stop answering while it cannot send
(measured on Debian 13's QEMU 10.0); without the packet the same migration completes in a few seconds.  QEMUs
without device-state packets are skipped (vfio-pci without x-migration-multifd-transfer).
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from libvirt_mdev.filter import Binding
from libvirt_mdev.live.signdevstate import SignPacketSink
from libvirt_mdev.sign.keys import generate_key
from libvirt_mdev.sign.layers import SignContext
from testkit.multifd import device_packet, split_device_packet
from testkit.synth import vfio_state_packet
from tests.harness.relay import SideChannelInjector
from tests.multifd.test_multifd_real import VM_UUID
from tests.proxy.conftest import ID_A, U1

if TYPE_CHECKING:
    from tests.harness.qemu_vm import QemuVM

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def statement_packet() -> bytes:
    """A statement packet as the signing proxy sends it (signed over a packet of device A), without its packet."""
    ctx = SignContext(key=generate_key("src"), source_host="src", domain_uuid=VM_UUID,
                      bindings={ID_A: Binding(U1, "nvidia-222")})
    packet = device_packet(ID_A, 0, vfio_state_packet(0, b"\x8fSTATE" * 100))
    ev, payload = split_device_packet(packet)
    s = SignPacketSink(ctx)
    s.begin(ev)
    s.data(memoryview(payload))
    return bytes(s.end()[0])


def test_a_statement_packet_fails_a_real_destination_qemu(tmp_path: Path) -> None:
    from tests.harness.qemu_vm import QemuVM
    from tests.harness.util import free_port

    mib = 64
    ram = tmp_path / "ram"
    ram.write_bytes(os.urandom(mib << 20))
    uuid = ["-uuid", VM_UUID]
    src = QemuVM(tmp_path, name="src", memory_mib=mib, with_disk=False, ram_file=ram, extra_args=uuid)
    dst = QemuVM(tmp_path, name="dst", memory_mib=mib, with_disk=False, incoming_defer=True, extra_args=uuid)
    with src, dst:
        if not multifd_device_state(dst):
            pytest.skip("this QEMU sends no device state on multifd channels (vfio-pci has no "
                        "x-migration-multifd-transfer; QEMU >= 10.0, the debian13 CI target)")
        for vm in (src, dst):
            vm.qmp("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
            vm.qmp("migrate-set-parameters", **{"multifd-channels": 2})
        port = free_port()
        dst.incoming(f"tcp:127.0.0.1:{port}")
        net = SideChannelInjector(port, statement_packet(), cut_both=True)   # straight to QEMU: no verifying proxy
        try:
            src.migrate(f"tcp:127.0.0.1:{net.port}")
            time.sleep(STALL)
            assert net.injected.is_set()
            assert not running(dst)             # the destination never runs the guest
            assert answer(src, "query-migrate").get("status") != "completed", \
                "the destination took the statement packet"
            dst.stop()                           # what aborting the job does to the destination
            src.wait_status("running", timeout=60)   # the guest runs on the source, as before the migration
            assert answer(src, "query-migrate").get("status") in ("failed", "cancelled")
        finally:
            net.close()


#: seconds after which the migration would have completed without the packet (it takes 2-6 s here)
STALL = 20.0


def answer(vm: QemuVM, command: str) -> dict[str, Any]:
    """A QMP reply, waiting for a monitor that is busy (QEMU's migration thread may hold its lock while it
    cannot send); {} when it never answers."""
    for _ in range(10):
        try:
            reply: dict[str, Any] = vm.qmp(command)
            return reply
        except Exception:  # QMP timing out: try again
            time.sleep(1)
    return {}


def multifd_device_state(vm: QemuVM) -> bool:
    """Does this QEMU know device-state packets?  (Its vfio-pci has the property that sends them.)"""
    props = vm.qmp("device-list-properties", typename="vfio-pci")
    return any(p.get("name") == "x-migration-multifd-transfer" for p in props)


def running(vm: QemuVM) -> bool:
    """Whether *vm* runs the guest (a monitor that does not answer: no)."""
    try:
        return vm.status() == "running"
    except Exception:  # QMP timing out or gone: not running
        return False
