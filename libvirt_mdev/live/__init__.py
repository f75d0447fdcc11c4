"""The live path: the migration proxy, its sessions, the socket relay, arming and the TLS bridge.

Everything here moves bytes between sockets; what may pass is decided by the filter
(:mod:`libvirt_mdev.filter`) and, with signatures, by :mod:`libvirt_mdev.sign`.
"""
