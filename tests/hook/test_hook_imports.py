"""The hook's quick paths import only what they need (issue 15: libvirt runs the hook
on every domain operation and waits for it; bench/bench_hook.py measures the time).

Each call runs in a fresh ``python3 -I -S`` (as the installed hook does) and reports
which modules it loaded: the no-op and the mdev-less ``migrate begin`` must not load
configparser, dataclasses, pathlib, typing, re or lxml; they cost more than the
interpreter's own start-up."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import HookEnv

REPO = Path(__file__).resolve().parents[2]
HEAVY = {"configparser", "dataclasses", "pathlib", "typing", "re", "lxml", "logging", "enum", "inspect"}
XML = (b"<domain type='kvm'><name>vm1</name><uuid>5a9c2a4e-7d1b-4b8e-8f57-0c1d2e3f4001</uuid>"
       b"<devices><serial type='pty'/></devices></domain>")
#: prints the exit status and the loaded modules (no json: it imports re)
PROBE = """
import io, sys
sys.path.insert(0, sys.argv[1])
from libvirt_mdev.hook import main
rc = main(sys.argv[3:], io.BytesIO(sys.stdin.buffer.read()), io.BytesIO(), sys.stderr, config_path=sys.argv[2])
print(rc, *sorted(sys.modules))
"""


def _modules(env: HookEnv, op: str, sub: str) -> tuple[int, set[str]]:
    r = subprocess.run([sys.executable, "-I", "-S", "-c", PROBE, str(REPO), str(env.config), "vm1", op, sub, "-"],
                       input=XML, capture_output=True, timeout=60, check=True)
    rc, *modules = r.stdout.decode().split()
    return int(rc), set(modules)


@pytest.mark.parametrize("op, sub", [("prepare", "begin"), ("migrate", "begin"), ("started", "begin"),
                                     ("stopped", "end"), ("release", "end")])
def test_quick_paths_import_nothing_heavy(hook_env: HookEnv, op: str, sub: str) -> None:
    """(``release end`` of a domain with no pending record, on a host with no store yet.)"""
    assert not hook_env.store.exists()
    rc, modules = _modules(hook_env, op, sub)
    heavy = {m.split(".")[0] for m in modules} & HEAVY
    assert rc == 0 and "libvirt_mdev.hook" in modules
    assert not heavy, sorted(heavy)


def test_noop_does_not_even_read_the_config(hook_env: HookEnv) -> None:
    rc, modules = _modules(hook_env, "prepare", "begin")
    assert rc == 0 and "libvirt_mdev.hook" in modules
    assert not {"os", "libvirt_mdev.configfile", "libvirt_mdev.hooklog"} & modules
