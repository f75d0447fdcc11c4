"""What the two-host migration tests share: our hook and proxy on private libvirt hosts (tests/harness/twohosts.py).

The tests that run `virsh migrate --live` between two hosts (tests/proxy/test_libvirt_migrate.py,
tests/e2e/test_orchestrator_e2e.py, tests/guard/test_guard_twohosts.py, tests/sign/test_signed_libvirt_e2e.py) build
the same rig: our hook installed as a user installs it (`libvirt-mdev hook install`), test hooks written in Python
that run before ours, a config file at the path the hook reads, `libvirt-mdev proxy --once --json-log` started inside
a host's namespaces, and after each test the guest destroyed on both hosts. Each test keeps what is its own (its
hooks' bodies, its config keys, its assertions); this module keeps the rest. tests/harness/README.md shows the API.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any, ClassVar

from libvirt_mdev.cli.hookcmd import HOOK_NAME, install, render_hook

from .guests import GuestSpec
from .libvirt_host import HookFile, LibvirtHost
from .twohosts import TwoHosts

REPO = Path(__file__).resolve().parents[2]
#: where, on a host, our hook reads its configuration (what `libvirt-mdev hook install` writes into the hook)
CONF = "/etc/libvirt/libvirt-mdev.conf"
LOG = "/var/log/libvirt/libvirt-mdev.log"
RUNTIME = "/run/libvirt/libvirt-mdev"
STORE = "/var/lib/libvirt/mdev-state"


def config_text(sysfs: Path | None = None, *, log: str = LOG, runtime: str | None = RUNTIME,
                store: str | None = STORE, **options: str | bool | int) -> str:
    """A `[libvirt-mdev]` config for a host: sysfs_root (when given), runtime_dir, store and log_file, then
    *options* in the order given (True/False are written as yes/no).

    Most rigs pass `require_guard=False`: they run without the no-bypass guard, which tests/guard tests itself.
    """
    lines = ["[libvirt-mdev]"]
    if sysfs is not None:
        lines.append(f"sysfs_root = {sysfs}")
    if runtime is not None:
        lines.append(f"runtime_dir = {runtime}")
    if store is not None:
        lines.append(f"store = {store}")
    lines.append(f"log_file = {log}")
    for key, value in options.items():
        lines.append(f"{key} = {('yes' if value else 'no') if isinstance(value, bool) else value}")
    return "\n".join(lines) + "\n"


def our_hook(staging: Path, conf: str = CONF) -> HookFile:
    """Our qemu hook as `libvirt-mdev hook install` writes it (reading *conf*), to pass to TwoHosts."""
    path, _ = install(staging, Path(conf))
    return HookFile(name=HOOK_NAME, source=path)


def python_hook(name: str, body: str, conf: str = CONF) -> HookFile:
    """A test hook in Python: our hook's interpreter line (this interpreter, isolated), the repository put on
    sys.path (libvirt passes no PYTHONPATH), then *body*. The body must read stdin and print nothing on
    `migrate begin` unless it means to replace the domain XML (docs/testing.md, pitfall 8)."""
    head = render_hook(sys.executable, conf, [str(REPO)]).split("\n", 1)[0] + "\n"
    return HookFile(name=name, content=head + f"import sys\nsys.path.insert(0, {str(REPO)!r})\n" + body)


def define_and_start(host: LibvirtHost, spec: GuestSpec, workdir: Path) -> None:
    """`virsh define` the guest's XML (written to *workdir*), then `virsh start` it."""
    xml = workdir / f"{spec.name}.xml"
    xml.write_text(spec.to_xml())
    host.virsh("define", str(xml))
    host.virsh("start", spec.name)


def host_text(host: LibvirtHost, path: str) -> str:
    """The text of a host's file (a path as the host sees it), or "" when there is none yet."""
    p = host.host_path(path)
    return p.read_text() if p.exists() else ""


def cli_in_ns(host: LibvirtHost, *args: str, conf: str = CONF, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`libvirt-mdev --config CONF ARGS` run "on" a host (in its namespaces), as an admin there would."""
    return host.run_in_ns([sys.executable, "-m", "libvirt_mdev.cli", "--config", conf, *args], check=check,
                          env={**os.environ, "PYTHONPATH": str(REPO)})


class ProxyProcess:
    """`libvirt-mdev --config CONF proxy --once --json-log ARGS` running "on" a host (inside its namespaces).

    The constructor returns once the proxy printed its first JSON line (`hello`: it listens); `result()` is the
    session's JSON line once it is done.
    """

    def __init__(self, host: LibvirtHost, *args: str, config: str = CONF) -> None:
        self.proc = host.popen_in_ns([sys.executable, "-m", "libvirt_mdev.cli", "--config", config, "proxy",
                                      "--once", "--json-log", *args],
                                     env={**os.environ, "PYTHONPATH": str(REPO)},  # nsenter -m resets the cwd
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, self.proc.stderr.read() if self.proc.stderr else "proxy died"
        self.hello: dict[str, Any] = json.loads(line)

    def result(self, timeout: float = 60) -> dict[str, Any]:
        out, err = self.proc.communicate(timeout=timeout)
        lines = out.splitlines()
        assert lines, err
        result: dict[str, Any] = json.loads(lines[0])
        return result

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def remove_guest(hosts: TwoHosts, name: str, proxies: Iterable[ProxyProcess | None] = ()) -> None:
    """After a test: stop its proxies, destroy the guest wherever it runs, undefine it on A (best effort)."""
    for p in proxies:
        if p is not None:
            p.stop()
    for host in (hosts.a, hosts.b):
        if host.virsh("domstate", name, check=False).stdout.strip() in ("running", "paused"):
            host.virsh("destroy", name, check=False)
    hosts.a.virsh("undefine", name, check=False)


class MigrationRig:
    """Two started hosts with our hook on B, as a module-scoped fixture yields them.

    `MODE_FILE` (a path on B) is what a test hook reads to know what to play; `LOG` is our hook's and proxy's log.
    """

    MODE_FILE: ClassVar[str] = "/var/lib/libvirt/test-mdev-mode"
    LOG: ClassVar[str] = LOG

    def __init__(self, hosts: TwoHosts) -> None:
        self.hosts = hosts

    @property
    def a(self) -> LibvirtHost:
        return self.hosts.a

    @property
    def b(self) -> LibvirtHost:
        return self.hosts.b

    def mode(self, mode: str) -> None:
        self.b.host_path(self.MODE_FILE).write_text(mode)

    def log(self) -> str:
        return host_text(self.b, self.LOG)
