"""``libvirt-mdev install-hook`` / ``uninstall-hook``: put the qemu hook into ``qemu.d``.

The installed file is ``hooks/qemu`` with three things baked in, because libvirt runs
hooks with a replaced environment (docs/hook.md) and its PATH may find a different
``python3`` than the one libvirt-mdev is installed for:

* the shebang: the absolute interpreter running this command (``sys.executable``),
  with ``-IS`` (one shebang argument: ``-I -S``): no PYTHON* variable, user site or ``.pth`` file (arbitrary code run
  at start-up, as root, on every hook call) changes what the hook imports, and
  start-up is ~40 ms faster on hosts with slow ``.pth`` files;
* ``CONFIG``: the configuration file the hook reads: the one this command reads
  (``--config``, ``$LIBVIRT_MDEV_CONFIG`` or the default; ``--config`` means the same
  before and after ``install-hook``), as an absolute path;
* ``SYS_PATH``: where ``libvirt_mdev`` and ``lxml`` were imported from (``-S`` drops
  site-packages, so the hook names them itself).

Both commands are idempotent and only ever touch a file that carries our marker
line; a foreign file with the same name is refused, never overwritten.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from ..config import DEFAULT_PATH, ENV_VAR
from ..errors import MdevError, UsageError
from .context import AppContext, pass_app

DEFAULT_HOOKS_DIR = Path("/etc/libvirt/hooks/qemu.d")
#: runs after lower-numbered site hooks, before anything named 9x (byte order, docs/hook.md)
HOOK_NAME = "50-libvirt-mdev"
MARKER = "# libvirt-mdev qemu hook -- installed by `libvirt-mdev install-hook`"
#: the repository copy (hooks/qemu) must equal HOOK_TEMPLATE rendered with the defaults (tested)
HOOK_TEMPLATE = MARKER + """, removed by `uninstall-hook`.
# libvirt runs it as: HOOK DOMAIN OPERATION SUBOP EXTRA, domain XML on stdin (see libvirt_mdev/hook.py).
# install-hook rewrites the first line to the absolute interpreter it ran under (libvirt's PATH may
# find another python3) and fills in the two values below; libvirt passes no useful environment.
import sys

CONFIG = {config!r}
SYS_PATH = {sys_path!r}  # where libvirt_mdev and lxml were found at install time

for _entry in reversed(SYS_PATH):
    if _entry not in sys.path:
        sys.path.insert(0, _entry)
try:
    from libvirt_mdev.hook import main
except Exception as exc:  # noqa: BLE001
    # Fail closed only where libvirt lets a hook veto (migrate/restore); never block other operations.
    gate = sys.argv[2:4] in (["migrate", "begin"], ["restore", "begin"])
    if gate:
        sys.stderr.write(f"libvirt-mdev: hook cannot import libvirt_mdev ({{exc}}); "
                         f"reinstall it with: libvirt-mdev install-hook\\n")
    sys.exit(1 if gate else 0)
