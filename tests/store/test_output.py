"""Issue 12: user-named outputs that are not regular files are written in place, never
renamed over; a symlink is never replaced.  (``splice IN /dev/null`` as root once turned
the host's /dev/null into a regular file.)  Never the real /dev/null: a FIFO, a character
device made with mknod in a tmpdir, ``-``, and symlinks."""
from __future__ import annotations

import inspect
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from libvirt_mdev.errors import UsageError
from libvirt_mdev.store import output as output_mod
from libvirt_mdev.store.output import AtomicOutput, DirectOutput, open_output

from .conftest import REPO, needs_root

TINY = b"QEVM\x00\x00\x00\x03\x00"  # a complete stream: file header, QEMU_VM_EOF


def null_device(tmp_path: Path) -> Path:
    """Our own /dev/null (major 1, minor 3), in a tmpdir."""
    dev = tmp_path / "null"
    os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    return dev


def fifo_reader(path: Path) -> tuple[threading.Thread, list[bytes]]:
    got: list[bytes] = []

    def run() -> None:
        with open(path, "rb") as fh:
            got.append(fh.read())

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, got


def test_a_new_or_regular_file_is_replaced_atomically(tmp_path: Path) -> None:
    assert isinstance(open_output(tmp_path / "new"), AtomicOutput)
    (tmp_path / "old").write_bytes(b"x")
    with open_output(tmp_path / "old") as out:
        assert isinstance(out, AtomicOutput)
        out.write(b"new")
    assert (tmp_path / "old").read_bytes() == b"new"


def test_a_fifo_is_written_in_place(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    t, got = fifo_reader(fifo)
    with open_output(fifo) as out:
        assert isinstance(out, DirectOutput)
        out.write(b"stream bytes")
    t.join(5)
    assert got == [b"stream bytes"] and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert [p.name for p in tmp_path.iterdir()] == ["fifo"]  # no temp file beside it


@needs_root
def test_a_character_device_is_written_in_place(tmp_path: Path) -> None:
    dev = null_device(tmp_path)
    before = os.lstat(dev)
    with open_output(dev) as out:
        out.write(b"x" * 100_000)
    after = os.lstat(dev)
    assert stat.S_ISCHR(after.st_mode) and after.st_rdev == before.st_rdev and after.st_ino == before.st_ino


@needs_root
def test_a_symlink_to_a_device_is_written_through_and_stays_a_symlink(tmp_path: Path) -> None:
    dev = null_device(tmp_path)
    link = tmp_path / "out"
    link.symlink_to(dev)
    with open_output(link) as out:
        out.write(b"abc")
    assert link.is_symlink() and os.readlink(link) == str(dev) and stat.S_ISCHR(os.lstat(dev).st_mode)


def test_a_symlink_to_a_regular_file_is_refused_and_both_stay(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_bytes(b"keep me")
    link = tmp_path / "out"
    link.symlink_to(target)
    with pytest.raises(UsageError, match="symbolic link to a regular file"):
        open_output(link)
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "missing")
    with pytest.raises(UsageError, match="symbolic link to a missing file"):
        open_output(dangling)
    assert link.is_symlink() and target.read_bytes() == b"keep me" and dangling.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "out", "precious"]


def test_a_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="is a directory"):
        open_output(tmp_path)


def test_dash_is_stdout(capsysbinary: pytest.CaptureFixture[bytes]) -> None:
    with open_output("-") as out:
        out.write(b"to stdout")
    assert capsysbinary.readouterr().out == b"to stdout"


# ----------------------------------------------------------------- through the CLI (splice)
def _cli_uses_open_output() -> bool:
    from libvirt_mdev.cli import filtercmd

    return "open_output" in inspect.getsource(filtercmd)


cli_wired = pytest.mark.skipif(not _cli_uses_open_output(),
                               reason="cli/filtercmd.py does not call store.output.open_output yet")


def splice(tmp_path: Path, out: str, *extra: str) -> subprocess.CompletedProcess[bytes]:
    src = tmp_path / "in.stream"
    src.write_bytes(TINY)
    return subprocess.run([sys.executable, "-m", "libvirt_mdev.cli", "splice", str(src), out,
                           "--store", str(tmp_path / "store"), *extra],
                          check=False, cwd=REPO, capture_output=True, timeout=60)


@cli_wired
@needs_root
def test_splice_into_a_device_leaves_it_a_device(tmp_path: Path) -> None:
    dev = null_device(tmp_path)
    r = splice(tmp_path, str(dev))
    assert r.returncode == 0, r.stderr
    assert stat.S_ISCHR(os.lstat(dev).st_mode)
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


@cli_wired
def test_splice_into_a_fifo_and_to_stdout(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    t, got = fifo_reader(fifo)
    r = splice(tmp_path, str(fifo))
    t.join(10)
    assert r.returncode == 0, r.stderr
    assert got == [TINY] and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    r = splice(tmp_path, "-")
    assert r.returncode == 0 and r.stdout == TINY, r.stderr


@cli_wired
def test_splice_to_a_symlinked_regular_file_is_one_line_and_changes_nothing(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_bytes(b"keep me")
    (tmp_path / "out").symlink_to(target)
    r = splice(tmp_path, str(tmp_path / "out"))
    assert r.returncode == 2 and r.stderr.count(b"\n") == 1 and b"symbolic link" in r.stderr
    assert (tmp_path / "out").is_symlink() and target.read_bytes() == b"keep me"


@cli_wired
def test_json_with_stdout_is_refused_before_any_work(tmp_path: Path) -> None:
    r = splice(tmp_path, "-", "--json")
    assert r.returncode == 2 and b"QEVM" not in r.stdout and not (tmp_path / "store").exists(), r.stderr
    assert r.stderr.count(b"\n") == 1 and b"--json needs OUT to be a file" in r.stderr


def test_module_documents_every_kind() -> None:
    doc = output_mod.__doc__ or ""
    for word in ("FIFO", "character", "symlink", "/dev/null", "``-``"):
        assert word in doc
