"""A real QEMU multifd migration, captured channel by channel, read by the multifd codec.

Two QEMUs (the one on PATH: 7.2 on Debian 12, 10.0 on Debian 13) migrate with the
``multifd`` capability and 2 or 4 channels through a capturing relay on loopback.  Every side
channel must parse exactly (every byte covered, clean end at a packet boundary), carry the
source VM's uuid and a distinct channel id, and the destination must run afterwards.
"""
from __future__ import annotations

import socket
import threading
from pathlib import Path

import pytest

from libvirt_mdev.stream.events import NEED_DATA
from libvirt_mdev.stream.multifd import (
    ChannelEnd,
    ChannelInit,
    MultifdChannelParser,
    PacketData,
    RamPacket,
    is_multifd_channel,
)
from tests.harness.qemu_vm import QemuVM
from tests.harness.relay import pump
from tests.harness.util import free_port, random_file

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

VM_UUID = "5a0c6f3e-2b7d-4e61-8f0a-9c1d2e3f4a5b"
RAM_MIB = 64


class CapturingRelay:
    """Accepts every connection on a loopback port, relays it both ways to *target*, and keeps
    what the source sent on each connection (the test's stand-in for the proxy)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.captures: list[bytearray] = []
        self.threads: list[threading.Thread] = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            up = socket.create_connection(("127.0.0.1", self.target))
            buf = bytearray()
            self.captures.append(buf)
            for a, b, keep in ((conn, up, buf.extend), (up, conn, None)):
                t = threading.Thread(target=pump, args=(a, b, keep), daemon=True)
                t.start()
                self.threads.append(t)

    def close(self) -> None:
        self._stop = True
        for t in self.threads:
            t.join(timeout=30)
        self.sock.close()



def parse_channel(data: bytes) -> list[object]:
    p = MultifdChannelParser()
    events: list[object] = []
    for i in range(0, len(data), 1 << 20):
        p.feed(data[i:i + (1 << 20)])
        while (ev := p.next_event()) is not NEED_DATA:
            events.append((type(ev), ev.offset, len(ev.raw), ev))  # type: ignore[attr-defined]
    p.feed(b"")
    while (ev := p.next_event()) is not NEED_DATA:
        events.append((type(ev), ev.offset, len(ev.raw), ev))  # type: ignore[attr-defined]
    return events


def capture_multifd(tmp: Path, channels: int = 2, ram_mib: int = RAM_MIB) -> tuple[bytes, list[bytes]]:
    """A real multifd migration of a VM with random RAM (non-zero pages: multifd carries them), captured on
    loopback between two QEMUs run with ``-uuid VM_UUID``: (main channel, side channels)."""
    ram = random_file(tmp / "ram", ram_mib)
    caps = [{"capability": "multifd", "state": True}]
    src = QemuVM(tmp, name="src", memory_mib=ram_mib, with_disk=False, ram_file=ram, extra_args=["-uuid", VM_UUID])
    dst = QemuVM(tmp, name="dst", memory_mib=ram_mib, with_disk=False, incoming_defer=True,
                 extra_args=["-uuid", VM_UUID])
    with src, dst:
        for vm in (src, dst):
            vm.qmp("migrate-set-capabilities", capabilities=caps)
            vm.qmp("migrate-set-parameters", **{"multifd-channels": channels})
        port = free_port()
        dst.incoming(f"tcp:127.0.0.1:{port}")
        relay = CapturingRelay(port)
        try:
            src.migrate(f"tcp:127.0.0.1:{relay.port}")
            src.wait_migration(timeout=120)
            dst.wait_status("running", timeout=60)
        finally:
            relay.close()
    mains = [bytes(c) for c in relay.captures if bytes(c[:4]) == b"QEVM"]
    sides = [bytes(c) for c in relay.captures if is_multifd_channel(bytes(c[:4]))]
    assert len(mains) == 1 and len(sides) == channels, [bytes(c[:4]) for c in relay.captures]
    return mains[0], sides


@pytest.mark.parametrize("channels", [2, 4])
def test_real_multifd_channels_parse_exactly(tmp_path: Path, channels: int) -> None:
    main, sides = capture_multifd(tmp_path, channels)
    ids = set()
    payload = 0
    for data in sides:
        events = parse_channel(data)
        assert sum(n for _, _, n, _ in events) == len(data)          # every byte covered once
        offsets = [off for _, off, _, _ in events]
        assert offsets == sorted(offsets)
        init = events[0][3]
        assert isinstance(init, ChannelInit) and init.uuid == VM_UUID
        ids.add(init.channel_id)
        assert events[-1][0] is ChannelEnd
        payload += sum(n for kind, _, n, _ in events if kind is PacketData)
        pages = sum(ev.normal_pages for kind, _, _, ev in events if kind is RamPacket)
        assert sum(n for kind, _, n, _ in events if kind is PacketData) == pages * 4096
    assert ids == set(range(channels))
    # most of the random guest RAM travelled on the side channels, not the main one
    assert payload > (RAM_MIB << 20) // 2 and len(main) < payload
