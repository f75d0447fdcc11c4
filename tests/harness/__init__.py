"""Test infrastructure that drives the real libvirtd and QEMU of this machine (or of the root CI runs it in).

Private libvirt hosts (LibvirtHost, TwoHosts), a TCG guest XML builder (GuestSpec), and a QEMU run directly over
QMP (QemuVM). See README.md here and tests/conftest.py for the fixtures built on them.
"""
from __future__ import annotations

from ._proc import HarnessError
from .guests import GuestSpec, full_guest, make_disk, make_ram_file, migratable_guest
from .libvirt_host import HookFile, LibvirtHost, logging_hook
from .qemu_vm import QemuVM
from .twohosts import TwoHosts

__all__ = ["GuestSpec", "HarnessError", "HookFile", "LibvirtHost", "QemuVM", "TwoHosts", "full_guest",
           "logging_hook", "make_disk", "make_ram_file", "migratable_guest"]
