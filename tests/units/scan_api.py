"""Where the footer scan (``next_record_ok``, ``BodyGuard``) lives.

Issue 16 moves it from libvirt_mdev/stream/sections.py into its own module, libvirt_mdev/stream/scan.py, while
these tests are being written; they take it from whichever module has it, so they run on both sides of the move.
Once the move has landed, import from libvirt_mdev.stream.scan directly and delete this file.
"""
from __future__ import annotations

import importlib
from types import ModuleType

_CANDIDATES = ("libvirt_mdev.stream.scan", "libvirt_mdev.stream.sections")


def _module() -> ModuleType:
    for name in _CANDIDATES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError:
            continue
        if hasattr(mod, "BodyGuard") and hasattr(mod, "next_record_ok"):
            return mod
    raise ImportError(f"no module of {_CANDIDATES} has BodyGuard and next_record_ok")


_scan = _module()
BodyGuard = _scan.BodyGuard
next_record_ok = _scan.next_record_ok
