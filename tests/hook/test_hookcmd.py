"""install-hook / uninstall-hook: idempotent, never touch a foreign file."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from libvirt_mdev.cli.hookcmd import HOOK_NAME, MARKER, install, repository_hook_text, uninstall
from libvirt_mdev.errors import MdevError, UsageError
from tests.harness.cli import run_cli

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, config="/dev/null", clean_env=True)


def test_repository_hook_matches_the_template() -> None:
    path = REPO / "hooks" / "qemu"
    assert path.read_text() == repository_hook_text()
    assert os.access(path, os.X_OK)


def test_install_bakes_interpreter_config_and_import_path(tmp_path: Path) -> None:
    path, state = install(tmp_path / "qemu.d", Path("/etc/x.conf"))
    assert state == "installed" and path == tmp_path / "qemu.d" / HOOK_NAME
    assert (path.stat().st_mode & 0o777) == 0o755
    text = path.read_text()
    assert text.splitlines()[0] == f"#!{sys.executable} -IS"
    assert "CONFIG = '/etc/x.conf'" in text and repr(str(REPO)) in text and MARKER in text
    compile(text, str(path), "exec")


def test_install_is_idempotent_and_updates(tmp_path: Path) -> None:
    d = tmp_path / "qemu.d"
    install(d, Path("/etc/a.conf"))
    assert install(d, Path("/etc/a.conf"))[1] == "unchanged"
    assert install(d, Path("/etc/b.conf"))[1] == "updated"
    assert "CONFIG = '/etc/b.conf'" in (d / HOOK_NAME).read_text()
    assert sorted(p.name for p in d.iterdir()) == [HOOK_NAME]  # no temp files left


def test_install_refuses_foreign_file_and_relative_config(tmp_path: Path) -> None:
    d = tmp_path / "qemu.d"
    d.mkdir()
    (d / HOOK_NAME).write_text("#!/bin/sh\necho theirs\n")
    with pytest.raises(MdevError, match="not a libvirt-mdev hook; refusing to overwrite"):
        install(d, Path("/etc/a.conf"))
    assert (d / HOOK_NAME).read_text() == "#!/bin/sh\necho theirs\n"
    with pytest.raises(MdevError, match="not a libvirt-mdev hook; not removing"):
        uninstall(d)
    with pytest.raises(UsageError, match="absolute"):
        install(tmp_path / "other", Path("rel.conf"))


def test_install_refuses_a_symlink(tmp_path: Path) -> None:
    d = tmp_path / "qemu.d"
    install(d, Path("/etc/a.conf"))
    real = tmp_path / "real"
    (d / HOOK_NAME).rename(real)
    (d / HOOK_NAME).symlink_to(real)  # even one pointing at our own text
    with pytest.raises(MdevError):
        install(d, Path("/etc/a.conf"))


def test_uninstall_is_idempotent(tmp_path: Path) -> None:
    d = tmp_path / "qemu.d"
    install(d, Path("/etc/a.conf"))
    assert uninstall(d)[1] == "removed"
    assert not (d / HOOK_NAME).exists()
    assert uninstall(d)[1] == "absent"


def _baked(hook: Path) -> str:
    return next(line for line in hook.read_text().splitlines() if line.startswith("CONFIG = "))


def test_cli_install_and_uninstall(tmp_path: Path) -> None:
    d = tmp_path / "qemu.d"
    conf = tmp_path / "c.conf"
    conf.write_text("[libvirt-mdev]\n")
    r = cli("install-hook", "--hooks-dir", str(d), "--config", str(conf))
    assert r.returncode == 0 and r.stdout.startswith(f"installed {d / HOOK_NAME}")
    assert _baked(d / HOOK_NAME) == f"CONFIG = {str(conf)!r}"
    again = cli("install-hook", "--hooks-dir", str(d), "--config", str(conf))
    assert again.stdout.startswith("unchanged")
    r = cli("uninstall-hook", "--hooks-dir", str(d))
    assert r.returncode == 0 and r.stdout.startswith("removed")
    assert cli("uninstall-hook", "--hooks-dir", str(d)).stdout.startswith("not installed")
    (d / HOOK_NAME).write_text("foreign")
    r = cli("install-hook", "--hooks-dir", str(d))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "refusing to overwrite" in r.stderr


def test_cli_help_explains(tmp_path: Path) -> None:
    r = cli("install-hook", "--help")
    assert r.returncode == 0 and "--hooks-dir" in r.stdout and "restart libvirtd" in r.stdout


def test_config_means_the_same_before_and_after_install_hook(tmp_path: Path) -> None:
    """Issue 15: one meaning for --config: the file libvirt-mdev reads, which install-hook
    bakes into the hook, whether given before or after the command (or in the environment)."""
    d = tmp_path / "qemu.d"
    conf, other = tmp_path / "a.conf", tmp_path / "b.conf"
    conf.write_text("[libvirt-mdev]\n")
    other.write_text("[libvirt-mdev]\n")
    r = cli("--config", str(conf), "install-hook", "--hooks-dir", str(d))
    assert r.returncode == 0 and f"config {conf})" in r.stdout, r.stderr
    assert _baked(d / HOOK_NAME) == f"CONFIG = {str(conf)!r}"
    # the same file both ways is fine; a relative path is baked absolute
    r = cli("--config", str(conf), "install-hook", "--hooks-dir", str(d), "--config", os.path.relpath(conf, REPO))
    assert r.returncode == 0 and r.stdout.startswith("unchanged"), r.stderr
    # $LIBVIRT_MDEV_CONFIG (here /dev/null) is what the CLI reads, so it is what the hook gets...
    r = cli("install-hook", "--hooks-dir", str(d))
    assert r.returncode == 0 and _baked(d / HOOK_NAME) == "CONFIG = '/dev/null'"
    # ...unless a --config on the command line names another file, as for every command
    r = cli("install-hook", "--hooks-dir", str(d), "--config", str(other))
    assert r.returncode == 0 and _baked(d / HOOK_NAME) == f"CONFIG = {str(other)!r}"
    # two different files: a usage error, nothing changed
    r = cli("--config", str(conf), "install-hook", "--hooks-dir", str(d), "--config", str(other))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--config is given twice" in r.stderr
    assert _baked(d / HOOK_NAME) == f"CONFIG = {str(other)!r}"


@pytest.mark.parametrize("where", ["before", "after"])
def test_an_explicit_missing_config_is_an_error(tmp_path: Path, where: str) -> None:
    d = tmp_path / "qemu.d"
    missing = ["--config", str(tmp_path / "missing.conf")]
    args = [*missing, "install-hook", "--hooks-dir", str(d)] if where == "before" else \
        ["install-hook", "--hooks-dir", str(d), *missing]
    r = cli(*args)
    assert r.returncode == 9 and r.stderr.count("\n") == 1, r.stderr
    assert f"configuration file {tmp_path / 'missing.conf'} does not exist" in r.stderr
    assert not (d / HOOK_NAME).exists()


def test_the_default_config_may_be_missing(tmp_path: Path) -> None:
    """A host with no config file yet: the hook uses the defaults until one is written."""
    d = tmp_path / "qemu.d"
    r = subprocess.run([sys.executable, "-m", "libvirt_mdev.cli", "install-hook", "--hooks-dir", str(d)],
                       cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
                       env={"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO)})
    assert r.returncode == 0 and _baked(d / HOOK_NAME) == "CONFIG = '/etc/libvirt/libvirt-mdev.conf'"
    if not os.path.exists("/etc/libvirt/libvirt-mdev.conf"):
        assert "does not exist yet; the hook uses the defaults" in r.stderr
