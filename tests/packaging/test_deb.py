"""The Debian package, built from this checkout with the standard tools, and what it holds.

Builds ``libvirt-mdev_*_all.deb`` once (``dpkg-buildpackage -us -uc -b`` in a copy of
the tree: the build writes next to its source directory) and checks: the files a host
needs (command, man pages for every command, completion, units, commented conffile),
nothing that must not ship (testkit/, tests/), Debian's own Python packages as
dependencies, the maintainer scripts' hook handling, and lintian without errors.
The install into a fresh Debian root (libvirtd, virsh save/restore, purge) is
``tests/packaging/root_check.sh`` (docs/packaging.md).

Needs (Debian): dpkg-dev debhelper dh-python pybuild-plugin-pyproject python3-all
python3-setuptools python3-click python3-cryptography python3-libvirt python3-lxml lintian.
"""
from __future__ import annotations

import gzip
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from libvirt_mdev.cli import COMMANDS
from libvirt_mdev.config import Config, load_config

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
BUILD_TOOLS = {"dpkg-buildpackage": "dpkg-dev", "dh": "debhelper", "dh_python3": "dh-python",
               "lintian": "lintian"}
BUILD_MODULES = {"/usr/share/dh-python/dhpython/build/plugin_pyproject.py": "pybuild-plugin-pyproject"}
#: a clean environment: the build must use Debian's /usr/bin/python3, not a venv or pyenv one
ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root", "LC_ALL": "C.UTF-8"}
SKIP_DIRS = {".git", ".venv", "__pycache__", ".pytest_cache", ".hypothesis", "build", "dist", ".pybuild"}


def _missing_tools() -> list[str]:
    missing = [pkg for tool, pkg in BUILD_TOOLS.items() if shutil.which(tool, path=ENV["PATH"]) is None]
    missing += [pkg for path, pkg in BUILD_MODULES.items() if not Path(path).exists()]
    probe = subprocess.run(["/usr/bin/python3", "-c", "import click, lxml, libvirt, cryptography"], check=False,
                           capture_output=True, env=ENV)
    if probe.returncode != 0:
        missing.append("python3-click python3-lxml python3-libvirt python3-cryptography")
    return missing


def _copy_tree(dest: Path) -> None:
    def ignore(directory: str, names: list[str]) -> set[str]:
        return {n for n in names if n in SKIP_DIRS or n.endswith(".egg-info")
                or (Path(directory) == REPO / "debian" and n in ("generated", "libvirt-mdev", ".debhelper"))}
    shutil.copytree(REPO, dest, symlinks=True, ignore=ignore)


