"""``libvirt-mdev``: the command-line entry point.

Thin by design (click's "one module per subcommand"): each verb lives in its own
module under ``libvirt_mdev/cli/`` and exports ``cli``.  Modules are imported lazily,
so ``libvirt-mdev --help`` does not pay for libvirt-python or lxml.

Errors: every :class:`~libvirt_mdev.errors.MdevError` becomes one line on stderr and
its exit code (the table in :mod:`libvirt_mdev.errors`); with ``--json`` the error is
also printed on stdout as ``{"error": {...}}`` so scripts get a parseable answer.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import sys
from typing import Any, Optional, Sequence

import click

from ..errors import MdevError, exit_code_for, one_line
from .context import AppContext

#: verb -> (module, one-line summary for --help without importing the module)
COMMANDS: dict[str, tuple[str, str]] = {
    "inspect": ("libvirt_mdev.cli.inspect", "List the sections and VFIO devices of a migration stream or save image."),
    "strip": ("libvirt_mdev.cli.filtercmd", "Move device state out of a stream into the store; leave load tokens."),
    "splice": ("libvirt_mdev.cli.filtercmd", "Store and verify device state, write the stream back unchanged."),
    "load": ("libvirt_mdev.cli.load", "Reference loader: resolve a token, verify it, deliver the state."),
    "store": ("libvirt_mdev.cli.store", "List, verify and garbage-collect the trusted store."),
    "check": ("libvirt_mdev.cli.check", "Dry run: would migrating DOMAIN from SRC to DEST be allowed?"),
    "annotate": ("libvirt_mdev.cli.annotate", "Record a domain's source mdev types in its metadata."),
    "install-hook": ("libvirt_mdev.cli.hookcmd", "Install the libvirt qemu hook into qemu.d."),
    "uninstall-hook": ("libvirt_mdev.cli.hookcmd", "Remove the libvirt qemu hook from qemu.d."),
    "proxy": ("libvirt_mdev.cli.proxy", "Filter a live migration between the source and the local QEMU."),
    "keygen": ("libvirt_mdev.cli.keygen", "Create this host's signing key pair."),
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use.

    A verb whose module is not present in this build is simply not listed, so the
    table above can name future verbs without breaking ``--help``.
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name, (mod, _) in COMMANDS.items() if _module_exists(mod)]

    def get_command(self, ctx: click.Context, name: str) -> Optional[click.Command]:
        entry = COMMANDS.get(name)
        if entry is None or not _module_exists(entry[0]):
            return None
        module = importlib.import_module(entry[0])
        attr = name.replace("-", "_")
        cmd = getattr(module, attr, None) or getattr(module, "cli")
        return cmd  # type: ignore[no-any-return]

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


def _module_exists(modname: str) -> bool:
    return importlib.util.find_spec(modname) is not None


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"],
                                              "auto_envvar_prefix": "LIBVIRT_MDEV"})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Configuration file (default: $LIBVIRT_MDEV_CONFIG or /etc/libvirt/libvirt-mdev.conf).")
@click.option("--debug", is_flag=True, help="Log debug messages to stderr and show tracebacks of internal errors.")
@click.version_option(package_name="libvirt-mdev")
@click.pass_context
def cli(ctx: click.Context, config_path: Optional[str], debug: bool) -> None:
    """Safe live migration and save/restore of VMs with mediated devices (mdev).

    The migration stream is untrusted: libvirt-mdev takes each VFIO device's state
    out of it into a root-only store, checks that source and destination mdev types
    match, and hands the destination a load token.  See `man`-style documentation in
    README.md.  Exit status: 0 ok, 2 usage, 3 stream rejected, 4 store, 5 cannot
    connect, 6 type mismatch, 7 mdev missing, 8 not annotated, 9 config, 10 bad XML,
    11 signature, 12 not found, 70 internal error.
    """
    ctx.obj = AppContext(config_path=config_path, debug=debug)


def _wants_json(args: Sequence[str]) -> bool:
    return "--json" in args


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console-script entry point.  Returns (and exits with) the process status."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        rv = cli.main(args=args, prog_name="libvirt-mdev", standalone_mode=False)
        code = rv if isinstance(rv, int) else 0
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.exceptions.Abort:
        click.echo("libvirt-mdev: aborted", err=True)
        code = 1
    except click.ClickException as exc:
        exc.show()
        code = exc.exit_code
    except MdevError as exc:
        code = report_error(exc, json_mode=_wants_json(args))
    except KeyboardInterrupt:
        click.echo("libvirt-mdev: interrupted", err=True)
        code = 130
    except BrokenPipeError:
        code = 0
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, not a traceback
        if "--debug" in args:
            raise
        code = report_error(exc, json_mode=_wants_json(args))
    if argv is None:
        sys.exit(code)
    return code


def report_error(exc: BaseException, json_mode: bool = False) -> int:
    """Print *exc* as one line on stderr (and as JSON on stdout with --json)."""
    click.echo(one_line(exc), err=True)
    if json_mode:
        body: dict[str, Any]
        if isinstance(exc, MdevError):
            body = exc.to_json()
        else:
            body = {"kind": "internal", "exit_code": 70, "message": one_line(exc)}
        click.echo(json.dumps({"error": body}))
    return exit_code_for(exc)
