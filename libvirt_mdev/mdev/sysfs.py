"""Which mdevs exist on *this* host, and of which type: read from sysfs.

The hook runs inside libvirtd's call and must not use the libvirt API, so it reads
the kernel's view directly (docs/mdev.md; the same rules as mdevctl's ``load_from_sysfs``):

* ``<root>/bus/mdev/devices/<uuid>`` links to the device dir under its parent;
* the type id is the basename of the *fully resolved* ``mdev_type`` link (libvirt and
  mdevctl both canonicalize, so a relative or chained link gives the same answer);
* the parent is the basename of the canonical device dir's parent;
* ``mdev_type/device_api`` is the model (``vfio-pci``);
* the vendor driver is the basename of the parent's ``driver`` link, its version the
  ``version`` file of the driver's kernel module (``driver/module`` →
  ``/sys/module/<name>/version``, which modules declaring ``MODULE_VERSION`` have —
  the NVIDIA vGPU manager does); the parent model is the parent's PCI ``vendor`` and
  ``device`` ids, ``10de:1eb8``.  These three are facts for the compatibility
  policy (:mod:`.policy`): ``None`` when sysfs does not show them.

Vocabulary as mdevctl's: an mdev is *active* when its sysfs node exists; we never
look at *defined* (persisted) mdevs — only active ones can receive state.

The sysfs root is configurable (config ``sysfs_root``) so tests and ``examples/`` use
a fake tree (the test kit builds one: ``testkit/fakesysfs.py``).  No lxml, no libvirt: the hook imports
this.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import MdevError, MdevMissing, UsageError
from .names import is_name, is_uuid

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class SysfsMdev:
    """An active mdev as the kernel shows it."""

    uuid: str
    type_id: str
    parent: str
    device_api: str | None
    #: the type's human name (``GRID T4-1B``), optional in sysfs
    type_name: str | None = None
    #: the parent's vendor driver, its module version, and its PCI ``vendor:device``
    driver: str | None = None
    driver_version: str | None = None
    parent_model: str | None = None


@dataclass(frozen=True)
class ParentFacts:
    """What the policy compares about an mdev's parent device."""

    driver: str | None = None
    driver_version: str | None = None
    model: str | None = None


@dataclass(frozen=True)
class MdevTypeInfo:
    """One entry of a parent's ``mdev_supported_types``."""

    type_id: str
    device_api: str
    available_instances: int
    name: str | None = None
    description: str | None = None


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
        facts = parent_facts(dev_dir.parent, self.root)
        return SysfsMdev(uuid=uuid, type_id=type_id, parent=parent, device_api=device_api, type_name=type_name,
                         driver=facts.driver, driver_version=facts.driver_version, parent_model=facts.model)

    def find(self, uuid: str) -> SysfsMdev | None:
        """Like :meth:`mdev` but ``None`` when the mdev is absent."""
        try:
            return self.mdev(uuid)
        except MdevMissing:
            return None

    def parent(self, name: str) -> ParentFacts:
        """Driver, driver version and model of the mdev parent *name* (``class/mdev_bus``)."""
        if not is_name(name):
            raise UsageError(f"{name!r} is not an mdev parent name")
        try:
            pdir = Path(os.path.realpath(self.parent_base() / name, strict=True))
        except (OSError, RuntimeError):
            return ParentFacts()
        return parent_facts(pdir, self.root)

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


def parent_facts(pdir: Path, root: Path) -> ParentFacts:
    """Read what sysfs shows of a parent device; anything unreadable is ``None``.

    Informative by itself: the policy refuses when a rule it needs is ``None``.
    """
    driver = version = None
    try:
        ddir = Path(os.path.realpath(pdir / "driver", strict=True))
        driver = ddir.name if is_name(ddir.name) else None
        try:
            mdir = Path(os.path.realpath(ddir / "module", strict=True))
        except (OSError, RuntimeError):  # built-in driver or no module link: try /sys/module/<driver>
            mdir = root / "module" / ddir.name
        version = _clean(_read_optional(mdir / "version"))
    except (OSError, RuntimeError):
        pass
    model = None
    try:
        vendor, device = _read_optional(pdir / "vendor"), _read_optional(pdir / "device")
        if vendor and device:
            model = _clean(f"{hex_id(vendor)}:{hex_id(device)}")
    except OSError:
        pass
    return ParentFacts(driver, version, model)


def hex_id(text: str) -> str:
    """A PCI id as sysfs (``0x10de``) or node device XML (``0x10de``, ``10DE``) writes it → ``10de``."""
    return text.strip().lower().removeprefix("0x")


def _clean(text: str | None) -> str | None:
    return text if text and is_name(text) else None


def _read_optional(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except FileNotFoundError:
        return None


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.strerror} ({exc.filename})" if exc.filename else exc.strerror
    return str(exc) or type(exc).__name__