@pytest.fixture(scope="module")
def deb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    missing = _missing_tools()
    if missing:
        pytest.fail(f"cannot build the Debian package: install {' '.join(missing)} "
                    f"(or set LIBVIRT_MDEV_NO_E2E=1 to skip)", pytrace=False)
    base = tmp_path_factory.mktemp("deb")
    src = base / "libvirt-mdev"
    _copy_tree(src)
    r = subprocess.run(["dpkg-buildpackage", "-us", "-uc", "-b"], check=False, cwd=src, env=ENV, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    debs = sorted(base.glob("libvirt-mdev_*_all.deb"))
    assert len(debs) == 1, debs
    yield debs[0]


def _dpkg_deb(*args: str) -> str:
    return subprocess.run(["dpkg-deb", *args], capture_output=True, text=True, check=True, env=ENV).stdout


@pytest.fixture(scope="module")
def files(deb: Path) -> set[str]:
    out = set()
    for line in _dpkg_deb("-c", str(deb)).splitlines():
        name = line.split()[5]
        if not name.endswith("/"):
            out.add(name.removeprefix("."))
    return out


@pytest.fixture(scope="module")
def unpacked(deb: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("unpacked")
    subprocess.run(["dpkg-deb", "-R", str(deb), str(root)], check=True, env=ENV)
    return root


def _field(deb: Path, name: str) -> list[str]:
    value = _dpkg_deb("-f", str(deb), name)
    return [re.split(r"[ (]", item.strip())[0] for item in value.split(",") if item.strip()]


def test_installs_the_command_man_pages_completion_and_units(files: set[str]) -> None:
    assert "/usr/bin/libvirt-mdev" in files
    assert "/usr/lib/python3/dist-packages/libvirt_mdev/cli/__init__.py" in files
    for verb, (module, _) in COMMANDS.items():
        if (REPO / (module.replace(".", "/") + ".py")).exists():
            assert f"/usr/share/man/man1/libvirt-mdev-{verb}.1.gz" in files, verb
    assert "/usr/share/man/man1/libvirt-mdev.1.gz" in files
    assert "/usr/share/man/man1/libvirt-mdev-store-verify.1.gz" in files  # a group's subcommands too
    assert "/usr/share/man/man5/libvirt-mdev.conf.5.gz" in files
    assert "/usr/share/bash-completion/completions/libvirt-mdev" in files
    units = {Path(f).name for f in files if re.match(r"^(/usr)?/lib/systemd/system/", f)}
    assert units == {p.name for p in (REPO / "examples" / "systemd").iterdir() if p.suffix in (".service", ".socket")}
    assert "/usr/share/doc/libvirt-mdev/copyright" in files


def test_ships_no_test_code(files: set[str]) -> None:
    leaked = [f for f in files if re.search(r"/(testkit|tests)/|/conftest\.py$", f)]
    assert not leaked


def test_depends_on_debians_python_packages(deb: Path) -> None:
    depends = _field(deb, "Depends")
    for pkg in ("python3-libvirt", "python3-lxml", "python3-click", "python3-cryptography"):
        assert pkg in depends, depends
    assert "nftables" in _field(deb, "Recommends") + depends
    assert not any("pip" in d for d in depends)


def test_conffile_is_commented_and_loads_as_the_defaults(unpacked: Path) -> None:
    conffiles = (unpacked / "DEBIAN" / "conffiles").read_text().split()
    assert "/etc/libvirt/libvirt-mdev.conf" in conffiles
    conf = unpacked / "etc/libvirt/libvirt-mdev.conf"
    text = conf.read_text()
    assert not [ln for ln in text.splitlines() if re.match(r"^\s*[a-z_]+\s*=", ln)], "a setting is not commented"
    assert "# mode = splice" in text and "[libvirt-mdev]" in text
    assert load_config(conf) == Config()
    # uncommenting a documented line gives a valid file
    uncommented = re.sub(r"(?m)^# (mode|retention|require_annotation) = ", r"\1 = ", text)
    edited = conf.with_name("edited.conf")
    edited.write_text(uncommented)
    assert load_config(edited).mode == "splice"


def test_maintainer_scripts_install_and_remove_the_hook_and_keep_the_store(unpacked: Path) -> None:
    postinst = (unpacked / "DEBIAN/postinst").read_text()
    prerm = (unpacked / "DEBIAN/prerm").read_text()
    postrm = (unpacked / "DEBIAN/postrm").read_text()
    assert "libvirt-mdev install-hook" in postinst and "restart" in postinst
    code = re.sub(r'"[^"]*"', '""', re.sub(r"(?m)#.*$", "", postinst))  # messages may *tell* the admin to
    assert not re.search(r"systemctl (re)?start|invoke-rc.d \S+ (re)?start|deb-systemd-invoke", code)
    assert "uninstall-hook" in prerm
    purge = postrm.split("purge)", 1)[1]
    assert "rm -f \"$HOOK\"" in purge
    store_rm = [ln for ln in purge.splitlines() if "mdev-state" in ln and "rm " in ln]
    assert store_rm and all("LIBVIRT_MDEV_PURGE_STORE" in purge.split(ln)[0].rsplit("if ", 1)[-1] for ln in store_rm)


def test_the_packaged_command_installs_a_hook_for_debians_python(unpacked: Path, tmp_path: Path) -> None:
    """The extracted package, run by /usr/bin/python3 as postinst runs it: the hook it
    writes names that interpreter and the package's import root."""
    site = unpacked / "usr/lib/python3/dist-packages"
    env = dict(ENV, PYTHONPATH=str(site))
    r = subprocess.run(["/usr/bin/python3", str(unpacked / "usr/bin/libvirt-mdev"), "install-hook",
                        "--hooks-dir", str(tmp_path / "qemu.d")], check=False, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    hook = (tmp_path / "qemu.d" / "50-libvirt-mdev").read_text()
    assert hook.splitlines()[0] == "#!/usr/bin/python3 -IS"
    assert repr(str(site)) in hook
    v = subprocess.run(["/usr/bin/python3", str(unpacked / "usr/bin/libvirt-mdev"), "--version"], check=False, env=env,
                       capture_output=True, text=True)
    assert v.returncode == 0 and re.search(r"version \d+\.\d+", v.stdout), v


def test_man_pages_render_without_warnings(unpacked: Path) -> None:
    if shutil.which("groff", path=ENV["PATH"]) is None:
        pytest.skip("groff not installed (man-db/groff-base)")
    pages = sorted((unpacked / "usr/share/man").glob("man*/*.gz"))
    assert len(pages) >= 10
    for page in pages:
        roff = gzip.decompress(page.read_bytes())
        r = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z"], check=False, input=roff, capture_output=True,
                           env=ENV)
        assert r.returncode == 0 and not r.stderr, (page.name, r.stderr[:500])


def test_lintian_reports_no_errors_or_warnings(deb: Path) -> None:
    changes = sorted(deb.parent.glob("libvirt-mdev_*.changes"))
    r = subprocess.run(["lintian", "--allow-root", "--fail-on", "error,warning", str(changes[0])], check=False,
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr


def test_build_is_reproducible_in_its_generated_parts(unpacked: Path) -> None:
    """Man pages carry the changelog's date (SOURCE_DATE_EPOCH), not the build time."""
    page = gzip.decompress((unpacked / "usr/share/man/man1/libvirt-mdev.1.gz").read_bytes()).decode()
    changelog = (REPO / "debian" / "changelog").read_text()
    m = re.search(r"^ -- .*>  \w+, (\d+) (\w+) (\d{4})", changelog, re.MULTILINE)
    assert m
    th = re.search(r'^\.TH "LIBVIRT-MDEV" "1" "(\d{4})-(\d\d)-(\d\d)"', page, re.MULTILINE)
    assert th and th.group(1) == m.group(3) and int(th.group(3)) == int(m.group(1))

