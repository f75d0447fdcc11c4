"""Issue 11 item 3 (refused means gone) and the store items of issue 12, on synthetic save images.

Each test fails on the code before this branch: a refused stream's state was loadable, gc
deleted a stripped image's state, bindings ignored the instance id, `strip IN - --json`
wrote the stream and stored state before failing.
"""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from libvirt_mdev.errors import MdevMissing, TokenError
from libvirt_mdev.filter import Binding, FilterOptions, StreamFilter, filter_stream
from libvirt_mdev.store import Store, resolve_token
from libvirt_mdev.stream import StreamParser, iter_events
from testkit.synth import SyntheticVfioDevice

from .saveimg import REPO, U5, U6, cli, domain_xml, one_line, save_image, token_filtered

XML = domain_xml({5: U5, 6: U6}, types={U5: "nvidia-63", U6: "nvidia-63"})


def config(tmp_path: Path, **extra: str) -> Path:
    lines = [f"store = {tmp_path / 'store'}", f"runtime_dir = {tmp_path / 'run'}", "retention = 0"]
    lines += [f"{k} = {v}" for k, v in extra.items()]
    p = tmp_path / "lm.conf"
    p.write_text("[libvirt-mdev]\n" + "\n".join(lines) + "\n")
    return p


def states(cfg: Path) -> list[dict]:
    r = cli("store", "list", "--json", config=cfg)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["states"]


@pytest.mark.parametrize("verb", ["strip", "splice"])
def test_complete_devices_then_garbage_refused_state_never_loads(tmp_path: Path, verb: str) -> None:
    img = save_image(tmp_path / "g.save", XML, tail=b"\x42GARBAGE" * 100)
    cfg = config(tmp_path)
    r = cli(verb, str(img), str(tmp_path / "out"), config=cfg)
    line = one_line(r, 3)
    assert not (tmp_path / "out").exists()
    rows = states(cfg)
    assert rows and all(s["status"] == "refused" for s in rows), rows
    assert all(s["stream"]["reason"] and s["stream"]["reason"] in line for s in rows)
    assert "refused" in cli("store", "list", config=cfg).stdout
    for s in rows:  # the loader refuses, with the reason
        with Store.open(tmp_path / "store") as st, pytest.raises(TokenError, match="refused stream"):
            resolve_token(st, f"mdev-state-v1:{s['id']}", s["mdev_uuid"])


def test_abort_after_accept_wins_and_close_without_accept_refuses(tmp_path: Path) -> None:
    img = save_image(tmp_path / "a.save", XML)
    with Store.open(tmp_path / "store", create=True) as st:
        flt = token_filtered(st, img)
        assert flt.accepted  # at the stream's end (the proxy's default)
        tok = flt.results[0].token
        assert resolve_token(st, tok, U5).mdev_uuid == U5
        flt.abort("destination QEMU closed the connection")  # what the live session calls on failure
        flt.close()
        with pytest.raises(TokenError, match="destination QEMU closed"):
            resolve_token(st, tok, U5)
        # a consumer that only closes (no accept): refused too
        parser = StreamParser()
        flt = StreamFilter(st, parser, FilterOptions(mode="token", accept_at_end=False), lambda b: None)
        with open(img, "rb") as src:
            for ev in iter_events(src, parser):
                flt.process(ev)
        flt.close()
        with pytest.raises(TokenError, match="not accepted"):
            resolve_token(st, flt.results[0].token, U5)


