"""Test infrastructure that drives the real libvirtd 9.0 and QEMU 7.2 on this machine.

Private libvirt hosts (LibvirtHost, TwoHosts), a TCG guest XML builder (GuestSpec), and a QEMU run directly over
QMP (QemuVM). See tests/conftest.py for the fixtures built on them.
"""
from __future__ import annotations

from ._proc import HarnessError
from .libvirt_host import HookFile, LibvirtHost, logging_hook

__all__ = ["HarnessError", "HookFile", "LibvirtHost", "logging_hook"]
