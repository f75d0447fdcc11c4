"""``python -m libvirt_mdev.cli``: the same as the ``libvirt-mdev`` console script."""
from __future__ import annotations

from . import main

main()
