"""Domain XML for small TCG guests that run on the libvirt and QEMU under test (docs/ci.md) without KVM or images.

The guest has no OS: SeaBIOS runs, finds nothing to boot and keeps retrying, which is enough for libvirt to
define, start, save, restore and migrate it, and for QEMU to emit every device's state. The devices the stream
codec must see (virtio-net, a USB controller, serial, a disk) are opt-in so a migration test can leave out the disk
(a non-shared disk makes `virsh migrate` refuse without --unsafe).
"""
from __future__ import annotations

import uuid as uuidlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lxml import etree

from ._proc import run

DEFAULT_MEMORY_MIB = 256
QEMU_NS = "http://libvirt.org/schemas/domain/qemu/1.0"
# Guest-physical address where ram_fill data is loaded: above SeaBIOS and its tables, which stay below 1 MiB
# apart from the top of RAM, so the guest does not overwrite the data while it idles.
RAM_FILL_ADDR = 16 << 20


@dataclass
class GuestSpec:
    """What to put in the guest. to_xml() renders it; every field has a default that works here.

    net: "user" gives `<interface type='user'>` (QEMU's built-in slirp, no host bridge or root network setup
    needed, so it also works inside a private network namespace); None leaves the guest without a NIC.
    usb_model: a libvirt USB controller model such as "qemu-xhci" or "ich9-ehci1"; None for no explicit one.
    disk: an image file (see make_disk) attached as virtio disk vda; disk_format must match the file.
    metadata: XML fragments (strings) placed inside `<metadata>`, each with its own namespace.
    extra_devices: XML fragments appended to `<devices>` verbatim (e.g. mdev hostdevs).
    ram_fill: a file QEMU's generic `loader` device copies into guest RAM at RAM_FILL_ADDR on start (through
    `<qemu:commandline>`, which taints the domain but changes nothing else), so save images and migration
    streams carry that many MiB of real, non-zero pages instead of zero-page flags. Must fit below memory_mib.
    """

    name: str
    memory_mib: int = DEFAULT_MEMORY_MIB
    vcpus: int = 1
    boot_network: bool = True
    net: str | None = "user"
    net_model: str = "virtio"
    usb_model: str | None = "qemu-xhci"
    disk: Path | None = None
    disk_format: str = "qcow2"
    serial: bool = True
    metadata: Sequence[str] = ()
    extra_devices: Sequence[str] = ()
    ram_fill: Path | None = None
    uuid: str = field(default_factory=lambda: str(uuidlib.uuid4()))

    def to_xml(self) -> str:
        dom = etree.Element("domain", type="qemu", nsmap={"qemu": QEMU_NS} if self.ram_fill else None)
        _text(dom, "name", self.name)
        _text(dom, "uuid", self.uuid)
        if self.metadata:
            meta = etree.SubElement(dom, "metadata")
            for fragment in self.metadata:
                meta.append(etree.fromstring(fragment))
        _text(dom, "memory", str(self.memory_mib), unit="MiB")
        _text(dom, "vcpu", str(self.vcpus))
        os_el = etree.SubElement(dom, "os")
        _text(os_el, "type", "hvm", arch="x86_64", machine="pc")
        if self.boot_network:
            etree.SubElement(os_el, "boot", dev="network")
        _text(dom, "on_poweroff", "destroy")
        _text(dom, "on_reboot", "restart")
        _text(dom, "on_crash", "destroy")
        self._devices(etree.SubElement(dom, "devices"))
        if self.ram_fill is not None:
            cmdline = etree.SubElement(dom, f"{{{QEMU_NS}}}commandline")
            for value in ("-device", f"loader,file={self.ram_fill},addr={RAM_FILL_ADDR:#x},force-raw=on"):
                etree.SubElement(cmdline, f"{{{QEMU_NS}}}arg", value=value)
        return etree.tostring(dom, pretty_print=True, encoding="unicode")

    def _devices(self, devices: etree._Element) -> None:
        _text(devices, "emulator", "/usr/bin/qemu-system-x86_64")
        if self.disk is not None:
            disk = etree.SubElement(devices, "disk", type="file", device="disk")
            etree.SubElement(disk, "driver", name="qemu", type=self.disk_format)
            etree.SubElement(disk, "source", file=str(self.disk))
            etree.SubElement(disk, "target", dev="vda", bus="virtio")
        if self.usb_model:
            etree.SubElement(devices, "controller", type="usb", index="0", model=self.usb_model)
        if self.net:
            iface = etree.SubElement(devices, "interface", type=self.net)
            etree.SubElement(iface, "model", type=self.net_model)
            # No iPXE ROMs are installed here (no ipxe-qemu package); without this libvirt/QEMU look for one.
            etree.SubElement(iface, "rom", enabled="no")
        if self.serial:
            serial = etree.SubElement(devices, "serial", type="pty")
            etree.SubElement(serial, "target", port="0")
            console = etree.SubElement(devices, "console", type="pty")
            etree.SubElement(console, "target", type="serial", port="0")
        etree.SubElement(devices, "memballoon", model="none")
        for fragment in self.extra_devices:
            devices.append(etree.fromstring(fragment))


def _text(parent: etree._Element, tag: str, text: str, **attrs: str) -> etree._Element:
    el = etree.SubElement(parent, tag, **attrs)
    el.text = text
    return el


def make_disk(path: Path, size: str = "64M", fmt: str = "qcow2") -> Path:
    """Create an empty disk image with qemu-img (the guest never writes it; it exists for its device state)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    run(["qemu-img", "create", "-q", "-f", fmt, str(path), size])
    return path


def make_ram_file(path: Path, mib: int, seed: int = 0) -> Path:
    """*mib* MiB of pseudo-random bytes (reproducible per seed) for ram_fill / QemuVM.ram_file.

    Random, not a pattern, so no layer (zero-page detection, compression) can shrink it: the stream grows by
    exactly that much RAM.
    """
    import random

    rng = random.Random(seed)
    path = Path(path)
    with path.open("wb") as fh:
        for _ in range(mib):
            fh.write(rng.randbytes(1 << 20))
    return path


def full_guest(name: str, workdir: Path, memory_mib: int = DEFAULT_MEMORY_MIB) -> GuestSpec:
    """The codec's reference guest: virtio-net, USB controller, serial, a qcow2 disk, ≥256 MiB."""
    return GuestSpec(name=name, memory_mib=memory_mib, disk=make_disk(Path(workdir) / f"{name}.qcow2"))


def migratable_guest(name: str, memory_mib: int = DEFAULT_MEMORY_MIB) -> GuestSpec:
    """A guest for `virsh migrate --live` between private hosts: same devices minus the non-shared disk."""
    return GuestSpec(name=name, memory_mib=memory_mib, disk=None)
