"""Reading and checking the configuration file, cheaply enough for the hook.

Why a module of its own, apart from :mod:`.config`: libvirt runs the qemu hook on every
domain operation and waits for it, and the hook's ``migrate begin`` of a domain without
mdevs needs the whole file checked (a broken or untrusted file refuses: fail closed) but
only three of its values.  :mod:`configparser`, :mod:`dataclasses`, :mod:`pathlib` and
:mod:`typing` together cost that call more than the interpreter's own start-up (issue 15,
``bench/bench_hook.py``), so this module imports none of them: a small reader of the one
INI section, the validation of every key, the trust check of the file and the key files
it names.  :class:`libvirt_mdev.config.Config` (the typed, documented settings everyone
else uses) is built from what :func:`read_file` returns; the hook asks :class:`Settings`
for the few values its quick paths need and builds the ``Config`` only on the others.

The format (README.md "Configuration" has the annotated sample): one ``[libvirt-mdev]`` section,
``key = value`` (or ``key: value``) lines, keys case-insensitive, full-line comments
starting with ``#`` or ``;``, and an inline comment after whitespace (``mode = splice   #
...``).  Stricter than :mod:`configparser`, whose reading it replaced: an indented line
(configparser's multi-line value) and a key or section given twice are refused.

Trust (issue 11): the file decides what the hook and the proxy trust (``sysfs_root``,
``trusted_keys``, ``require_signature``), so :func:`read_file` refuses a file, or a key
file it names, or any directory above them, that someone other than root (or the user
running the command) could change.  :func:`check_trusted_path` is the one check, reused
for key files.
"""
from __future__ import annotations

import os
import stat

from .errors import ConfigError

#: not ``typing.TYPE_CHECKING``: this module must not import typing (see above)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Mapping

    Value = str | bool | int | None | tuple[str, ...] | tuple[tuple[int, int], ...]

#: the configuration file every libvirt-mdev program reads unless told otherwise
DEFAULT_CONFIG_PATH = "/etc/libvirt/libvirt-mdev.conf"
#: names another file for the CLI and the tests (never for the hook: libvirt clears its environment)
ENV_VAR = "LIBVIRT_MDEV_CONFIG"
SECTION = "libvirt-mdev"
#: what the filter does with device state (the config's ``mode``; the proxy's --mode adds its own)
MODES = ("splice", "token")
#: the proxy's modes: the filter's, plus relaying verbatim and signing on the source host
PROXY_MODES = (*MODES, "relay", "sign")
LOG_LEVELS = ("debug", "info", "warning")
#: defaults this module needs itself (the hook's quick paths, the key-file check); ``Config`` uses them
DEFAULT_LOG_LEVEL = "info"
DEFAULT_HOST_KEY = "/etc/libvirt/libvirt-mdev/host.key"
DEFAULT_RUNTIME_DIR = "/run/libvirt-mdev"
DEFAULT_STORE = "/var/lib/libvirt/mdev-state"
DEFAULT_QEMU_RUN_DIR = "/run/libvirt/qemu"
#: keys whose value is an absolute path
PATH_KEYS = ("store", "runtime_dir", "sysfs_root", "host_key", "qemu_conf", "qemu_run_dir")
#: keys whose value is an absolute path or empty (unset)
OPTIONAL_PATH_KEYS = ("log_file", "migration_socket_dir")
BOOL_KEYS = ("require_annotation", "require_signature", "arm_all", "require_guard", "match_parent_model")
INT_KEYS = ("retention",)
#: keys whose value is a word from a fixed list, and the list
CHOICE_KEYS = {"mode": MODES, "log_level": LOG_LEVELS}
#: keys taken as written
TEXT_KEYS = ("proxy_listen",)
#: keys with a parser of their own
OTHER_KEYS = ("trusted_keys", "guard_ports", "match_driver_version")
KNOWN_KEYS = frozenset((*PATH_KEYS, *OPTIONAL_PATH_KEYS, *BOOL_KEYS, *INT_KEYS, *CHOICE_KEYS, *TEXT_KEYS,
                        *OTHER_KEYS))

_BOOL = {"1": True, "yes": True, "true": True, "on": True,
         "0": False, "no": False, "false": False, "off": False}
_COMMENT_PREFIXES = ("#", ";")


