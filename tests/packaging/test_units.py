"""The shipped systemd units run commands that exist once libvirt-mdev is installed.

The units run ``libvirt-mdev`` unqualified: systemd looks it up in its fixed search
path, where the Debian package puts ``/usr/bin/libvirt-mdev`` (and a checkout's admin
links ``.venv/bin/libvirt-mdev`` into ``/usr/local/bin``, examples/systemd/README).
"""
from __future__ import annotations

import configparser
import re
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
UNITS = sorted(p for p in (REPO / "examples" / "systemd").iterdir() if p.suffix in (".service", ".socket"))
#: systemd's search path for unqualified Exec*= commands (systemd.service(5), "Command lines")
SYSTEMD_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _console_script() -> str:
    cfg = configparser.ConfigParser()
    cfg.read(REPO / "setup.cfg")
    return cfg["options.entry_points"]["console_scripts"].strip().split("=")[0].strip()


def _exec_commands(unit: Path) -> list[str]:
    return re.findall(r"^Exec\w*=[-@:+!]*(\S+)", unit.read_text(), re.MULTILINE)


def test_units_run_the_console_script_or_an_existing_tool() -> None:
    assert len(UNITS) >= 4
    script = _console_script()
    seen_script = False
    for unit in UNITS:
        for cmd in _exec_commands(unit):
            if cmd == script:
                seen_script = True
            elif cmd.startswith("/"):
                assert Path(cmd).exists(), f"{unit.name} runs {cmd}, which does not exist"
            else:
                assert shutil.which(cmd, path=SYSTEMD_PATH), f"{unit.name} runs {cmd}, not in systemd's PATH"
    assert seen_script


def test_debian_installs_every_unit() -> None:
    linked = {p.name.removeprefix("libvirt-mdev.") for p in (REPO / "debian").iterdir() if p.is_symlink()}
    assert linked == {u.name for u in UNITS}
    for p in (REPO / "debian").iterdir():
        if p.is_symlink():
            assert p.resolve() == (REPO / "examples" / "systemd" / p.name.removeprefix("libvirt-mdev.")).resolve()
