"""The object every subcommand receives (``pass_app``): configuration and helpers.

Subcommands stay thin: they parse options, call library code, and print.  Library
code never imports click.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any, Optional

import click

from ..config import Config, load_config


@dataclass
class AppContext:
    config_path: Optional[str] = None
    debug: bool = False
    _config: Optional[Config] = field(default=None, repr=False)

    @property
    def config(self) -> Config:
        """The configuration file, read on first use (a broken file only matters to
        the commands that need it)."""
        if self._config is None:
            self._config = load_config(self.config_path)
        return self._config

    def emit_json(self, obj: Any) -> None:
        click.echo(json.dumps(obj, indent=2, sort_keys=False, default=str))

    def progress_enabled(self) -> bool:
        """Progress bars only on a terminal: scripts and logs stay quiet."""
        return sys.stderr.isatty()


pass_app = click.make_pass_decorator(AppContext)
