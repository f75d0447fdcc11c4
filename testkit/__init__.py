"""Test and example fixtures: synthetic VFIO devices in QEMU's framing and fake sysfs trees.

Not part of the installed library (setup.cfg packages only ``libvirt_mdev``): the product
never fabricates device state or host trees; the tests, benches and examples do.
"""