sys.exit(main(sys.argv[1:], sys.stdin.buffer, sys.stdout.buffer, sys.stderr, config_path=CONFIG))
"""


def render_hook(python: str, config: str, sys_path: list[str]) -> str:
    """The text of an installed hook."""
    return f"#!{python}\n" + HOOK_TEMPLATE.format(config=config, sys_path=sys_path)


def repository_hook_text() -> str:
    """What ``hooks/qemu`` in the source tree contains (defaults, env python3)."""
    return render_hook("/usr/bin/env python3", str(DEFAULT_PATH), [])


def hook_sys_path() -> list[str]:
    """Import roots the hook needs: libvirt_mdev's and lxml's (they may differ)."""
    import importlib.util

    out = [str(Path(__file__).resolve().parents[2])]
    spec = importlib.util.find_spec("lxml")
    if spec is not None and spec.origin:
        root = str(Path(spec.origin).resolve().parents[1])
        if root not in out:
            out.append(root)
    return out


def _is_ours(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
    except OSError:
        return False
    return MARKER.encode() in head


def install(hooks_dir: Path, config: Path, python: str | None = None,
            name: str = HOOK_NAME) -> tuple[Path, str]:
    """Install (or update) the hook.  Returns its path and what happened
    (``installed`` / ``updated`` / ``unchanged``).

    Raises:
        UsageError: *config* is not absolute.
        MdevError: a foreign file has our name, or the directory is not writable.
    """
    if not config.is_absolute():
        raise UsageError(f"--config {config}: the hook needs an absolute path")
    text = render_hook(f"{python or sys.executable} -IS", str(config), hook_sys_path())
    target = hooks_dir / name
    state = "installed"
    if os.path.lexists(target):
        if target.is_symlink() or not target.is_file() or not _is_ours(target):
            raise MdevError(f"{target} exists and is not a libvirt-mdev hook; refusing to overwrite it "
                            f"(move it away or pass --name)")
        if target.read_text(encoding="utf-8", errors="replace") == text and (target.stat().st_mode & 0o777) == 0o755:
            return target, "unchanged"
        state = "updated"
    try:
        hooks_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
        tmp = hooks_dir / f".{name}.tmp{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o755)
        try:
            os.write(fd, text.encode())
            os.fchmod(fd, 0o755)  # not subject to the umask
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except OSError as exc:
        raise MdevError(f"cannot install the hook into {hooks_dir}: {exc.strerror or exc}") from None
    return target, state


def uninstall(hooks_dir: Path, name: str = HOOK_NAME) -> tuple[Path, str]:
    """Remove our hook.  Returns its path and ``removed`` / ``absent``.

    Raises:
        MdevError: the file there is not ours (left alone), or cannot be removed.
    """
    target = hooks_dir / name
    if not os.path.lexists(target):
        return target, "absent"
    if target.is_symlink() or not _is_ours(target):
        raise MdevError(f"{target} is not a libvirt-mdev hook; not removing it")
    try:
        target.unlink()
    except OSError as exc:
        raise MdevError(f"cannot remove {target}: {exc.strerror or exc}") from None
    return target, "removed"


_DIR_HELP = f"libvirt's qemu hook directory (default {DEFAULT_HOOKS_DIR})."


@click.command("install-hook")
@click.option("--hooks-dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_HOOKS_DIR,
              show_default=False, help=_DIR_HELP)
@click.option("--config", "hook_config", type=click.Path(dir_okay=False, path_type=Path), default=None,
              metavar="FILE", help="The global --config, given after the command: the configuration file "
                                   f"libvirt-mdev reads, baked into the hook (default: ${ENV_VAR}, "
                                   f"else {DEFAULT_PATH}). A file named must exist and be valid.")
@click.option("--name", default=HOOK_NAME, show_default=True, help="File name inside the hook directory.")
@pass_app
def install_hook(app: AppContext, hooks_dir: Path, hook_config: Path | None, name: str) -> None:
    """Install the libvirt qemu hook as HOOKS_DIR/50-libvirt-mdev (mode 0755).

    \b
    The hook gates `migrate begin` and `restore begin` on matching mdev types
    and arms the live-migration proxy.  It runs with this Python
    (sys.executable) and reads the configuration file this command reads
    (--config, $LIBVIRT_MDEV_CONFIG or the default), whose absolute path is
    baked into it: libvirt gives hooks no useful environment.  Idempotent;
    refuses to overwrite a file that is not ours.  libvirt looks for hooks
    when it starts: if this host had no qemu hook before, restart libvirtd
    (or virtqemud) once.  Says so when the no-bypass guard is not in place
    (`libvirt-mdev guard install`).
    """
    config = app.use_config(hook_config)
    path, state = install(hooks_dir, config, name=name)
    click.echo(f"{state} {path} (python {sys.executable}, config {config})")
    if not os.path.lexists(config):  # only the default may be missing: a file named must exist
        click.echo(f"note: {config} does not exist yet; the hook uses the defaults until it does", err=True)
    problem = _guard_note(config)
    if problem:
        click.echo(f"note: incoming migrations to be armed will be refused until a guard is in place: {problem} "
                   f"(docs/guard.md)", err=True)


def _guard_note(config_path: Path) -> str | None:
    """Why the no-bypass guard is not in place for the hook's config (None: it is).

    install-hook does not install the nftables guard itself: rules belong to libvirtd's
    network namespace and must be restored at boot, which admins arrange their own way
    (``guard install`` from a unit, or /etc/nftables.conf from ``guard show``)."""
    try:
        from ..config import load_config
        from ..live.guard import guard_problem

        return guard_problem(load_config(config_path))
    except MdevError as exc:
        return exc.message


@click.command("uninstall-hook")
@click.option("--hooks-dir", type=click.Path(file_okay=False, path_type=Path), default=DEFAULT_HOOKS_DIR,
              help=_DIR_HELP)
@click.option("--name", default=HOOK_NAME, show_default=True, help="File name inside the hook directory.")
def uninstall_hook(hooks_dir: Path, name: str) -> None:
    """Remove the libvirt qemu hook (idempotent; never removes a file that is not ours)."""
    path, state = uninstall(hooks_dir, name)
    click.echo(f"{state}: {path}" if state == "removed" else f"not installed: {path}")
