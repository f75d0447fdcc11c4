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
from collections.abc import Sequence

import click

from ..configfile import DEFAULT_CONFIG_PATH, ENV_VAR
from ..errors import MdevError, UsageError, error_json, exit_code_for, one_line
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
    "sign": ("libvirt_mdev.cli.signcmd", "Sign the device state of a stripped save image with this host's key."),
    "guard": ("libvirt_mdev.cli.guardcmd",
              "Install or check the guard that keeps QEMU's incoming endpoint behind the proxy."),
    "pending": ("libvirt_mdev.cli.pendingcmd", "List or clear armed incoming migrations (pending records)."),
    "place": ("libvirt_mdev.cli.place", "Ask many destinations which of them can take DOMAIN's mdevs, and why not."),
}


class LazyGroup(click.Group):
    """A group whose subcommands are imported on first use.

    A verb whose module is not present in this build is simply not listed, so the
    table above can name future verbs without breaking ``--help``.
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name, (mod, _) in COMMANDS.items() if _module_exists(mod)]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        entry = COMMANDS.get(name)
        if entry is None or not _module_exists(entry[0]):
            return None
        module = importlib.import_module(entry[0])
        attr = name.replace("-", "_")
        cmd = getattr(module, attr, None) or module.cli
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
@click.option("--config", "config_path", type=click.Path(), metavar="FILE", default=None, envvar=ENV_VAR,
              help=f"Configuration file libvirt-mdev reads, and install-hook bakes into the hook (default: "
                   f"${ENV_VAR}, else {DEFAULT_CONFIG_PATH}). A file named here or in ${ENV_VAR} must exist "
                   f"and be valid, whichever command runs.")
@click.option("--debug", is_flag=True, help="Log debug messages to stderr and show tracebacks of internal errors.")
@click.version_option(package_name="libvirt-mdev")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None, debug: bool) -> None:
    """Safe live migration and save/restore of VMs with mediated devices (mdev).

    The migration stream is untrusted: libvirt-mdev takes each VFIO device's state
    out of it into a root-only store, checks that source and destination mdev types
    match, and hands the destination a load token.  Every command has --help;
    the manual is libvirt-mdev(1), one page per command (libvirt-mdev-COMMAND(1))
    and libvirt-mdev.conf(5).  Exit status: 0 ok, 1 other refusal, 2 usage,
    3 stream rejected, 4 store, 5 cannot connect, 6 type mismatch, 7 mdev
    missing, 8 not annotated, 9 config, 10 bad XML, 11 signature, 12 not found,
    70 internal error.
    """
    source = ctx.get_parameter_source("config_path")
    app = AppContext(config_path=config_path, debug=debug,
                     config_source={click.core.ParameterSource.COMMANDLINE: "option",
                                    click.core.ParameterSource.ENVIRONMENT: "env"}.get(source) if source else None)
    ctx.obj = app
    if config_path and not ctx.resilient_parsing:
        app.check_explicit_config()


def _wants_json(args: Sequence[str]) -> bool:
    return "--json" in args


def main(argv: Sequence[str] | None = None) -> int:
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
    except click.UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # click >= 8.2: a bare group prints its help
            exc.show()
            code = exc.exit_code
        else:
            code = report_usage(exc, args, json_mode=_wants_json(args))
    except click.ClickException as exc:  # e.g. click.FileError: one line too, with click's exit code
        report_error(MdevError(exc.format_message()), json_mode=False)
        code = exc.exit_code
    except MdevError as exc:
        code = report_error(exc, json_mode=_wants_json(args))
    except KeyboardInterrupt:
        click.echo("libvirt-mdev: interrupted", err=True)
        code = 130
    except BrokenPipeError:
        code = 0
    except Exception as exc:
        if "--debug" in args:
            raise
        code = report_error(exc, json_mode=_wants_json(args))
    if argv is None:
        sys.exit(code)
    return code


def _command_path(args: Sequence[str]) -> str:
    """The (sub)command that *args* name, for errors click raises without a context
    (an option's missing value): the leading words that are command names."""
    cmd: click.Command = cli
    ctx = click.Context(cli, info_name="libvirt-mdev")
    words = ["libvirt-mdev"]
    for arg in args:
        if arg.startswith("-"):
            continue
        sub = cmd.get_command(ctx, arg) if isinstance(cmd, click.Group) else None
        if sub is None:
            break
        words.append(arg)
        cmd = sub
    return " ".join(words)


def report_usage(exc: click.UsageError, args: Sequence[str] = (), json_mode: bool = False) -> int:
    """A command-line mistake as one line (click prints three): the problem and where
    to look, e.g. ``libvirt-mdev: inspect: Missing argument 'PATH' (see: libvirt-mdev inspect --help)``."""
    path = exc.ctx.command_path if exc.ctx is not None else _command_path(args)
    where = path.split(" ", 1)[1] + ": " if " " in path else ""
    message = " ".join(exc.format_message().split()).rstrip(".")
    err = UsageError(f"{where}{message} (see: {path} --help)")
    click.echo(one_line(err), err=True)
    if json_mode:
        click.echo(json.dumps({"error": {**err.to_json(), "exit_code": exc.exit_code}}))
    return exc.exit_code


def report_error(exc: BaseException, json_mode: bool = False) -> int:
    """Print *exc* as one line on stderr (and as JSON on stdout with --json)."""
    click.echo(one_line(exc), err=True)
    if json_mode:
        click.echo(json.dumps({"error": error_json(exc)}))
    return exit_code_for(exc)
