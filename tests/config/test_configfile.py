"""The configuration file reader (:mod:`libvirt_mdev.configfile`): the INI subset it
reads, the lines it refuses, and the agreement between its quick :class:`Settings`
and the full :class:`Config` (issue 15: the hook reads the file without configparser
or dataclasses, so the two must not drift apart)."""
from __future__ import annotations

from pathlib import Path

import pytest

from libvirt_mdev.config import Config, config_from_values, load_config
from libvirt_mdev.configfile import KNOWN_KEYS, Settings, parse_ini, read_file
from libvirt_mdev.errors import ConfigError


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "libvirt-mdev.conf"
    p.write_text(text)
    return p


def test_every_config_field_is_a_known_key() -> None:
    fields = set(Config.__dataclass_fields__) - {"source"}
    assert fields == KNOWN_KEYS


def test_the_subset_it_reads() -> None:
    text = ("# comment\n; another\n\n[libvirt-mdev]\nMode = token\nstore: /srv/state  # inline\n"
            "proxy_listen =\nlog_file = /var/log/a#b\n")
    assert parse_ini(text, "f") == {"mode": "token", "store": "/srv/state", "proxy_listen": "",
                                    "log_file": "/var/log/a#b"}


@pytest.mark.parametrize("text, words", [
    ("mode = splice\n", "line 1: 'mode = splice' before the [libvirt-mdev] section header"),
    ("[libvirt-mdev]\n[other]\n", "line 2: unknown section [other]"),
    ("[libvirt-mdev]\n[libvirt-mdev]\n", "line 2: section [libvirt-mdev] given twice"),
    ("[libvirt-mdev]\nmode = splice\nmode = token\n", "line 3: key 'mode' given twice"),
    ("[libvirt-mdev]\ntrusted_keys = /a\n  /b\n", "line 3: indented line '/b'"),
    ("[libvirt-mdev]\narm_all\n", "line 2: expected 'key = value', not 'arm_all'"),
    ("[libvirt-mdev]\n= yes\n", "line 2: a value without a key"),
])
def test_lines_it_refuses(text: str, words: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_ini(text, "f")
    assert str(ei.value) == f"f, {words}" or str(ei.value).startswith(f"f, {words}")
    assert "\n" not in str(ei.value)


def test_settings_defaults_are_configs_defaults() -> None:
    quick, full = Settings({}, "x"), Config()
    for name in ("arm_all", "log_level", "store", "runtime_dir", "qemu_run_dir", "log_file"):
        want = getattr(full, name)
        assert getattr(quick, name) == (str(want) if isinstance(want, Path) else want), name


def test_settings_and_config_read_the_same_values(tmp_path: Path) -> None:
    conf = _write(tmp_path, f"[libvirt-mdev]\narm_all = yes\nlog_level = debug\nruntime_dir = {tmp_path}/run\n"
                            f"qemu_run_dir = {tmp_path}/q\nlog_file = {tmp_path}/log\nguard_ports = 49300\n"
                            f"trusted_keys = {tmp_path}/a.pub, {tmp_path}/b.pub\nretention = 5\n")
    quick, full = Settings.load(str(conf)), load_config(conf)
    assert (quick.arm_all, quick.log_level) == (full.arm_all, full.log_level) == (True, "debug")
    assert (quick.runtime_dir, quick.qemu_run_dir, quick.log_file) == \
        (str(full.runtime_dir), str(full.qemu_run_dir), str(full.log_file))
    assert full.trusted_keys == (tmp_path / "a.pub", tmp_path / "b.pub") and full.retention == 5
    assert config_from_values(read_file(str(conf)), str(conf)) == full
    assert full.source == str(conf)


def test_an_empty_or_sectionless_file_is_all_defaults(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path, "# nothing set\n")) == Config()
    assert load_config(_write(tmp_path, "[libvirt-mdev]\n")) == Config()


def test_bad_values_name_the_file_and_key(tmp_path: Path) -> None:
    for text, words in [("mode = fast", "mode must be one of splice, token, not 'fast'"),
                        ("arm_all = maybe", "arm_all must be yes or no"),
                        ("retention = -1", "retention must not be negative"),
                        ("store = rel", "store must be an absolute path"),
                        ("match_driver_version = newest", "match_driver_version must be one of"),
                        ("colour = blue", "unknown key 'colour'")]:
        conf = _write(tmp_path, f"[libvirt-mdev]\n{text}\n")
        with pytest.raises(ConfigError, match=f"^{conf}: {words}"):
            load_config(conf)
