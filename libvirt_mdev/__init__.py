"""libvirt-mdev: side-load mdev device state during libvirt migrations.

The migration stream is untrusted; this package takes each VFIO device's state
out of it, keeps it in a root-only store, checks that the source and destination
mdev types match, and hands the destination a load token (see README.md).
"""
from __future__ import annotations

__version__ = "0.1.0"
