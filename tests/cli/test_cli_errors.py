"""The rough edges a new admin hits first: usage errors, --config, keygen, --version,
completion, and the exit-code table the README and the man page repeat."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from libvirt_mdev.errors import exit_code_table

REPO = Path(__file__).resolve().parents[2]
Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def run(tmp_path: Path) -> Run:
    def go(*args: str, env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path), "PYTHONPATH": str(REPO),
               "LC_ALL": "C.UTF-8", **(env_extra or {})}
        return subprocess.run([sys.executable, "-m", "libvirt_mdev.cli", *args], check=False, cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    return go


def one_error_line(r: subprocess.CompletedProcess[str]) -> str:
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("libvirt-mdev: "), lines[0]
    return lines[0]


@pytest.mark.parametrize("args, words", [
    (["inspect"], ["inspect: Missing argument 'PATH'", "libvirt-mdev inspect --help"]),
    (["no-such-verb"], ["No such command 'no-such-verb'", "libvirt-mdev --help"]),
    (["inspect", "--bogus", "x"], ["inspect: No such option", "--bogus"]),
    (["store", "gc", "--store"], ["store gc: Option '--store' requires an argument", "libvirt-mdev store gc --help"]),
    (["store", "nope"], ["store: No such command 'nope'"]),
])
def test_usage_errors_are_one_line_naming_the_help(run: Run, args: list[str], words: list[str]) -> None:
    r = run(*args)
    assert r.returncode == 2
    line = one_error_line(r)
    for w in words:
        assert w in line
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_usage_error_with_json_is_parseable(run: Run) -> None:
    r = run("inspect", "--json")
    assert r.returncode == 2
    one_error_line(r)
    err = json.loads(r.stdout)["error"]
    assert err["kind"] == "usage" and err["exit_code"] == 2 and "PATH" in err["message"]


def test_a_named_config_that_does_not_exist_is_an_error_whatever_the_command(run: Run, tmp_path: Path) -> None:
    store = tmp_path / "store"
    for args, env in [(["--config", "/nonexistent/l.conf", "store", "list", "--store", str(store)], None),
                      (["store", "list", "--store", str(store)], {"LIBVIRT_MDEV_CONFIG": "/nonexistent/l.conf"}),
                      (["--config", str(tmp_path), "store", "list", "--store", str(store)], None)]:
        r = run(*args, env_extra=env)
        assert r.returncode == 9, r.stderr
        line = one_error_line(r)
        assert "/nonexistent/l.conf does not exist" in line or "is a directory" in line
        assert not store.exists()  # refused before the command did anything


def test_a_named_invalid_config_is_an_error_even_when_unused(run: Run, tmp_path: Path) -> None:
    bad = tmp_path / "bad.conf"
    bad.write_text("[libvirt-mdev]\nno_such_key = 1\n")
    r = run("--config", str(bad), "inspect", "/dev/null")
    assert r.returncode == 9
    assert "unknown key 'no_such_key'" in one_error_line(r)


def test_a_named_valid_config_is_used(run: Run, tmp_path: Path) -> None:
    conf = tmp_path / "ok.conf"
    conf.write_text(f"[libvirt-mdev]\nstore = {tmp_path / 's'}\n")
    r = run("--config", str(conf), "store", "list", "--json")
    assert r.returncode in (0, 4), r.stderr  # the store is read from the named file
    assert str(tmp_path / "s") in r.stdout + r.stderr


def test_keygen_refuses_an_existing_key_with_exit_1_and_names_force(run: Run, tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("keygen writes a root-owned key directory")
    d = tmp_path / "keys"
    assert run("keygen", "--out", str(d)).returncode == 0
    before = (d / "host.key").read_bytes()
    r = run("keygen", "--out", str(d))
    assert r.returncode == 1
    line = one_error_line(r)
    assert "already exists" in line and "--force" in line
    assert (d / "host.key").read_bytes() == before
    d.chmod(0o755)
    r = run("keygen", "--out", str(d), "--force")
    assert r.returncode == 4
    line = one_error_line(r)
    assert "directory directory" not in line and f"host key directory {d} has mode 0755" in line


def test_version_is_the_package_version(run: Run) -> None:
    cfg = (REPO / "setup.cfg").read_text()
    version = re.search(r"^version = (\S+)", cfg, re.MULTILINE)
    assert version
    r = run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"libvirt-mdev, version {version.group(1)}"


def test_shell_completion_lists_lazy_commands_and_subcommands(run: Run) -> None:
    r = run(env_extra={"_LIBVIRT_MDEV_COMPLETE": "bash_complete", "COMP_WORDS": "libvirt-mdev st", "COMP_CWORD": "1"})
    assert r.returncode == 0
    assert set(r.stdout.split()) == {"plain,strip", "plain,store"}
    r = run(env_extra={"_LIBVIRT_MDEV_COMPLETE": "bash_complete", "COMP_WORDS": "libvirt-mdev store v",
                       "COMP_CWORD": "2"})
    assert r.stdout.split() == ["plain,verify"]
    r = run(env_extra={"_LIBVIRT_MDEV_COMPLETE": "bash_source"})
    assert "_libvirt_mdev_completion" in r.stdout and "complete " in r.stdout


def test_exit_code_table_matches_the_readme(run: Run) -> None:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Exit status", 1)[1].split("\n## ", 1)[0]
    documented = {int(m.group(1)) for m in re.finditer(r"^\| (\d+) \|", section, re.MULTILINE)}
    assert documented - {0} == set(exit_code_table())
    assert "exit status" in run("--help").stdout.lower()


def test_a_bare_group_shows_its_help_not_a_squashed_line(run: Run) -> None:
    for args in ([], ["store"]):
        r = run(*args)
        assert r.returncode in (0, 2)  # click < 8.2 exits 0, later versions 2
        out = r.stdout + r.stderr
        assert out.startswith("Usage: libvirt-mdev") and "\nCommands:\n" in out


def test_the_default_path_named_explicitly_may_be_missing(run: Run, tmp_path: Path) -> None:
    """Like load_config: naming /etc/libvirt/libvirt-mdev.conf means "the defaults" when it
    is absent (scripts pass it on hosts without a file); any other missing name is an error."""
    if Path("/etc/libvirt/libvirt-mdev.conf").exists():
        pytest.skip("this machine has /etc/libvirt/libvirt-mdev.conf")
    r = run("--config", "/etc/libvirt/libvirt-mdev.conf", "store", "list", "--store", str(tmp_path / "s"))
    assert r.returncode != 9, r.stderr
