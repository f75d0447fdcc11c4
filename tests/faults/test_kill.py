"""kill -9 at random points of strip and splice (issue 7 §4), in a loop.

Every run kills one CLI process (strip of a stream carrying state, splice of such a
stream, which stores and verifies it, or splice of a stripped stream, which resolves
tokens) at a random moment: half uniformly over its run time, half in the last fifth,
where the commit (fsync, rename, manifest, output rename) happens.  After every kill:

* every manifest in the store either fails the loader's checks or names exactly the
  bytes that were sent (length and SHA-256 of the one device state in the input);
  the loader here is the real one: resolve the token for its mdev, then
  ``open_verified`` and read the bytes that would be delivered;
* the output is absent or complete (AtomicOutput): a present output parses to the end;
* ``libvirt-mdev store gc`` (the CLI) leaves no temp file and no state without manifest.

LIBVIRT_MDEV_KILL_RUNS (default 60) sets the number of runs.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from libvirt_mdev.errors import MdevError
from libvirt_mdev.store import Store
from libvirt_mdev.store.acl import TEMP_PREFIX
from libvirt_mdev.store.tokens import issue_token, resolve_token
from libvirt_mdev.stream import StreamEnd, iter_events

from .gen_stream import device

REPO = Path(__file__).resolve().parents[2]
RUNS = int(os.environ.get("LIBVIRT_MDEV_KILL_RUNS", "60"))
STATE = 24 << 20
MDEV = "7a1c0000-0000-4000-8000-00000000beef"


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO))


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "libvirt_mdev.cli", *args]


def check_store(store_dir: Path, sha: str, length: int) -> int:
    """The invariant; returns how many manifests the loader accepts."""
    accepted = 0
    with Store.open(store_dir) as store:
        for e in store.list():
            if e.manifest is None:
                continue
            try:
                m = resolve_token(store, issue_token(e.manifest), MDEV)
                _m, fd = store.open_verified(m.id)
            except MdevError:
                continue  # refused by the loader: fine
            try:
                h = hashlib.sha256()
                n = 0
                while chunk := os.read(fd, 1 << 20):
                    h.update(chunk)
                    n += len(chunk)
            finally:
                os.close(fd)
            assert (n, h.hexdigest()) == (length, sha), f"loader accepts state {m.id} that differs from what was sent"
            accepted += 1
    return accepted


def output_ok(out: Path) -> None:
    if not out.exists():
        return
    with open(out, "rb") as fh:
        evs = list(iter_events(fh))
    assert isinstance(evs[-1], StreamEnd), f"{out} exists but is incomplete"


def gc_cleans(store_dir: Path) -> None:
    r = subprocess.run(cli("store", "gc", "--store", str(store_dir), "--retention", "86400", "--json"),
                       capture_output=True, text=True, cwd=REPO, env=env(), timeout=60)
    assert r.returncode == 0, r.stderr
    names = os.listdir(store_dir)
    assert not [n for n in names if n.startswith(TEMP_PREFIX)], names
    with Store.open(store_dir) as store:
        referenced = {e.manifest.state_name for e in store.list() if e.manifest is not None}
    assert {n for n in names if n.endswith(".state")} <= referenced, names


@pytest.mark.e2e
@pytest.mark.slow
def test_kill_9_at_random_points_of_strip_and_splice(real_qmp_stream: Path, tmp_path: Path):
    rng = random.Random(int(os.environ.get("LIBVIRT_MDEV_KILL_SEED", "7")))
    src = tmp_path / "vfio.stream"
    with open(src, "wb") as fh:
        subprocess.run([sys.executable, "-m", "tests.faults.gen_stream", str(real_qmp_stream), "77", str(STATE)],
                       stdout=fh, check=True, cwd=REPO, env=env(), timeout=300)
    sha = device(77, STATE).expected_sha256()
    xml = tmp_path / "dom.xml"
    xml.write_text("<domain><name>killed</name><devices><hostdev mode='subsystem' type='mdev' model='vfio-pci'>"
                   f"<source><address uuid='{MDEV}'/></source>"
                   "<address type='pci' domain='0x0000' bus='0x00' slot='0x05' function='0x0'/></hostdev>"
                   "</devices></domain>")
    store_dir = tmp_path / "store"
    # a complete strip first: the stripped stream the splice runs read, and the run times
    ops = {
        "strip": lambda out: cli("strip", str(src), str(out), "--store", str(store_dir), "--domain-xml", str(xml)),
        "splice": lambda out: cli("splice", str(src), str(out), "--store", str(store_dir), "--domain-xml", str(xml)),
    }
    stripped = tmp_path / "stripped"
    t = time.monotonic()
    subprocess.run(ops["strip"](stripped), check=True, cwd=REPO, env=env(), capture_output=True, timeout=120)
    durations = {"strip": time.monotonic() - t}
    ops["unstrip"] = lambda out: cli("splice", str(stripped), str(out), "--store", str(store_dir))
    for name in ("splice", "unstrip"):
        t = time.monotonic()
        subprocess.run(ops[name](tmp_path / f"full-{name}"), check=True, cwd=REPO, env=env(), capture_output=True,
                       timeout=120)
        durations[name] = time.monotonic() - t
    assert check_store(store_dir, sha, STATE) >= 1

    killed = finished = 0
    for run in range(RUNS):
        name = rng.choice(sorted(ops))
        out = tmp_path / f"out-{run}"
        d = durations[name]
        delay = rng.uniform(0, d) if rng.random() < 0.5 else rng.uniform(0.8 * d, 1.05 * d)
        p = subprocess.Popen(ops[name](out), cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        time.sleep(delay)
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL)
            killed += 1
        else:
            finished += 1
        p.wait(timeout=60)
        check_store(store_dir, sha, STATE)
        output_ok(out)
        gc_cleans(store_dir)
        if out.exists():
            out.unlink()
    # at the end the store still serves the state, and the stripped stream still splices back
    assert check_store(store_dir, sha, STATE) >= 1
    back = tmp_path / "back"
    subprocess.run(ops["unstrip"](back), check=True, cwd=REPO, env=env(), capture_output=True, timeout=120)
    assert hashlib.sha256(back.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()
    leftovers = [n for n in os.listdir(tmp_path) if ".tmp-" in n]
    summary = {"runs": RUNS, "killed": killed, "finished_before_kill": finished,
               "durations_s": {k: round(v, 2) for k, v in durations.items()},
               "output_temp_files_left": len(leftovers)}
    print(f"\nkill loop: {json.dumps(summary)}")
    assert killed >= RUNS // 2
