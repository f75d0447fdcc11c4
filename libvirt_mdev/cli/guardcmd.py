"""``libvirt-mdev guard install|check|remove [--json]``: the no-bypass guard (docs/guard.md).

``install`` writes the nftables table ``inet libvirt_mdev`` (idempotent: the table is
replaced in one nft transaction) covering qemu.conf's migration port range and the
configured ``guard_ports``.  ``check`` exits 0 only when a guard is in place (the
nftables table covering every port, or a correctly permissioned
``migration_socket_dir``) and prints what it found; exit 13 otherwise.  ``remove``
deletes the table.  nftables rules belong to one network namespace: run these in
libvirtd's (``ip netns exec NS libvirt-mdev guard ...`` when libvirtd runs in one).
Rules do not survive a reboot by themselves: run ``guard install`` at boot (e.g.
before libvirtd, from a systemd unit) or add the printed ruleset to /etc/nftables.conf.
"""
from __future__ import annotations

from typing import Any

import click

from ..errors import GuardError, one_line
from ..live import guard as g
from .context import AppContext, pass_app


def _status(app: AppContext) -> dict[str, Any]:
    config = app.config
    need = g.guarded_ports(config)
    state = g.nft_guard()
    sock = g.socket_dir_problem(config) if config.migration_socket_dir is not None else "not set"
    problem = g.guard_problem(config)
    if not config.require_guard:
        problem = "require_guard = no: the hook arms and the proxy forwards without a guard; set require_guard = yes"
    return {"ok": problem is None, "problem": problem,
            "nft": {"present": state.present, "effective": state.effective,
                    "ports": [list(r) for r in state.ports], "needed": [list(r) for r in need],
                    "missing": [list(r) for r in g.missing_ports(state.ports if state.effective else (), need)],
                    "problems": state.problems},
            "socket_dir": {"path": str(config.migration_socket_dir) if config.migration_socket_dir else None,
                           "ok": config.migration_socket_dir is not None and sock is None, "problem": sock}}


def _print(status: dict[str, Any]) -> None:
    nft = status["nft"]
    need = g.ranges_text(tuple(tuple(r) for r in nft["needed"]))
    if nft["effective"]:
        have = g.ranges_text(tuple(tuple(r) for r in nft["ports"]))
        click.echo(f"nftables: table {g.FAMILY} {g.TABLE} guards port(s) {have} (needed: {need})")
    else:
        click.echo(f"nftables: not in place ({'; '.join(nft['problems'])}; needed: {need})")
    sd = status["socket_dir"]
    if sd["path"]:
        click.echo(f"unix: {sd['path']} " + ("guards the UNIX layout" if sd["ok"] else f"not usable: {sd['problem']}"))
    else:
        click.echo("unix: migration_socket_dir not set (UNIX layout not guarded)")


@click.group("guard")
def guard() -> None:
    """Install, check or remove the guard that keeps QEMU's incoming endpoint behind the proxy.

    \b
    TCP layout: an nftables table rejects non-root loopback connections to
    qemu.conf's migration ports and guard_ports.  UNIX layout: QEMU's socket
    inside migration_socket_dir (root-owned, no access for others).
    The hook refuses `migrate begin` unless one is in place.
    """


@guard.command("install")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_app
def install(app: AppContext, as_json: bool) -> int:
    """Install (or update) the nftables guard in this network namespace."""
    before = g.nft_guard()
    ports = g.guarded_ports(app.config)
    g.install_nft_guard(ports)
    after = g.nft_guard()
    if not after.effective or g.missing_ports(after.ports, ports):
        raise GuardError(f"the guard table was written but does not check out: {'; '.join(after.problems)}")
    state = "unchanged" if before.effective and before.ports == after.ports else (
        "updated" if before.present else "installed")
    if as_json:
        app.emit_json({"state": state, "table": f"{g.FAMILY} {g.TABLE}", "ports": [list(r) for r in after.ports]})
    else:
        click.echo(f"{state}: nftables table {g.FAMILY} {g.TABLE} rejects non-root loopback connections to "
                   f"port(s) {g.ranges_text(after.ports)}")
    return 0


@guard.command("check")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_app
def check(app: AppContext, as_json: bool) -> int:
    """Exit 0 when a guard is in place; otherwise exit 13 with the fix."""
    status = _status(app)
    if as_json:
        app.emit_json(status)
    else:
        _print(status)
    if status["problem"]:
        if not as_json:
            click.echo(one_line(GuardError(status["problem"])), err=True)
        return GuardError.exit_code
    return 0


@guard.command("remove")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@pass_app
def remove(app: AppContext, as_json: bool) -> int:
    """Delete the nftables guard table (the hook then refuses incoming TCP migrations)."""
    removed = g.remove_nft_guard()
    if as_json:
        app.emit_json({"state": "removed" if removed else "absent"})
    else:
        click.echo(f"{'removed' if removed else 'absent'}: nftables table {g.FAMILY} {g.TABLE}")
    return 0


@guard.command("show")
@pass_app
def show(app: AppContext) -> int:
    """Print the nftables ruleset `install` writes (for /etc/nftables.conf)."""
    click.echo(g.render_ruleset(g.guarded_ports(app.config)), nl=False)
    return 0


cli = guard
