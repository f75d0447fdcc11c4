"""kill -9 at random points of strip, splice and the live proxy (issue 7 §4), in a loop.

Every run kills one CLI process (strip of a stream carrying state, splice of such a
stream, which stores and verifies it, splice of a stripped stream, which resolves
tokens, or ``proxy --once`` filtering the stream from a socket to a byte sink, armed
by a pending record as the hook writes it) at a random moment: half uniformly over its run time, half in the last 30%,
where the commit (fsync, rename, manifest, output rename) happens.  After every kill:

* every manifest in the store either fails the loader's checks or names exactly the
  bytes that were sent (length and SHA-256 of the one device state in the input);
  the loader here is the real one: resolve the token for its mdev, then
  ``open_verified`` and read the bytes that would be delivered;
* the output is absent or complete (AtomicOutput): a present output parses to the end;
* ``libvirt-mdev store gc`` (the CLI) leaves no temp file and no state without manifest.

The kill moments come from one timed complete run of each operation; a run that ends before its kill (the machine
got less loaded) sets that operation's time to what it took, so the loop keeps killing on a shared machine whose load
changes. LIBVIRT_MDEV_KILL_RUNS (default 60) sets the number of runs.
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
from .proxyrun import DestHost, HashSink, mdev_uuid, start_proxy

REPO = Path(__file__).resolve().parents[2]
RUNS = int(os.environ.get("LIBVIRT_MDEV_KILL_RUNS", "60"))
STATE = 64 << 20
PROXY_DOMAIN = 0xBEEF
MDEV = mdev_uuid(PROXY_DOMAIN)


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO))


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "libvirt_mdev.cli", *args]


def check_store(store_dir: Path, sha: str, length: int) -> int:
    """The invariant; returns how many manifests the loader accepts.

    The loader's steps: resolve the token (syntax, manifest checks, mdev binding, not
    spent), then open the state and re-hash it (``open_verified``).  Every manifest is
    resolved; each distinct state file is re-hashed once per call (manifests of the
    same content share one file, and hashing it once per manifest would make the loop
    quadratic).
    """
    accepted = 0
    with Store.open(store_dir) as store:
        by_state: dict[str, str] = {}
        for e in store.list():
            if e.manifest is None:
                continue
            try:
                m = resolve_token(store, issue_token(e.manifest), MDEV)
                _m, fd = store.open_state(m.id)
                os.close(fd)
            except MdevError:
                continue  # refused by the loader: fine
            assert (m.length, m.sha256) == (length, sha), f"manifest {m.id} names other bytes than were sent"
            by_state.setdefault(m.state_name, m.id)
            accepted += 1
        for mid in by_state.values():
            try:
                _m, fd = store.open_verified(mid)
            except MdevError:
                continue
            try:
                h = hashlib.sha256()
                n = 0
                while chunk := os.read(fd, 1 << 20):
                    h.update(chunk)
                    n += len(chunk)
            finally:
                os.close(fd)
            assert (n, h.hexdigest()) == (length, sha), f"loader accepts state {mid} that differs from what was sent"
    return accepted


def output_ok(out: Path) -> None:
    if not out.exists():
        return
    with open(out, "rb") as fh:
        evs = list(iter_events(fh))
    assert isinstance(evs[-1], StreamEnd), f"{out} exists but is incomplete"


def gc_cleans(store_dir: Path) -> int:
    """Run ``store gc``; check it left no temp and no orphan state.  Returns the number
    of temp files it removed (a writer was killed mid-write)."""
    r = subprocess.run(cli("store", "gc", "--store", str(store_dir), "--retention", "86400", "--json"),
                       capture_output=True, text=True, cwd=REPO, env=env(), timeout=60)
    assert r.returncode == 0, r.stderr
    names = os.listdir(store_dir)
    assert not [n for n in names if n.startswith(TEMP_PREFIX)], names
    with Store.open(store_dir) as store:
        referenced = {e.manifest.state_name for e in store.list() if e.manifest is not None}
    assert {n for n in names if n.endswith(".state")} <= referenced, names
    return len(json.loads(r.stdout)["removed_temp"])


def proxied(host: DestHost, src: Path, migration_id: str) -> tuple[subprocess.Popen, HashSink, subprocess.Popen]:
    """Arm the domain, start ``proxy --once`` towards a hashing sink, and send *src* to it."""
    host.arm(PROXY_DOMAIN, migration_id)
    sink = HashSink()
    px, port = start_proxy(host, PROXY_DOMAIN, sink.port)
    source = subprocess.Popen(["socat", "-u", f"OPEN:{src}", f"TCP:127.0.0.1:{port}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return px, sink, source


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
    host = DestHost(tmp_path, PROXY_DOMAIN + 1).setup()  # fake sysfs with our mdev, config, store
    store_dir = host.store
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
    px, sink, source = proxied(host, src, "first")
    t = time.monotonic()
    assert px.wait(timeout=120) == 0 and source.wait(timeout=60) == 0 and sink.done.wait(60)
    durations["proxy"] = time.monotonic() - t
    assert sink.hasher.digest() == hashlib.sha256(src.read_bytes()).digest()
    accepted = check_store(store_dir, sha, STATE)
    assert accepted >= 1

    killed = finished = mid_write = committed = 0
    per_op = dict.fromkeys(durations, 0)
    for run in range(RUNS):
        name = rng.choice(sorted(durations))
        per_op[name] += 1
        out = tmp_path / f"out-{run}"
        d = durations[name]
        delay = rng.uniform(0, d) if rng.random() < 0.5 else rng.uniform(0.7 * d, 1.0 * d)
        extra: list = []
        if name == "proxy":
            p, sink, source = proxied(host, src, f"run-{run}")
            extra = [source]
        else:
            p = subprocess.Popen(ops[name](out), cwd=REPO, env=env(), stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        started = time.monotonic()
        try:
            p.wait(timeout=delay)
        except subprocess.TimeoutExpired:
            os.kill(p.pid, signal.SIGKILL)
            killed += 1
            p.wait(timeout=60)
        else:
            # it ended before its kill: the machine runs it faster now than in the timing run (a shared machine's
            # load comes and goes), so aim this operation's later kills at what it takes now
            finished += 1
            durations[name] = time.monotonic() - started
        for q in extra:
            q.wait(timeout=60)
        before = accepted
        accepted = check_store(store_dir, sha, STATE)
        committed += accepted > before
        output_ok(out)
        mid_write += gc_cleans(store_dir) > 0
        if out.exists():
            out.unlink()
    # at the end the store still serves the state, and the stripped stream still splices back
    assert check_store(store_dir, sha, STATE) >= 1
    back = tmp_path / "back"
    subprocess.run(ops["unstrip"](back), check=True, cwd=REPO, env=env(), capture_output=True, timeout=120)
    assert hashlib.sha256(back.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest()
    leftovers = [n for n in os.listdir(tmp_path) if ".tmp-" in n]
    summary = {"runs": RUNS, "per_op": per_op, "killed": killed, "finished_before_kill": finished,
               "runs_leaving_store_temp_files": mid_write, "runs_adding_a_manifest": committed,
               "durations_s": {k: round(v, 2) for k, v in durations.items()},
               "output_temp_files_left": len(leftovers)}
    print(f"\nkill loop: {json.dumps(summary)}")
    # kill delays come from the timing run, shortened by every run that ended before its kill: most runs are killed
    assert killed >= RUNS // 3
