"""The configuration: ``/etc/libvirt/libvirt-mdev.conf`` (INI, one section) as :class:`Config`.

Why a fixed path: libvirt replaces a hook's environment (only PATH, HOME, LC_ALL=C and
a few more survive, docs/hook.md), so the installed hook
cannot be pointed elsewhere by an environment variable: ``install-hook`` bakes the
path of the file the CLI reads (``--config``, ``$LIBVIRT_MDEV_CONFIG`` or this one)
into the installed hook instead.  For the CLI and the tests, ``LIBVIRT_MDEV_CONFIG``
names another file, and command-line options override the file.

Example::

    [libvirt-mdev]
    store = /var/lib/libvirt/mdev-state
    runtime_dir = /run/libvirt-mdev
    sysfs_root = /sys
    mode = splice
    retention = 86400
    require_annotation = yes
    require_signature = no
    proxy_listen =
    arm_all = no
    log_file =
    log_level = info
    require_guard = yes
    migration_socket_dir =
    guard_ports =
    qemu_conf = /etc/libvirt/qemu.conf
    qemu_run_dir = /run/libvirt/qemu

Reading, checking and trusting the file is :mod:`.configfile`'s (the hook's quick
paths use it without this module's imports); this module turns its values into the
typed :class:`Config` everyone else uses.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .configfile import (
    DEFAULT_CONFIG_PATH,
    DEFAULT_HOST_KEY,
    DEFAULT_LOG_LEVEL,
    DEFAULT_QEMU_RUN_DIR,
    DEFAULT_RUNTIME_DIR,
    DEFAULT_STORE,
    ENV_VAR,
    LOG_LEVELS,
    MODES,
    OPTIONAL_PATH_KEYS,
    PATH_KEYS,
    SECTION,
    check_trusted_path,
    parse_ports,
    read_file,
)
from .configfile import config_path as _config_path

if TYPE_CHECKING:
    from .configfile import Value

DEFAULT_PATH = Path(DEFAULT_CONFIG_PATH)

__all__ = ["DEFAULT_PATH", "ENV_VAR", "LOG_LEVELS", "MODES", "SECTION", "Config", "check_trusted_path",
           "config_from_values", "config_path", "load_config", "parse_ports"]


@dataclass(frozen=True)
class Config:
    """Settings shared by the hook, the proxy and the CLI."""

    #: root of the trusted store (0700 root; SECURITY.md)
    store: Path = Path(DEFAULT_STORE)
    #: pending records written by the hook and consumed by the proxy
    runtime_dir: Path = Path(DEFAULT_RUNTIME_DIR)
    #: sysfs mount point; tests point it at a fake tree
    sysfs_root: Path = Path("/sys")
    #: what the filter does with device state: ``splice`` (verify and forward) or ``token``
    mode: str = "splice"
    #: seconds a stored state is kept after its migration ended, before ``store gc`` removes it
    retention: int = 86400
    #: refuse domains whose mdevs carry no source-type annotation
    require_annotation: bool = True
    #: refuse device state that carries no valid signature from a trusted key
    require_signature: bool = False
    #: public key files of trusted source hosts (signed state, issue 8)
    trusted_keys: tuple[Path, ...] = ()
    #: this host's signing key
    host_key: Path = Path(DEFAULT_HOST_KEY)
    #: default ``ADDR:PORT`` for ``libvirt-mdev proxy --listen``
    proxy_listen: str = ""
    #: arm the proxy at ``migrate begin`` for domains without mdevs too, so that every
    #: incoming migration may pass a proxy that is always in the path (any VFIO state in
    #: such a stream is refused: the domain has no device to bind it to)
    arm_all: bool = False
    #: optional log file in addition to syslog (useful where no syslog daemon runs)
    log_file: Path | None = None
    #: ``info`` logs every decision; ``debug`` also the hook's no-op calls (which cost time on
    #: every libvirt domain operation, so they are not logged by default)
    log_level: str = DEFAULT_LOG_LEVEL
    #: the UNIX-socket layout's guarded directory: the destination QEMU's incoming socket must
    #: lie directly inside it (root-owned, no access for others; docs/guard.md).  Empty: the
    #: UNIX layout is not guarded and the hook refuses UNIX incoming endpoints.
    migration_socket_dir: Path | None = None
    #: refuse to arm (hook) and to forward (proxy) unless the no-bypass guard is in place.
    #: ``no`` only on test rigs: without the guard the proxy can be bypassed (docs/guard.md)
    require_guard: bool = True
    #: TCP ports the nftables guard covers besides qemu.conf's migration port range
    #: (``49300 49400-49410``): the ports proxies forward to on loopback
    guard_ports: tuple[tuple[int, int], ...] = ()
    #: libvirt's QEMU driver configuration (``migration_port_min``/``max``, ``group``)
    qemu_conf: Path = Path("/etc/libvirt/qemu.conf")
    #: where libvirt keeps ``<domain>.pid`` of running QEMUs
    qemu_run_dir: Path = Path(DEFAULT_QEMU_RUN_DIR)
    #: vendor driver version rule (issue 17): off, same, same-or-newer (libvirt_mdev/mdev/policy.py)
    match_driver_version: str = "off"
    #: require the same parent device model (PCI vendor:device) as recorded on the source
    match_parent_model: bool = False
    #: where the settings came from (for messages); not a key
    source: str = field(default="<defaults>", compare=False)

    def replace(self, **changes: Any) -> Config:
        """A copy with *changes* applied (CLI options override the file)."""
        clean = {k: v for k, v in changes.items() if v is not None}
        return dataclasses.replace(self, **clean)


def config_path(explicit: os.PathLike[str] | str | None = None,
                environ: Mapping[str, str] | None = None) -> Path:
    """Which file to read: *explicit*, else ``$LIBVIRT_MDEV_CONFIG``, else the fixed path."""
    return Path(_config_path(explicit, environ))


def config_from_values(values: Mapping[str, Value], source: str) -> Config:
    """The :class:`Config` of :func:`libvirt_mdev.configfile.read_file`'s checked values."""
    typed: dict[str, Any] = {}
    for key, value in values.items():
        if key in PATH_KEYS or (key in OPTIONAL_PATH_KEYS and value is not None):
            typed[key] = Path(str(value))
        elif key == "trusted_keys":
            assert isinstance(value, tuple)
            typed[key] = tuple(Path(str(p)) for p in value)
        else:
            typed[key] = value
    return Config(**typed, source=source)


def load_config(explicit: os.PathLike[str] | str | None = None,
                environ: Mapping[str, str] | None = None) -> Config:
    """Read the configuration.  A missing *default* file means "all defaults"; a
    missing file that was asked for explicitly is an error.

    Raises:
        ConfigError: unreadable file, syntax error, unknown key, bad value, or a file
            (or key file) someone other than root could change.
    """
    path = str(config_path(explicit, environ))
    values = read_file(path)
    return config_from_values(values, path) if os.path.lexists(path) else Config()
