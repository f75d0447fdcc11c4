"""Synthetic multifd side channels in QEMU's exact framing (for tests of the multifd codec).

Builds what QEMU's ``multifd_send_thread`` writes: the channel-init message, RAM
packets (header, fixed part, the offset array, page data) and QEMU 10's device-state
packets.  Layouts come from :mod:`libvirt_mdev.stream.multifd`, the one place that
knows them.
"""
from __future__ import annotations

import uuid as uuidlib
from collections.abc import Sequence

from libvirt_mdev.stream.events import NEED_DATA
from libvirt_mdev.stream.multifd import (
    DEFAULT_PAGE_SIZE,
    DEVICE_PACKET,
    INIT,
    MULTIFD_MAGIC,
    MULTIFD_PACKET_SIZE,
    MULTIFD_VERSION,
    PACKET_HEADER,
    RAM_PACKET,
    DeviceStatePacket,
    MultifdChannelParser,
    MultifdFlag,
    PacketData,
)


def channel_init(vm_uuid: str, channel_id: int, *, magic: int = MULTIFD_MAGIC,
                 version: int = MULTIFD_VERSION) -> bytes:
    return INIT.pack(magic, version, uuidlib.UUID(vm_uuid).bytes, channel_id, bytes(7), bytes(32))


def ram_packet(ramblock: str, offsets: Sequence[int], pages: Sequence[bytes], *, zero: Sequence[int] = (),
               packet_num: int = 0, flags: int = 0, page_size: int = DEFAULT_PAGE_SIZE,
               pages_alloc: int | None = None, next_size: int | None = None,
               magic: int = MULTIFD_MAGIC, version: int = MULTIFD_VERSION) -> bytes:
    """A RAM packet: ``pages`` are the normal pages' bytes (one per offset), ``zero`` the
    offsets of zero pages (listed, not sent)."""
    ppp = MULTIFD_PACKET_SIZE // page_size
    listed = list(offsets) + list(zero)
    assert len(listed) <= ppp and len(pages) == len(offsets)
    alloc = ppp if pages_alloc is None else pages_alloc
    data = b"".join(pages)
    size = len(data) if next_size is None else next_size
    fixed = RAM_PACKET.pack(alloc, len(offsets), size, packet_num, len(zero), bytes(4), bytes(24),
                            ramblock.encode("ascii"))
    offs = b"".join(o.to_bytes(8, "big") for o in listed) + bytes(8 * (ppp - len(listed)))
    return PACKET_HEADER.pack(magic, version, flags) + fixed + offs + data


def sync_packet(packet_num: int = 0, *, page_size: int = DEFAULT_PAGE_SIZE) -> bytes:
    return ram_packet("", [], [], packet_num=packet_num, flags=int(MultifdFlag.SYNC), page_size=page_size)


def device_packet(idstr: str | bytes, instance_id: int, data: bytes, *, flags: int = int(MultifdFlag.DEVICE_STATE),
                  size: int | None = None) -> bytes:
    raw = idstr.encode("ascii") if isinstance(idstr, str) else idstr
    body = DEVICE_PACKET.pack(raw, instance_id, len(data) if size is None else size)
    return PACKET_HEADER.pack(MULTIFD_MAGIC, MULTIFD_VERSION, flags) + body + data


def split_device_packet(packet: bytes) -> tuple[DeviceStatePacket, bytes]:
    """(header event, payload) of one whole device-state packet, read with the codec (what a
    proxy's ``DevicePacketSink`` is handed: ``begin(event)``, then the payload)."""
    parser = MultifdChannelParser()
    parser.feed(channel_init("00000000-0000-4000-8000-000000000000", 0) + packet)
    parser.feed(b"")
    head: DeviceStatePacket | None = None
    payload = bytearray()
    while (ev := parser.next_event()) is not NEED_DATA:
        if isinstance(ev, DeviceStatePacket):
            assert head is None, "more than one packet"
            head = ev
        elif isinstance(ev, PacketData):
            payload += ev.raw
    assert head is not None, "not a device-state packet"
    return head, bytes(payload)
