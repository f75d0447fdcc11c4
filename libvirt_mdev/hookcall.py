"""One call of the qemu hook: its arguments, stdin, configuration and log (split from
:mod:`libvirt_mdev.hook`, which holds what each call does).

Like the hook, this module imports nothing heavy at import time: the no-op path must
stay cheap (tests/hook/test_hook_imports.py)."""
from __future__ import annotations

from .errors import MdevError

#: not ``typing.TYPE_CHECKING``: importing typing costs the no-op path ~9 ms (mypy
#: treats any constant of this name as true)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import IO, Any

    from .config import Config
    from .configfile import Settings
    from .mdev.domain import DomainInfo

LOG_IDENT = "libvirt-mdev-hook"
#: refuse domain XML larger than this (libvirt's own limit for XML is 10 MiB)
MAX_XML = 10 * 1024 * 1024


class Refusal(MdevError):
    """The gate says no; the message is the one line for stderr."""


class Call:
    """One hook invocation: its arguments, streams, config and logger (lazily set up).

    The configuration file is read and checked once, by :class:`.configfile.Settings`
    (no dataclasses, pathlib or configparser: the quick paths below need only a few
    values).  :attr:`config`, the full :class:`.config.Config`, is built from the same
    checked values only by the paths that need more."""

    def __init__(self, argv: list[str], stdin: IO[bytes], stderr: IO[str], config_path: str | None) -> None:
        self.domain, self.op, self.sub_op = argv[0], argv[1], argv[2]
        #: libvirt >= 11: a reason (``migrated``, ``saved``, ``destroyed``...); 9.0: ``-``
        self.reason = argv[3] if len(argv) > 3 and argv[3] != "-" else None
        self.stdin, self.stderr = stdin, stderr
        #: the file the installed hook names (imports nothing on the no-op path); None: the default
        self._config_path = config_path
        self._settings: Settings | None = None
        self._config: Config | None = None
        self._log: Any = None
        #: the XML read from stdin (read once: stdin is a pipe)
        self.stdin_data = b""
        #: set by a conditional gate's handler once a refusal must veto the operation
        self.gate = False

    @property
    def config_path(self) -> str:
        if self._config_path is None:
            from .configfile import DEFAULT_CONFIG_PATH

            self._config_path = DEFAULT_CONFIG_PATH
        return self._config_path

    def may_debug(self) -> bool:
        """Whether a debug line could be written, without parsing the config (a no-op
        call must stay cheap): only a file that mentions ``log_level`` and ``debug``."""
        try:
            with open(self.config_path, "rb") as fh:
                head = fh.read(65536)
        except OSError:
            return False
        return b"log_level" in head and b"debug" in head

    @property
    def settings(self) -> Settings:
        """The checked configuration file (explicit path: never ``$LIBVIRT_MDEV_CONFIG``)."""
        if self._settings is None:
            from .configfile import Settings

            self._settings = Settings.load(self.config_path)
        return self._settings

    @property
    def config(self) -> Config:
        if self._config is None:
            from .config import config_from_values

            self._config = config_from_values(self.settings.values, self.settings.source)
        return self._config

    def log(self, level: str, message: str) -> None:
        debug = False
        try:
            debug = self.settings.log_level == "debug"
        except Exception:  # a broken config must not stop the log line about it
            pass
        if level == "debug" and not debug:
            return
        if self._log is None:
            from .hooklog import HookLog

            try:
                log_file = self.settings.log_file
            except Exception:  # a broken config must not stop the log line about it
                log_file = None
            self._log = HookLog(LOG_IDENT, log_file, level=10 if debug else 20)
        getattr(self._log, level)(f"{self.op} {self.sub_op} domain={self.domain}: {message}")

    def read_xml(self) -> bytes:
        if self.stdin_data:
            return self.stdin_data
        data: bytes = self.stdin.read(MAX_XML + 1)
        if not data or not data.strip():
            raise Refusal(f"domain {self.domain}: libvirt passed no domain XML on stdin")
        if len(data) > MAX_XML:
            raise Refusal(f"domain {self.domain}: domain XML larger than {MAX_XML} bytes")
        self.stdin_data = data
        return data

    def read_domain(self) -> DomainInfo:
        from .mdev.domain import parse_domain

        return parse_domain(self.read_xml())
