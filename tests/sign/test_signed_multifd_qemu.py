"""A real QEMU destination that gets a signed statement packet on a multifd side channel (a verifying proxy
bypassed): the incoming migration fails and the guest stays on the source (docs/signing-wire.md, "Device state on
multifd side channels").  QEMU >= 10.0 names the cause: no device is registered under the statement's idstr
("Unknown idstr libvirt-mdev/signed-statement ... for load state buffer").  Older QEMUs know no device-state
packets (skipped: QEMU 7.2 does not fail such a channel promptly, the test would only time out).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from libvirt_mdev.filter import Binding
from libvirt_mdev.live.signdevstate import SignPacketSink
from libvirt_mdev.sign.keys import generate_key
from libvirt_mdev.sign.layers import SignContext
from libvirt_mdev.sign.record import SIG_IDSTR
from testkit.multifd import device_packet, split_device_packet
from testkit.synth import vfio_state_packet
from tests.multifd.test_multifd_real import VM_UUID
from tests.proxy.conftest import ID_A, U1
from tests.proxy.test_multifd_devstate_replay import InjectingRelay

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
    from tests.harness.qemu_vm import HarnessError, QemuVM
    from tests.harness.util import free_port
    from tests.harness.versions import qemu_version

    if qemu_version() < (10, 0, 0):
        pytest.skip("device-state packets on side channels need QEMU >= 10.0 (the debian13 CI target)")
    mib = 64
    ram = tmp_path / "ram"
    ram.write_bytes(os.urandom(mib << 20))
    uuid = ["-uuid", VM_UUID]
    src = QemuVM(tmp_path, name="src", memory_mib=mib, with_disk=False, ram_file=ram, extra_args=uuid)
    dst = QemuVM(tmp_path, name="dst", memory_mib=mib, with_disk=False, incoming_defer=True, extra_args=uuid)
    with src, dst:
        for vm in (src, dst):
            vm.qmp("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
            vm.qmp("migrate-set-parameters", **{"multifd-channels": 2})
        port = free_port()
        dst.incoming(f"tcp:127.0.0.1:{port}")
        relay = InjectingRelay(port, statement_packet())   # straight to QEMU: no verifying proxy
        try:
            src.migrate(f"tcp:127.0.0.1:{relay.port}")
            with pytest.raises(HarnessError):
                src.wait_migration(timeout=120)
        finally:
            relay.close()
        assert relay.injected.is_set()
        src.wait_status("running", timeout=30)   # the guest stays on the source
    err = dst.stderr_log.read_text(errors="replace")
    assert f"Unknown idstr {SIG_IDSTR}" in err, err[-2000:]
