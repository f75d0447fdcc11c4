"""Fake sysfs trees that look like the kernel's mdev layout, symlinks and all.

Used by the tests, the benches and ``examples/sysfs/build.py``; the library reads
whatever tree ``sysfs_root`` names (:mod:`libvirt_mdev.mdev.sysfs`) and never builds one.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from libvirt_mdev.errors import UsageError
from libvirt_mdev.mdev.sysfs import PathLike, SysfsEnv


@dataclass(frozen=True)
class FakeType:
    """A type offered by a fake parent (the files of ``mdev_supported_types/<type>/``)."""

    name: str | None = None
    device_api: str = "vfio-pci"
    available_instances: int = 4
    description: str | None = None


TypeSpec = FakeType | Mapping[str, object] | None


@dataclass(frozen=True)
class FakeParent:
    """The parent device's own files: PCI ids and its vendor driver (a kernel module with a version).

    ``version=None`` gives a driver whose module shows no ``version`` file.
    """

    driver: str = "nvidia"
    version: str | None = "550.54.14"
    vendor: str = "0x10de"
    device: str = "0x1eb8"


def _fake_type(spec: TypeSpec) -> FakeType:
    if spec is None:
        return FakeType()
    if isinstance(spec, FakeType):
        return spec
    return FakeType(**spec)  # type: ignore[arg-type]


def make_fake_sysfs(root: PathLike,
                    parents: Mapping[str, Mapping[str, TypeSpec] | Sequence[str]],
                    devices: Mapping[str, tuple[str, str]] | None = None,
                    parent_info: Mapping[str, FakeParent] | None = None) -> SysfsEnv:
    """Build a fake sysfs tree under *root* that looks like the kernel's, symlinks and all.

    *parents* maps a parent address (``0000:af:00.0``) to its types (type id → a
    :class:`FakeType`, a dict of its fields, or ``None``; a plain list of ids also
    works).  *devices* maps mdev uuid → ``(parent, type_id)``.  *parent_info* gives a
    parent its PCI ids and vendor driver (:class:`FakeParent`; parents not named have
    neither).  Links are relative, so the tree can be moved.  Layout::

        devices/pci0000:00/<parent>/mdev_supported_types/<type>/{name,device_api,
            available_instances,description,create,devices/<uuid> -> ../../../<uuid>}
        devices/pci0000:00/<parent>/<uuid>/{mdev_type -> ../mdev_supported_types/<type>, remove}
        class/mdev_bus/<parent> -> ../../devices/pci0000:00/<parent>
        bus/mdev/devices/<uuid> -> ../../../devices/pci0000:00/<parent>/<uuid>
        devices/pci0000:00/<parent>/{vendor,device,driver -> ../../../bus/pci/drivers/<driver>}
        bus/pci/drivers/<driver>/module -> ../../../../module/<driver>
        module/<driver>/version

    Returns the :class:`SysfsEnv` for *root*.  Raises :class:`UsageError` for a device
    whose parent or type is not declared.
    """
    rootp = Path(root)
    pci = rootp / "devices" / "pci0000:00"
    (rootp / "class" / "mdev_bus").mkdir(parents=True, exist_ok=True)
    (rootp / "bus" / "mdev" / "devices").mkdir(parents=True, exist_ok=True)
    declared: dict[str, set[str]] = {}
    for parent, types in parents.items():
        pdir = pci / parent
        pdir.mkdir(parents=True, exist_ok=True)
        _symlink(f"../../devices/pci0000:00/{parent}", rootp / "class" / "mdev_bus" / parent)
        type_map = dict.fromkeys(types) if not isinstance(types, Mapping) else types
        declared[parent] = set(type_map)
        for type_id, spec in type_map.items():
            ft = _fake_type(spec)
            tdir = pdir / "mdev_supported_types" / type_id
            (tdir / "devices").mkdir(parents=True, exist_ok=True)
            (tdir / "device_api").write_text(ft.device_api + "\n")
            (tdir / "available_instances").write_text(f"{ft.available_instances}\n")
            (tdir / "create").write_text("")
            if ft.name is not None:
                (tdir / "name").write_text(ft.name + "\n")
            if ft.description is not None:
                (tdir / "description").write_text(ft.description + "\n")
    for parent, info in (parent_info or {}).items():
        if parent not in declared:
            raise UsageError(f"fake parent info for {parent}, which is not a declared parent")
        _fake_parent(rootp, pci / parent, info)
    for uuid, (parent, type_id) in (devices or {}).items():
        if type_id not in declared.get(parent, ()):
            raise UsageError(f"fake mdev {uuid}: parent {parent} has no type {type_id}")
        ddir = pci / parent / uuid
        ddir.mkdir(exist_ok=True)
        (ddir / "remove").write_text("")
        _symlink(f"../mdev_supported_types/{type_id}", ddir / "mdev_type")
        _symlink(f"../../../{uuid}", pci / parent / "mdev_supported_types" / type_id / "devices" / uuid)
        _symlink(f"../../../devices/pci0000:00/{parent}/{uuid}", rootp / "bus" / "mdev" / "devices" / uuid)
    return SysfsEnv(rootp)


def _fake_parent(rootp: Path, pdir: Path, info: FakeParent) -> None:
    (pdir / "vendor").write_text(info.vendor + "\n")
    (pdir / "device").write_text(info.device + "\n")
    ddir = rootp / "bus" / "pci" / "drivers" / info.driver
    ddir.mkdir(parents=True, exist_ok=True)
    mdir = rootp / "module" / info.driver
    mdir.mkdir(parents=True, exist_ok=True)
    if info.version is not None:
        (mdir / "version").write_text(info.version + "\n")
    elif (mdir / "version").exists():
        (mdir / "version").unlink()
    _symlink(f"../../../../module/{info.driver}", ddir / "module")
    _symlink(f"../../../bus/pci/drivers/{info.driver}", pdir / "driver")


def _symlink(target: str, link: Path) -> None:
    if os.path.lexists(link):
        link.unlink()
    link.symlink_to(target)
