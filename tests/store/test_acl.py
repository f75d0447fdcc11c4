"""Unit tests of the checked file layer (libvirt_mdev/store/acl.py)."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from libvirt_mdev.errors import StoreAccessError, StoreError
from libvirt_mdev.store.acl import SecureDir, validate_name
from libvirt_mdev.store.output import open_sink

from .conftest import NOBODY, needs_root


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "/abs", "../x", "a\x00b", "a\nb",
                                  "a b", "x" * 201, "é", "a\\b"])
def test_validate_name_refuses(name: str) -> None:
    with pytest.raises(StoreAccessError, match="refusing file name"):
        validate_name(name)


def test_validate_name_refuses_non_text() -> None:
    with pytest.raises(StoreAccessError):
        validate_name(b"abc")


@pytest.mark.parametrize("name", ["a", ".lock", ".tmp-0123abcd.state", "A-b_c.9", "x" * 200])
def test_validate_name_accepts(name: str) -> None:
    assert validate_name(name) == name


def test_create_gives_0700_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        with SecureDir.open(tmp_path / "d", create=True) as d:
            assert stat.S_IMODE(os.fstat(d.fd).st_mode) == 0o700
            fd, name = d.create_temp()
            assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o600
            d.discard_temp(fd, name)
    finally:
        os.umask(old)
    os.umask(0o077)
    try:
        with SecureDir.open(tmp_path / "e", create=True) as d:
            d.write_atomic("f", b"1")
            assert stat.S_IMODE(os.stat(tmp_path / "e" / "f").st_mode) == 0o600
    finally:
        os.umask(old)


def test_create_does_not_fix_an_existing_bad_directory(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir(mode=0o755)
    os.chmod(tmp_path / "d", 0o755)
    with pytest.raises(StoreAccessError, match="mode 0755"):
        SecureDir.open(tmp_path / "d", create=True)
    assert stat.S_IMODE(os.stat(tmp_path / "d").st_mode) == 0o755


def test_open_missing_directory_says_how_to_create_it(tmp_path: Path) -> None:
    with pytest.raises(StoreAccessError, match="does not exist.*0700"):
        SecureDir.open(tmp_path / "nope")


def test_open_a_file_as_directory(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(StoreAccessError, match="not a directory"):
        SecureDir.open(tmp_path / "f")


def test_write_atomic_replaces_a_planted_symlink_without_following_it(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    with SecureDir.open(tmp_path / "d", create=True) as d:
        os.symlink(victim, tmp_path / "d" / "rec")
        d.write_atomic("rec", b"new")
        assert victim.read_text() == "precious"
        assert not os.path.islink(tmp_path / "d" / "rec")
        assert d.read_small("rec") == b"new"


def test_write_atomic_without_replace_refuses_existing(tmp_path: Path) -> None:
    with SecureDir.open(tmp_path / "d", create=True) as d:
        d.write_atomic("once", b"1", replace=False)
        with pytest.raises(StoreError, match="already exists"):
            d.write_atomic("once", b"2", replace=False)
        assert d.read_small("once") == b"1"
        assert d.listdir() == ["once"]  # no temp left behind


def test_read_small_refuses_a_directory_and_oversize(tmp_path: Path) -> None:
    with SecureDir.open(tmp_path / "d", create=True) as d:
        os.mkdir(tmp_path / "d" / "sub", 0o600)
        with pytest.raises(StoreAccessError, match="not a regular file"):
            d.read_small("sub")
        d.write_atomic("big", b"x" * 100)
        with pytest.raises(StoreAccessError, match="larger than 10 bytes"):
            d.read_small("big", limit=10)
        assert d.read_small("absent", missing_ok=True) is None
        with pytest.raises(StoreError, match="does not exist"):
            d.read_small("absent")


@needs_root
def test_lock_file_planted_as_symlink_or_foreign_is_refused(tmp_path: Path) -> None:
    with SecureDir.open(tmp_path / "d", create=True) as d:
        os.symlink(tmp_path / "elsewhere", tmp_path / "d" / ".lock")
        with pytest.raises(StoreAccessError, match="symlink"):
            with d.locked(".lock", exclusive=True):
                pass
        assert not (tmp_path / "elsewhere").exists()
        os.unlink(tmp_path / "d" / ".lock")
        with d.locked(".lock", exclusive=True):
            pass
        os.chown(tmp_path / "d" / ".lock", NOBODY, -1)
        with pytest.raises(StoreAccessError, match="uid 65534"):
            with d.locked(".lock", exclusive=False):
                pass


def test_unlink_never_follows(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("x")
    with SecureDir.open(tmp_path / "d", create=True) as d:
        os.symlink(victim, tmp_path / "d" / "l")
        assert d.unlink("l")
        assert victim.exists()
        assert not d.unlink("l", missing_ok=True)


def test_open_sink_refuses_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("x")
    os.symlink(victim, tmp_path / "sink")
    with pytest.raises(StoreAccessError, match="symlink"):
        open_sink(tmp_path / "sink")
    assert victim.read_text() == "x"
    with pytest.raises(StoreError, match="cannot open sink"):
        open_sink(tmp_path / "no" / "such" / "dir")


@needs_root
def test_non_root_store_creation_is_one_line_not_an_internal_error(tmp_path: Path) -> None:
    """Issue 12: non-root store creation ended in 'internal error (PermissionError)', exit 70."""
    import json as _json

    from libvirt_mdev.errors import exit_code_for, one_line
    from libvirt_mdev.store import Store

    tmp_path.chmod(0o777)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child drops to nobody (everything it needs is imported already)
        os.close(r)
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                with Store.open(tmp_path / "store", create=True):
                    out = {"opened": True}
            except BaseException as exc:
                out = {"type": type(exc).__name__, "code": exit_code_for(exc), "line": one_line(exc)}
            os.write(w, _json.dumps(out).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as fh:
        got = _json.loads(fh.read())
    os.waitpid(pid, 0)
    assert got["type"] == "StoreAccessError" and got["code"] == 4, got
    assert "run as root" in got["line"] and "\n" not in got["line"]
    assert not (tmp_path / "store").exists()