# --------------------------------------------------------------------------- the INI reader
def parse_ini(text: str, where: str) -> dict[str, str]:
    """The ``key -> raw value`` pairs of *text*'s one ``[libvirt-mdev]`` section.

    Raises:
        ConfigError: a line that is not a section header, a comment or ``key = value``;
            a section other than ours; a section or key given twice.
    """
    values: dict[str, str] = {}
    in_section = False
    seen_section = False
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith(_COMMENT_PREFIXES):
            continue
        at = f"{where}, line {number}"
        if line[0].isspace():
            raise ConfigError(f"{at}: indented line {stripped!r} (a value must fit on its key's line)")
        stripped = _strip_inline_comment(stripped)
        if stripped.startswith("[") and stripped.endswith("]"):
            name = stripped[1:-1]
            if name != SECTION:
                raise ConfigError(f"{at}: unknown section [{name}] (only [{SECTION}] is read)")
            if seen_section:
                raise ConfigError(f"{at}: section [{SECTION}] given twice")
            in_section = seen_section = True
            continue
        if not in_section:
            raise ConfigError(f"{at}: {stripped!r} before the [{SECTION}] section header")
        key, value = _split_key(stripped, at)
        if key in values:
            raise ConfigError(f"{at}: key {key!r} given twice")
        values[key] = value
    return values


def _strip_inline_comment(line: str) -> str:
    """*line* without a ``#`` comment that follows whitespace (a ``#`` inside a value,
    such as ``a#b``, is part of it)."""
    for i, c in enumerate(line):
        if c == "#" and i and line[i - 1] in " \t":
            return line[:i].rstrip()
    return line


def _split_key(line: str, at: str) -> tuple[str, str]:
    cut = [i for i in (line.find("="), line.find(":")) if i >= 0]
    if not cut:
        raise ConfigError(f"{at}: expected 'key = value', not {line!r}")
    key, value = line[:min(cut)].strip().lower(), line[min(cut) + 1:].strip()
    if not key:
        raise ConfigError(f"{at}: a value without a key: {line!r}")
    return key, value


# --------------------------------------------------------------------------- values
def _as_bool(key: str, value: str, where: str) -> bool:
    try:
        return _BOOL[value.lower()]
    except KeyError:
        raise ConfigError(f"{where}: {key} must be yes or no, not {value!r}") from None


def _as_int(key: str, value: str, where: str) -> int:
    try:
        n = int(value)
    except ValueError:
        raise ConfigError(f"{where}: {key} must be a whole number, not {value!r}") from None
    if n < 0:
        raise ConfigError(f"{where}: {key} must not be negative")
    return n


def parse_ports(value: str, where: str) -> tuple[tuple[int, int], ...]:
    """``"49300 49400-49410"`` (spaces or commas) as inclusive ranges."""
    out = []
    for word in value.replace(",", " ").split():
        lo, sep, hi = word.partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise ConfigError(f"{where}: guard_ports: {word!r} is not a port or a range PORT-PORT") from None
        if not (1 <= a <= b <= 65535):
            raise ConfigError(f"{where}: guard_ports: {word!r} is not a port range within 1-65535")
        out.append((a, b))
    return tuple(out)


def _value(key: str, value: str, where: str) -> Value:
    """One key's checked value: paths stay ``str`` here (:mod:`.config` makes them ``Path``)."""
    if key in PATH_KEYS:
        if not value.startswith("/"):
            raise ConfigError(f"{where}: {key} must be an absolute path, not {value!r}")
        return value
    if key in OPTIONAL_PATH_KEYS:
        if value and not value.startswith("/"):
            raise ConfigError(f"{where}: {key} must be an absolute path or empty, not {value!r}")
        return value or None
    if key in BOOL_KEYS:
        return _as_bool(key, value, where)
    if key in INT_KEYS:
        return _as_int(key, value, where)
    if key in CHOICE_KEYS:
        if value not in CHOICE_KEYS[key]:
            raise ConfigError(f"{where}: {key} must be one of {', '.join(CHOICE_KEYS[key])}, not {value!r}")
        return value
    if key == "guard_ports":
        return parse_ports(value, where)
    if key == "trusted_keys":
        return tuple(value.replace(",", " ").split())
    if key == "match_driver_version":  # the policy module knows the rules (imported only when the key is set)
        from .mdev.policy import MatchPolicy

        return MatchPolicy.parse(value, False, where).driver_version.value
    return value


def check_values(raw: dict[str, str], where: str) -> dict[str, Value]:
    """Each key of *raw* checked and converted.  Raises :class:`ConfigError` (one line)
    on an unknown key or a bad value."""
    out: dict[str, Value] = {}
    for key, value in raw.items():
        if key not in KNOWN_KEYS:
            raise ConfigError(f"{where}: unknown key {key!r} (known: {', '.join(sorted(KNOWN_KEYS))})")
        out[key] = _value(key, value.strip(), where)
    return out


# --------------------------------------------------------------------------- trust
def _trusted_owners() -> set[int]:
    """Who may own what we trust: root, and the user running us (a user trusts their own files)."""
    return {0, os.geteuid()}


