"""Which mdevs exist on *this* host, and of which type: read from sysfs.

The hook runs inside libvirtd's call and must not use the libvirt API, so it reads
the kernel's view directly (LIBVIRT.md §5, mdevctl's ``load_from_sysfs``):

* ``<root>/bus/mdev/devices/<uuid>`` links to the device dir under its parent;
* the type id is the basename of the *fully resolved* ``mdev_type`` link (libvirt and
  mdevctl both canonicalize, so a relative or chained link gives the same answer);
* the parent is the basename of the canonical device dir's parent;
* ``mdev_type/device_api`` is the model (``vfio-pci``).

Vocabulary as mdevctl's: an mdev is *active* when its sysfs node exists; we never
look at *defined* (persisted) mdevs — only active ones can receive state.

The sysfs root is configurable (config ``sysfs_root``) so tests and ``examples/`` use
a fake tree built by :func:`make_fake_sysfs`.  No lxml, no libvirt: the hook imports
this.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

from ..errors import MdevError, MdevMissing, UsageError
from .names import is_name, is_uuid

PathLike = Union[str, "os.PathLike[str]"]


@dataclass(frozen=True)
class SysfsMdev:
    """An active mdev as the kernel shows it."""

    uuid: str
    type_id: str
    parent: str
    device_api: Optional[str]
    #: the type's human name (``GRID T4-1B``), optional in sysfs
    type_name: Optional[str] = None


@dataclass(frozen=True)
class MdevTypeInfo:
    """One entry of a parent's ``mdev_supported_types``."""

    type_id: str
    device_api: str
    available_instances: int
    name: Optional[str] = None
    description: Optional[str] = None


class SysfsEnv:
    """A sysfs tree rooted at *root* (``/sys`` on a real host), mdevctl's ``Environment``."""

    def __init__(self, root: PathLike = "/sys") -> None:
        self.root = Path(root)

    def mdev_base(self) -> Path:
        return self.root / "bus" / "mdev" / "devices"

    def parent_base(self) -> Path:
        return self.root / "class" / "mdev_bus"

    def mdev(self, uuid: str) -> SysfsMdev:
        """The active mdev *uuid*.

        Raises:
            UsageError: *uuid* is not a canonical UUID (it would be a path component).
            MdevMissing: no such active mdev under this root.
            MdevError: the node exists but its type cannot be read (unreadable or
                broken ``mdev_type``): refuse rather than guess.
        """
        uuid = uuid.lower()
        if not is_uuid(uuid):
            raise UsageError(f"{uuid!r} is not an mdev uuid")
        node = self.mdev_base() / uuid
        if not os.path.lexists(node):
            raise MdevMissing(f"mdev {uuid} does not exist on this host "
                              f"(no {node}); create it with mdevctl first", mdev=uuid)
        try:
            dev_dir = Path(os.path.realpath(node, strict=True))
            type_dir = Path(os.path.realpath(dev_dir / "mdev_type", strict=True))
            device_api = _read_optional(type_dir / "device_api")
            type_name = _read_optional(type_dir / "name")
        except (OSError, RuntimeError) as exc:  # RuntimeError: symlink loop
            raise MdevError(f"cannot read the type of mdev {uuid} under {self.root}: "
                            f"{_why(exc)}; check that {self.root} is a sysfs tree", mdev=uuid) from None
        type_id, parent = type_dir.name, dev_dir.parent.name
        if not is_name(type_id) or not is_name(parent):
            raise MdevError(f"mdev {uuid} under {self.root} has an unusable type "
                            f"{type_id!r} or parent {parent!r}", mdev=uuid)
        return SysfsMdev(uuid=uuid, type_id=type_id, parent=parent,
                         device_api=device_api, type_name=type_name)

    def find(self, uuid: str) -> Optional[SysfsMdev]:
        """Like :meth:`mdev` but ``None`` when the mdev is absent."""
        try:
            return self.mdev(uuid)
        except MdevMissing:
            return None

    def parents(self) -> list[str]:
        """Names of the devices that can host mdevs (``class/mdev_bus`` entries)."""
        try:
            return sorted(p.name for p in self.parent_base().iterdir())
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise MdevError(f"cannot list {self.parent_base()}: {_why(exc)}") from None

    def supported_types(self, parent: str) -> list[MdevTypeInfo]:
        """The ``mdev_supported_types`` of *parent* (mandatory files must be present)."""
        base = self.parent_base() / parent / "mdev_supported_types"
        out: list[MdevTypeInfo] = []
        try:
            for tdir in sorted(base.iterdir()):
                api = _read_optional(tdir / "device_api")
                avail = _read_optional(tdir / "available_instances")
                if api is None or avail is None or not avail.isdigit():
                    raise MdevError(f"{tdir}: device_api/available_instances missing or invalid")
                desc = _read_optional(tdir / "description")
                out.append(MdevTypeInfo(tdir.name, api, int(avail), _read_optional(tdir / "name"),
                                        ", ".join(desc.splitlines()) if desc else None))
        except OSError as exc:
            raise MdevError(f"cannot list the mdev types of {parent} under {self.root}: {_why(exc)}") from None
        return out


def _read_optional(path: Path) -> Optional[str]:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except FileNotFoundError:
        return None


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror} ({exc.filename})" if exc.filename else exc.strerror
    return str(exc) or type(exc).__name__


# --------------------------------------------------------------------------- fake trees
@dataclass(frozen=True)
class FakeType:
    """A type offered by a fake parent (the files of ``mdev_supported_types/<type>/``)."""

    name: Optional[str] = None
    device_api: str = "vfio-pci"
    available_instances: int = 4
    description: Optional[str] = None


TypeSpec = Union[FakeType, Mapping[str, object], None]


def _fake_type(spec: TypeSpec) -> FakeType:
    if spec is None:
        return FakeType()
    if isinstance(spec, FakeType):
        return spec
    return FakeType(**spec)  # type: ignore[arg-type]


def make_fake_sysfs(root: PathLike,
                    parents: Mapping[str, Union[Mapping[str, TypeSpec], Sequence[str]]],
                    devices: Optional[Mapping[str, tuple[str, str]]] = None) -> SysfsEnv:
    """Build a fake sysfs tree under *root* that looks like the kernel's, symlinks and all.

    *parents* maps a parent address (``0000:af:00.0``) to its types (type id → a
    :class:`FakeType`, a dict of its fields, or ``None``; a plain list of ids also
    works).  *devices* maps mdev uuid → ``(parent, type_id)``.  Links are relative, so
    the tree can be moved.  Layout::

        devices/pci0000:00/<parent>/mdev_supported_types/<type>/{name,device_api,
            available_instances,description,create,devices/<uuid> -> ../../../<uuid>}
        devices/pci0000:00/<parent>/<uuid>/{mdev_type -> ../mdev_supported_types/<type>, remove}
        class/mdev_bus/<parent> -> ../../devices/pci0000:00/<parent>
        bus/mdev/devices/<uuid> -> ../../../devices/pci0000:00/<parent>/<uuid>

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
        type_map = {t: None for t in types} if not isinstance(types, Mapping) else types
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


def _symlink(target: str, link: Path) -> None:
    if os.path.lexists(link):
        link.unlink()
    link.symlink_to(target)
