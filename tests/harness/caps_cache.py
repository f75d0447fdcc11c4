"""A QEMU capability cache shared by the private libvirt hosts of one test run.

libvirtd probes both QEMU binaries (i386 and x86_64) on first use, about 8 s per host. It re-validates every
cached file (binary ctimes, kernel, microcode, host CPUID, /dev/kvm access) and probes again when anything differs,
so sharing the cache cannot hand a host stale capabilities; at worst it saves nothing.
"""
from __future__ import annotations

import shutil
from pathlib import Path

# Where libvirtd keeps the cache, relative to a host root (it is /var/cache/libvirt/qemu/capabilities inside).
CAPS_SUBDIR = Path("cache/qemu/capabilities")
_default: Path | None = None


def set_default_caps_cache(path: Path | None) -> None:
    """Make *path* the cache every LibvirtHost created afterwards uses unless given its own."""
    global _default
    _default = Path(path) if path is not None else None


def default_caps_cache() -> Path | None:
    return _default


def seed(cache: Path | None, host_root: Path) -> None:
    """Copy the shared cache into a host before its libvirtd starts."""
    if cache is None or not cache.is_dir():
        return
    target = host_root / CAPS_SUBDIR
    target.mkdir(parents=True, exist_ok=True)
    for xml in cache.glob("*.xml"):
        shutil.copy2(xml, target / xml.name)


def harvest(host_root: Path, cache: Path | None, tag: str) -> None:
    """Copy what a host probed back into the shared cache, atomically (hosts may start in parallel)."""
    if cache is None:
        return
    cache.mkdir(parents=True, exist_ok=True)
    for xml in (host_root / CAPS_SUBDIR).glob("*.xml"):
        tmp = cache / f".{xml.name}.{tag}.tmp"
        shutil.copy2(xml, tmp)
        tmp.replace(cache / xml.name)