def _owner_problem(what: str, p: str, st: os.stat_result, is_dir: bool) -> str | None:
    """Why *p* (already lstat-ed as *st*) cannot be trusted, or None."""
    fix = f"fix with: chown root:root {p} && chmod go-w {p}"
    if st.st_uid not in _trusted_owners():
        return f"{what} {p} is owned by uid {st.st_uid}, not root; {fix}"
    if st.st_mode & 0o022:
        if is_dir and st.st_mode & stat.S_ISVTX and st.st_uid == 0:
            return None  # root's sticky directories (/tmp): nobody can replace what root owns in them
        return f"{what} {p} has mode {stat.S_IMODE(st.st_mode):04o}: group or others may change it; {fix}"
    return None


def check_trusted_path(path: os.PathLike[str] | str, what: str = "file") -> None:
    """Refuse *path* unless it and every directory above it can be changed only by root
    (or by the user running this).

    Why the directories: whoever can write to a directory above the file can replace
    the file.  Symlinks are resolved and both the link's own directory and the
    target's chain are checked.  A missing file is not this check's business (callers
    say what a missing file means).

    Raises:
        ConfigError: one line naming the path, what is wrong and the fix.
    """
    p = os.path.abspath(os.fspath(path))
    try:
        st = os.stat(p)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ConfigError(f"cannot check {what} {p}: {exc.strerror}") from None
    if stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3):
        return  # /dev/null: "no settings", whoever writes to it changes nothing
    problem = _owner_problem(what, os.path.realpath(p), st, stat.S_ISDIR(st.st_mode))
    if problem:
        raise ConfigError(problem)
    chains = {os.path.realpath(os.path.dirname(p)), os.path.dirname(os.path.realpath(p))}
    for start in sorted(chains):
        d = start
        while True:
            try:
                dst = os.lstat(d)
            except OSError as exc:
                raise ConfigError(f"cannot check directory {d} above {what} {p}: {exc.strerror}") from None
            problem = _owner_problem(f"directory above {what} {p}:", d, dst, True)
            if problem:
                raise ConfigError(problem)
            parent = os.path.dirname(d)
            if parent == d:
                break
            d = parent


# --------------------------------------------------------------------------- the file
def config_path(explicit: os.PathLike[str] | str | None = None,
                environ: Mapping[str, str] | None = None) -> str:
    """Which file to read: *explicit*, else ``$LIBVIRT_MDEV_CONFIG``, else the fixed path."""
    if explicit:
        return os.fspath(explicit)
    env = os.environ if environ is None else environ
    return env.get(ENV_VAR) or DEFAULT_CONFIG_PATH


def read_file(path: str) -> dict[str, Value]:
    """The checked values of the keys the file at *path* sets (none when the default
    file is missing).  The file, and every key file it names, must pass
    :func:`check_trusted_path`.

    A missing *default* file means "all defaults"; any other missing file was asked
    for by name and is an error.

    Raises:
        ConfigError: missing (named) or unreadable file, syntax error, unknown key, bad
            value, or a file someone else could change.
    """
    if not os.path.lexists(path):
        if os.path.normpath(path) != DEFAULT_CONFIG_PATH:
            raise ConfigError(f"configuration file {path} does not exist")
        check_trusted_path(os.path.dirname(path), "configuration directory")
        return {}
    check_trusted_path(path, "configuration file")
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc}") from None
    values = check_values(parse_ini(text, path), path)
    keys = values.get("trusted_keys") or ()
    assert isinstance(keys, tuple)
    for key_file in (*keys, values.get("host_key") or DEFAULT_HOST_KEY):
        check_trusted_path(str(key_file), "key file")
    return values


class Settings:
    """The checked values of one configuration file, for the hook's quick paths.

    Only the few settings those paths read are offered, each with the default
    :class:`libvirt_mdev.config.Config` declares (a test holds the two together);
    everything else goes through ``Config``."""

    __slots__ = ("source", "values")

    def __init__(self, values: dict[str, Value], source: str) -> None:
        self.values, self.source = values, source

    @classmethod
    def load(cls, path: str) -> Settings:
        return cls(read_file(path), path)

    @property
    def arm_all(self) -> bool:
        return self.values.get("arm_all") is True

    @property
    def log_level(self) -> str:
        return str(self.values.get("log_level") or DEFAULT_LOG_LEVEL)

    @property
    def store(self) -> str:
        return str(self.values.get("store") or DEFAULT_STORE)

    @property
    def runtime_dir(self) -> str:
        return str(self.values.get("runtime_dir") or DEFAULT_RUNTIME_DIR)

    @property
    def qemu_run_dir(self) -> str:
        return str(self.values.get("qemu_run_dir") or DEFAULT_QEMU_RUN_DIR)

    @property
    def log_file(self) -> str | None:
        value = self.values.get("log_file")
        return value if isinstance(value, str) else None
