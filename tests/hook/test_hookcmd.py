"""install-hook / uninstall-hook: idempotent, never touch a foreign file."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from libvirt_mdev.cli.hookcmd import HOOK_NAME, MARKER, install, repository_hook_text, uninstall
from libvirt_mdev.errors import MdevError, UsageError

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "libvirt_mdev.cli", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO),
                                                      "LIBVIRT_MDEV_CONFIG": "/dev/null"})


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


def test_cli_install_and_uninstall(tmp_path: Path) -> None:
    d = tmp_path / "qemu.d"
    r = cli("install-hook", "--hooks-dir", str(d), "--config", str(tmp_path / "c.conf"))
    assert r.returncode == 0 and r.stdout.startswith(f"installed {d / HOOK_NAME}")
    assert "does not exist yet" in r.stderr
    assert cli("install-hook", "--hooks-dir", str(d), "--config", str(tmp_path / "c.conf")).stdout.startswith("unchanged")
    r = cli("uninstall-hook", "--hooks-dir", str(d))
    assert r.returncode == 0 and r.stdout.startswith("removed")
    assert cli("uninstall-hook", "--hooks-dir", str(d)).stdout.startswith("not installed")
    (d / HOOK_NAME).write_text("foreign")
    r = cli("install-hook", "--hooks-dir", str(d))
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "refusing to overwrite" in r.stderr


def test_cli_help_explains(tmp_path: Path) -> None:
    r = cli("install-hook", "--help")
    assert r.returncode == 0 and "--hooks-dir" in r.stdout and "restart libvirtd" in r.stdout
