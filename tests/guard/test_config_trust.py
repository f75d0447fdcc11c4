"""Config trust (issue 11 item 5) and the config format (issue 15): a config or key file,
or a directory above one, that someone other than root could change is refused in one
line naming the path and the fix — by the loader, the CLI and the hook; inline comments
load; every shipped sample loads; an explicit missing --config is an error."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from libvirt_mdev.cli.hookcmd import install as install_hook
from libvirt_mdev.config import check_trusted_path, load_config
from libvirt_mdev.errors import ConfigError

from .conftest import NOBODY

REPO = Path(__file__).resolve().parents[2]
GOOD = "[libvirt-mdev]\nrequire_annotation = yes\n"


def _conf(tmp_path: Path, text: str = GOOD) -> Path:
    d = tmp_path / "etc"
    d.mkdir(exist_ok=True)
    p = d / "libvirt-mdev.conf"
    p.write_text(text)
    return p


def test_root_owned_config_loads(tmp_path: Path) -> None:
    assert load_config(_conf(tmp_path)).require_annotation is True


@pytest.mark.parametrize("attack", ["owner", "mode", "dir-owner", "dir-mode", "symlink-target"])
def test_config_anyone_else_can_change_is_refused(tmp_path: Path, attack: str) -> None:
    conf = _conf(tmp_path)
    bad = conf
    if attack == "owner":
        os.chown(conf, NOBODY, NOBODY)
    elif attack == "mode":
        conf.chmod(0o666)
    elif attack == "dir-owner":
        os.chown(conf.parent, NOBODY, NOBODY)
        bad = conf.parent
    elif attack == "dir-mode":
        conf.parent.chmod(0o777)
        bad = conf.parent
    else:
        evil = tmp_path / "evil"
        evil.mkdir()
        os.chown(evil, NOBODY, NOBODY)
        target = evil / "real.conf"
        target.write_text(GOOD)
        conf.unlink()
        conf.symlink_to(target)
        bad = evil
    with pytest.raises(ConfigError) as ei:
        load_config(conf)
    msg = str(ei.value)
    assert "\n" not in msg and str(bad) in msg and "fix with: chown root:root" in msg and "chmod go-w" in msg


def test_sticky_root_directory_above_is_fine_but_a_writable_one_is_not(tmp_path: Path) -> None:
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)
    (sticky / "etc").mkdir()
    p = sticky / "etc" / "c.conf"
    p.write_text(GOOD)
    assert load_config(p).require_annotation
    sticky.chmod(0o777)
    with pytest.raises(ConfigError, match="group or others may change it"):
        load_config(p)


@pytest.mark.parametrize("key", ["trusted_keys", "host_key"])
def test_key_files_and_their_directories_are_checked(tmp_path: Path, key: str) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    k = keys / "a.pub"
    k.write_text("libvirt-mdev-ed25519 AAAA x\n")
    conf = _conf(tmp_path, f"[libvirt-mdev]\n{key} = {k}\n")
    load_config(conf)
    os.chown(k, NOBODY, NOBODY)
    with pytest.raises(ConfigError, match=re.escape(f"key file {k} is owned by uid {NOBODY}")):
        load_config(conf)
    os.chown(k, 0, 0)
    keys.chmod(0o777)
    with pytest.raises(ConfigError, match=re.escape(f"{keys} has mode 0777")):
        load_config(conf)
    keys.chmod(0o755)
    check_trusted_path(k, "trusted key")  # the reusable check sign/keys.py can call


def test_cli_refuses_with_one_line_and_exit_9(tmp_path: Path) -> None:
    conf = _conf(tmp_path)
    conf.chmod(0o666)
    r = subprocess.run([sys.executable, "-m", "libvirt_mdev.cli", "--config", str(conf), "guard", "show"],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    assert r.returncode == 9 and r.stderr.count("\n") == 1
    assert r.stderr.startswith(f"libvirt-mdev: configuration file {conf} has mode 0666")


def test_hook_refuses_an_untrusted_config_at_its_gates(tmp_path: Path) -> None:
    conf = _conf(tmp_path)
    hook, _ = install_hook(tmp_path / "qemu.d", conf)
    os.chown(conf, NOBODY, NOBODY)
    xml = b"<domain><name>vm1</name><uuid>5a9c2a4e-7d1b-4b8e-8f57-0c1d2e3f4001</uuid><devices/></domain>"
    for op in ("migrate", "restore"):
        r = subprocess.run([str(hook), "vm1", op, "begin", "-"], input=xml, capture_output=True,
                           env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"}, timeout=60)
        err = r.stderr.decode()
        assert r.returncode == 1 and err.count("\n") == 1, err
        assert f"configuration file {conf} is owned by uid {NOBODY}, not root" in err
    r = subprocess.run([str(hook), "vm1", "prepare", "begin", "-"], input=xml, capture_output=True,
                       env={"PATH": "/usr/bin:/bin"}, timeout=60)
    assert (r.returncode, r.stderr) == (0, b"")  # not a gate: never blocks other operations


def test_inline_comments_are_comments(tmp_path: Path) -> None:
    conf = _conf(tmp_path, "[libvirt-mdev]\nmode = token   # forward tokens\nstore = /srv/state\t# the store\n"
                           "proxy_listen =          # empty\nguard_ports = 49300 49400-49410  # proxies\n")
    c = load_config(conf)
    assert (c.mode, str(c.store), c.proxy_listen, c.guard_ports) == ("token", "/srv/state", "", ((49300, 49300),
                                                                                               (49400, 49410)))


def test_example_config_loads() -> None:
    c = load_config(REPO / "examples" / "libvirt-mdev.conf")
    assert c.mode == "splice" and c.proxy_listen == "10.0.0.2:49300" and c.guard_ports == ((49300, 49300),)


def test_every_readme_and_docs_config_sample_loads(tmp_path: Path) -> None:
    samples = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for m in re.finditer(r"((?:^    .*\n)*^    \[libvirt-mdev\]\n(?:^    .*\n)+)", doc.read_text(), re.M):
            samples.append((doc.name, textwrap.dedent(m.group(1))))
    assert any(name == "README.md" for name, _ in samples)
    for i, (_, text) in enumerate(samples):
        p = tmp_path / f"sample{i}.conf"
        p.write_text(text)
        load_config(p)  # raises on any bad key or value


def test_explicit_missing_config_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.conf")


def test_bad_guard_keys(tmp_path: Path) -> None:
    for text, words in [("guard_ports = 70000", "within 1-65535"), ("guard_ports = x", "not a port"),
                        ("migration_socket_dir = rel", "absolute"), ("log_level = loud", "log_level")]:
        with pytest.raises(ConfigError, match=words):
            load_config(_conf(tmp_path, f"[libvirt-mdev]\n{text}\n"))


def test_dev_null_is_an_empty_config() -> None:
    assert load_config("/dev/null").mode == "splice"
