"""The object every subcommand receives (``pass_app``): configuration and helpers.

Subcommands stay thin: they parse options, call library code, and print.  Library
code never imports click.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from ..config import DEFAULT_PATH, Config, load_config
from ..errors import ConfigError, UsageError


@dataclass
class AppContext:
    config_path: str | None = None
    debug: bool = False
    #: where config_path came from: "option" (--config), "env" ($LIBVIRT_MDEV_CONFIG) or None
    config_source: str | None = None
    _config: Config | None = field(default=None, repr=False)

    @property
    def config(self) -> Config:
        """The configuration file, read on first use (a broken file only matters to
        the commands that need it)."""
        if self._config is None:
            self._config = load_config(self.config_path)
        return self._config

    def check_explicit_config(self) -> None:
        """A file named with ``--config`` (or ``$LIBVIRT_MDEV_CONFIG``) must exist and be
        valid whichever command runs: when the command's options supply every value, a
        typo in the name would otherwise go unnoticed.  The default path itself may be
        missing even when named (all defaults, as :func:`load_config` reads it): scripts
        pass it to be explicit on hosts that have no file yet."""
        if self.config_path is None:
            return
        if Path(self.config_path) == DEFAULT_PATH and not os.path.lexists(self.config_path):
            return
        if not os.path.exists(self.config_path) or os.path.isdir(self.config_path):
            what = "is a directory" if os.path.isdir(self.config_path) else "does not exist"
            raise ConfigError(f"configuration file {self.config_path} {what} (named by --config or "
                              f"$LIBVIRT_MDEV_CONFIG; drop the option to use the defaults)")
        _ = self.config

    def use_config(self, path: Path | None) -> Path:
        """The configuration file this run reads, as an absolute path, with *path* (a
        subcommand's own ``--config``) taken exactly like the global ``--config``.

        ``--config`` has one meaning everywhere: the file libvirt-mdev reads.  For
        ``install-hook`` that is also the file the installed hook will read, so both
        spellings (``libvirt-mdev --config F install-hook`` and ``libvirt-mdev
        install-hook --config F``) are accepted, with the same checks.

        Raises:
            UsageError: the global ``--config`` names another file (a subcommand's
                ``--config`` beats ``$LIBVIRT_MDEV_CONFIG``, as the global one does).
            ConfigError: the file named does not exist or is invalid.
        """
        if path is not None and (self.config_path is None
                                 or os.path.abspath(self.config_path) != os.path.abspath(path)):
            if self.config_source == "option":
                raise UsageError(f"--config is given twice with different files ({self.config_path}, {path}); "
                                 f"give it once")
            # like the global option, a --config on the command line beats $LIBVIRT_MDEV_CONFIG
            self.config_path, self.config_source, self._config = str(path), "option", None
            self.check_explicit_config()
        return Path(os.path.abspath(self.config_path)) if self.config_path else DEFAULT_PATH

    def emit_json(self, obj: Any) -> None:
        click.echo(json.dumps(obj, indent=2, sort_keys=False, default=str))

    def progress_enabled(self) -> bool:
        """Progress bars only on a terminal: scripts and logs stay quiet."""
        return sys.stderr.isatty()


pass_app = click.make_pass_decorator(AppContext)