KILLER = r"""
import sys, time
from libvirt_mdev.filter import FilterOptions, StreamFilter
from libvirt_mdev.store import Store
from libvirt_mdev.stream import StreamParser, iter_events
st = Store.open(sys.argv[2], create=True)
p = StreamParser()
f = StreamFilter(st, p, FilterOptions(mode="token", accept_at_end=False), lambda b: None)
for i, ev in enumerate(iter_events(open(sys.argv[1], "rb"), p, chunk=4096)):
    f.process(ev)
    if f.results:
        print("committed", flush=True)
        time.sleep(0.002)
print("end", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.2, 0.5, 2.0])
def test_kill_9_at_random_points_never_leaves_loadable_state(tmp_path: Path, delay: float) -> None:
    img = save_image(tmp_path / "k.save", XML)
    store = tmp_path / "store"
    p = subprocess.Popen([sys.executable, "-c", KILLER, str(img), str(store)], cwd=REPO,
                         env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.PIPE, text=True)
    time.sleep(delay)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    if not store.exists():
        return
    with Store.open(store) as st:
        for e in st.list():
            assert e.status in ("open", "untrusted"), e
            with pytest.raises(TokenError):
                resolve_token(st, f"mdev-state-v1:{e.id}", e.manifest.mdev_uuid)  # type: ignore[union-attr]
        rep = st.gc(3600)
        # its stream record may exist before its first manifest does: refused all the same
        assert len(rep.refused_streams) == (1 if st.list() else len(rep.refused_streams)) <= 1
        assert all(e.status == "refused" and "unfinished" in (e.stream.reason or "") for e in st.list())


def test_instance_1_refused_and_two_instances_never_two_tokens(tmp_path: Path) -> None:
    for extra, words in ((SyntheticVfioDevice(idstr="0000:00:06.0/vfio", instance_id=1, stopcopy_size=10, seed=9),
                          "instance 1"),):
        devs = [SyntheticVfioDevice(idstr="0000:00:05.0/vfio", stopcopy_size=100, seed=1), extra]
        img = save_image(tmp_path / "i.save", XML, devs)
        cfg = config(tmp_path)
        r = cli("strip", str(img), str(tmp_path / "o"), config=cfg)
        one_line(r, 7, words)
        assert all(s["status"] == "refused" for s in states(cfg))
    # the same idstr with instances 0 and 1: the second can never be bound
    with Store.open(tmp_path / "st2", create=True) as st:
        opts = FilterOptions(bindings={"0000:00:05.0/vfio": Binding(U5, "t")})
        devs = [SyntheticVfioDevice(idstr="0000:00:05.0/vfio", instance_id=0, stopcopy_size=10, seed=1),
                SyntheticVfioDevice(idstr="0000:00:05.0/vfio", instance_id=1, stopcopy_size=10, seed=2)]
        img = save_image(tmp_path / "j.save", XML, devs)
        with pytest.raises(MdevMissing, match="instance 1"), open(img, "rb") as src:
            filter_stream(src, lambda b: None, st, opts)
        assert all(e.status == "refused" for e in st.list())


def test_gc_never_loses_stripped_image_state(tmp_path: Path) -> None:
    img = save_image(tmp_path / "s.save", XML)
    cfg = config(tmp_path)
    assert cli("strip", str(img), str(tmp_path / "stripped"), config=cfg).returncode == 0
    rows = states(cfg)
    assert len(rows) == 2 and all(s["status"] == "ready" for s in rows)
    assert all("save image" in s["held_by"] and str(tmp_path / "stripped") in s["held_by"] for s in rows)
    dry = cli("store", "gc", "--dry-run", "--retention", "0", "--json", config=cfg)
    out = json.loads(dry.stdout)
    assert out["dry_run"] and out["removed_manifests"] == [] and len(out["kept_for_images"]) == 2
    r = cli("store", "gc", "--retention", "0", "--json", config=cfg)
    assert json.loads(r.stdout)["removed_manifests"] == []
    back = tmp_path / "back.save"
    r = cli("splice", str(tmp_path / "stripped"), str(back), config=cfg)
    assert r.returncode == 0, r.stderr
    assert back.read_bytes() == img.read_bytes()
    # an admin removes them explicitly; then splice fails with one line
    ids = [s["id"] for s in rows]
    assert cli("store", "remove", *ids, config=cfg).returncode == 0
    assert states(cfg) == []
    one_line(cli("splice", str(tmp_path / "stripped"), str(tmp_path / "b2"), config=cfg), 4)


def test_gc_dry_run_changes_nothing_and_live_migration_state_expires(tmp_path: Path) -> None:
    img = save_image(tmp_path / "m.save", XML)
    with Store.open(tmp_path / "store", create=True) as st:
        with open(img, "rb") as src:
            filter_stream(src, lambda b: None, st, FilterOptions(mode="splice"))  # kind migration
        before = sorted(os.listdir(tmp_path / "store"))
        rep = st.gc(0, dry_run=True)
        assert len(rep.removed_manifests) == 2 and sorted(os.listdir(tmp_path / "store")) == before
        rep = st.gc(0)
        assert len(rep.removed_manifests) == 2 and st.list() == []


def test_strip_json_to_stdout_refused_before_any_work(tmp_path: Path) -> None:
    img = save_image(tmp_path / "j.save", XML)
    cfg = config(tmp_path)
    r = cli("strip", str(img), "-", "--json", config=cfg)
    one_line(r, 2, "--json")
    assert r.stdout.strip().startswith('{"error"') or r.stdout == ""
    assert not (tmp_path / "store").exists()
    r = cli("splice", str(img), str(img), config=cfg)
    one_line(r, 2, "same file")
    assert not (tmp_path / "store").exists()


def test_outputs_that_are_not_regular_files_stay_what_they_were(tmp_path: Path) -> None:
    img = save_image(tmp_path / "o.save", XML)
    cfg = config(tmp_path)
    # a character device: written in place, never renamed over (as root, /dev/null itself)
    before = os.stat("/dev/null")
    r = cli("splice", str(img), "/dev/null", config=cfg)
    assert r.returncode == 0, r.stderr
    after = os.stat("/dev/null")
    assert (after.st_ino, after.st_mode, after.st_rdev) == (before.st_ino, before.st_mode, before.st_rdev)
    # a FIFO: the reader gets the stream, the FIFO stays a FIFO
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with open(tmp_path / "from-fifo", "wb") as sink:
        reader = subprocess.Popen(["cat", str(fifo)], stdout=sink)
        r = cli("splice", str(img), str(fifo), config=cfg)
        reader.wait(timeout=60)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "from-fifo").read_bytes() == img.read_bytes() and stat.S_ISFIFO(os.lstat(fifo).st_mode)
    # '-': stdout carries the stream
    p = subprocess.run([sys.executable, "-m", "libvirt_mdev.cli", "splice", str(img), "-"], cwd=REPO,
                       env=dict(os.environ, PYTHONPATH=str(REPO), LIBVIRT_MDEV_CONFIG=str(cfg)),
                       capture_output=True, check=False)
    assert p.returncode == 0 and p.stdout == img.read_bytes()
    # a symlink is never followed into a rename: refused before any work
    target = tmp_path / "target"
    target.write_bytes(b"keep")
    (tmp_path / "link").symlink_to(target)
    one_line(cli("strip", str(img), str(tmp_path / "link"), config=cfg), 2, "symlink")
    assert target.read_bytes() == b"keep" and (tmp_path / "link").is_symlink()


@pytest.mark.parametrize("seed", range(6))
def test_kill_9_of_the_real_strip_never_leaves_loadable_state(tmp_path: Path, seed: int) -> None:
    import random
    devs = [SyntheticVfioDevice(idstr="0000:00:05.0/vfio", stopcopy_size=30_000_000, seed=1),
            SyntheticVfioDevice(idstr="0000:00:06.0/vfio", stopcopy_size=30_000_000, framing="v2", seed=2)]
    img = save_image(tmp_path / "k.save", XML, devs)
    cfg = config(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(REPO), LIBVIRT_MDEV_CONFIG=str(cfg))
    p = subprocess.Popen([sys.executable, "-m", "libvirt_mdev.cli", "strip", str(img), str(tmp_path / "out")],
                         cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(random.Random(seed).uniform(0.3, 2.5))
    os.kill(p.pid, signal.SIGKILL)
    rc = p.wait()
    if not (tmp_path / "store").exists():
        return
    assert rc in (0, -signal.SIGKILL), rc
    with Store.open(tmp_path / "store") as st:
        unfinished = set()
        for e in st.list():
            if e.status == "ready":
                # accepted only together with its complete output: strip renames the output into
                # place before it accepts, so a kill that came after both (while the process was
                # exiting) leaves them together; a kill before leaves neither
                assert (tmp_path / "out").exists(), e
            else:  # killed before it finished: nothing of it is loadable
                assert rc == -signal.SIGKILL and e.status in ("open", "refused"), e
                with pytest.raises(TokenError):
                    resolve_token(st, f"mdev-state-v1:{e.id}", e.manifest.mdev_uuid)  # type: ignore[union-attr]
                unfinished.add(e.id)
        st.gc(3600)
        # gc refuses what a killed strip left open (its output, if renamed before the kill, names
        # tokens that no longer resolve: a restore from it fails closed)
        assert all(e.status == "refused" for e in st.list() if e.id in unfinished)


def test_damaged_stream_record_fails_closed_and_gc_reports_it(tmp_path: Path) -> None:
    img = save_image(tmp_path / "d.save", XML)
    with Store.open(tmp_path / "store", create=True) as st:
        with open(img, "rb") as src:
            res = filter_stream(src, lambda b: None, st, FilterOptions(mode="token"))
        [rec] = [n for n in os.listdir(tmp_path / "store") if n.endswith(".stream")]
        (tmp_path / "store" / rec).write_bytes(b"{not json")
        with pytest.raises(TokenError, match="refused"):
            resolve_token(st, res[0].token, U5)
        assert all(e.status == "refused" for e in st.list())
        rep = st.gc(3600)
        assert rep.removed_manifests == [] and not rep.refused_streams and any(rec in p for p in rep.problems)
