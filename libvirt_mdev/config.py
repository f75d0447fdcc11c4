"""The configuration file: ``/etc/libvirt/libvirt-mdev.conf`` (INI, one section).

Why a fixed path: libvirt replaces a hook's environment (only PATH, HOME, LC_ALL=C and
a few more survive, LIBVIRT.md §1), so the installed hook cannot be pointed elsewhere
by an environment variable.  ``install-hook --config PATH`` bakes another path into
the installed hook instead.  For the CLI and the tests, ``LIBVIRT_MDEV_CONFIG`` names
another file, and command-line options override the file.

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
"""
from __future__ import annotations

import configparser
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

from .errors import ConfigError

DEFAULT_PATH = Path("/etc/libvirt/libvirt-mdev.conf")
ENV_VAR = "LIBVIRT_MDEV_CONFIG"
SECTION = "libvirt-mdev"
MODES = ("splice", "token")


@dataclass(frozen=True)
class Config:
    """Settings shared by the hook, the proxy and the CLI."""

    #: root of the trusted store (0700 root; DESIGN §4)
    store: Path = Path("/var/lib/libvirt/mdev-state")
    #: pending records written by the hook and consumed by the proxy
    runtime_dir: Path = Path("/run/libvirt-mdev")
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
    host_key: Path = Path("/etc/libvirt/libvirt-mdev/host.key")
    #: default ``ADDR:PORT`` for ``libvirt-mdev proxy --listen``
    proxy_listen: str = ""
    #: arm the proxy at ``migrate begin`` for domains without mdevs too, so that every
    #: incoming migration may pass a proxy that is always in the path (any VFIO state in
    #: such a stream is refused: the domain has no device to bind it to)
    arm_all: bool = False
    #: optional log file in addition to syslog (useful where no syslog daemon runs)
    log_file: Optional[Path] = None
    #: where the settings came from (for messages); not a key
    source: str = field(default="<defaults>", compare=False)

    def replace(self, **changes: Any) -> "Config":
        """A copy with *changes* applied (CLI options override the file)."""
        clean = {k: v for k, v in changes.items() if v is not None}
        return dataclasses.replace(self, **clean)


_BOOL = {"1": True, "yes": True, "true": True, "on": True,
         "0": False, "no": False, "false": False, "off": False}


def _as_bool(key: str, value: str, where: str) -> bool:
    try:
        return _BOOL[value.strip().lower()]
    except KeyError:
        raise ConfigError(f"{where}: {key} must be yes or no, not {value!r}") from None


def _as_int(key: str, value: str, where: str) -> int:
    try:
        n = int(value.strip())
    except ValueError:
        raise ConfigError(f"{where}: {key} must be a whole number, not {value!r}") from None
    if n < 0:
        raise ConfigError(f"{where}: {key} must not be negative")
    return n


def _parse(values: Mapping[str, str], where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    known = {f.name for f in dataclasses.fields(Config)} - {"source"}
    for key, raw in values.items():
        if key not in known:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(known))})")
        value = raw.strip()
        if key in ("store", "runtime_dir", "sysfs_root", "host_key"):
            if not value.startswith("/"):
                raise ConfigError(f"{where}: {key} must be an absolute path, not {value!r}")
            out[key] = Path(value)
        elif key == "log_file":
            out[key] = Path(value) if value else None
        elif key == "trusted_keys":
            out[key] = tuple(Path(p) for p in value.replace(",", " ").split())
        elif key == "mode":
            if value not in MODES:
                raise ConfigError(f"{where}: mode must be one of {', '.join(MODES)}, not {value!r}")
            out[key] = value
        elif key == "retention":
            out[key] = _as_int(key, value, where)
        elif key in ("require_annotation", "require_signature", "arm_all"):
            out[key] = _as_bool(key, value, where)
        else:
            out[key] = value
    return out


def config_path(explicit: Optional[os.PathLike[str] | str] = None,
                environ: Optional[Mapping[str, str]] = None) -> Path:
    """Which file to read: *explicit*, else ``$LIBVIRT_MDEV_CONFIG``, else the fixed path."""
    if explicit:
        return Path(explicit)
    env = os.environ if environ is None else environ
    if env.get(ENV_VAR):
        return Path(env[ENV_VAR])
    return DEFAULT_PATH


def load_config(explicit: Optional[os.PathLike[str] | str] = None,
                environ: Optional[Mapping[str, str]] = None) -> Config:
    """Read the configuration.  A missing *default* file means "all defaults"; a
    missing file that was asked for explicitly is an error.

    Raises:
        ConfigError: unreadable file, syntax error, unknown key or bad value.
    """
    path = config_path(explicit, environ)
    asked = path != DEFAULT_PATH
    parser = configparser.ConfigParser(interpolation=None, default_section="__none__")
    try:
        with open(path, encoding="utf-8") as fh:
            parser.read_file(fh)
    except FileNotFoundError:
        if asked:
            raise ConfigError(f"configuration file {path} does not exist") from None
        return Config()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc}") from None
    except configparser.Error as exc:
        raise ConfigError(f"{path}: {' '.join(str(exc).split())}") from None
    extra = [s for s in parser.sections() if s != SECTION]
    if extra:
        raise ConfigError(f"{path}: unknown section [{extra[0]}] (only [{SECTION}] is read)")
    values = dict(parser.items(SECTION)) if parser.has_section(SECTION) else {}
    return Config(**_parse(values, str(path)), source=str(path))
