"""Several strips at once share one store safely (issue 7 §3).

N (default 8) DISTINCT streams, each a real QEMU 7.2 stream with one injected VFIO
device, LIBVIRT_MDEV_CONCURRENT_MIB MiB in all (default 256 to keep CI short; the issue's
figure is 512: run with LIBVIRT_MDEV_CONCURRENT_MIB=512), are generated into
pipes (never stored) and stripped concurrently into ONE store, each with its own
domain (distinct mdev uuid) and migration id.  Then:

* every strip succeeded and reported exactly one device;
* every token resolves, for its own mdev and migration only;
* every manifest's SHA-256 is the SHA-256 of the state its generator wrote (computed
  by the generator while writing), and the state file on disk re-hashes to it;
* nothing is missing or extra: N manifests, N state files, no temp file left;
* a spliced stream is byte-identical to what was generated (one stream, re-generated).

Wall time and throughput are printed (pytest -s) and kept in the JSON report
$LIBVIRT_MDEV_CONCURRENT_REPORT when set.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from libvirt_mdev.errors import TokenError
from libvirt_mdev.store import Store
from libvirt_mdev.store.acl import TEMP_PREFIX
from libvirt_mdev.store.tokens import resolve_token

REPO = Path(__file__).resolve().parents[2]
MiB = 1 << 20
N = int(os.environ.get("LIBVIRT_MDEV_CONCURRENT_N", "8"))
SIZE_MIB = int(os.environ.get("LIBVIRT_MDEV_CONCURRENT_MIB", "256"))


def mdev_uuid(i: int) -> str:
    return f"7a1c0000-0000-4000-8000-{i:012x}"


def domain_xml(path: Path, i: int) -> Path:
    path.write_text(
        f"<domain type='kvm'><name>conc-{i}</name><uuid>7d000000-0000-4000-8000-{i:012x}</uuid><devices>"
        "<hostdev mode='subsystem' type='mdev' model='vfio-pci'><source>"
        f"<address uuid='{mdev_uuid(i)}'/></source>"
        "<address type='pci' domain='0x0000' bus='0x00' slot='0x05' function='0x0'/></hostdev>"
        "</devices></domain>")
    return path


def env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO))


def start_strip(real: Path, i: int, state: int, store: Path, work: Path) -> tuple[subprocess.Popen, subprocess.Popen]:
    gen = subprocess.Popen([sys.executable, "-m", "tests.faults.gen_stream", str(real), str(1000 + i), str(state),
                            str(work / f"sha-{i}")], stdout=subprocess.PIPE, cwd=REPO, env=env())
    strip = subprocess.Popen([sys.executable, "-m", "libvirt_mdev.cli", "strip", "-", str(work / f"out-{i}"),
                              "--store", str(store), "--domain-xml", str(domain_xml(work / f"dom-{i}.xml", i)),
                              "--migration-id", f"conc-{i}", "--json"],
                             stdin=gen.stdout, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO, env=env())
    assert gen.stdout is not None
    gen.stdout.close()  # the strip holds the read end
    return gen, strip


@pytest.mark.e2e
@pytest.mark.slow
def test_concurrent_strips_into_one_store(real_qmp_stream: Path, tmp_path: Path):
    real = real_qmp_stream
    state = SIZE_MIB * MiB - real.stat().st_size
    assert state > 0
    store_dir = tmp_path / "store"
    Store.open(store_dir, create=True).close()
    t0 = time.monotonic()
    procs = [start_strip(real, i, state, store_dir, tmp_path) for i in range(N)]
    results = []
    for gen, strip in procs:
        out, err = strip.communicate(timeout=900)
        assert gen.wait(timeout=60) == 0
        assert strip.returncode == 0, err.decode()
        results.append(json.loads(out))
    wall = time.monotonic() - t0
    total = N * (state + real.stat().st_size)

    with Store.open(store_dir) as store:
        seen_ids = set()
        for i, res in enumerate(results):
            (dev,) = res["devices"]
            want = (tmp_path / f"sha-{i}").read_text().split()[0]
            assert dev["sha256"] == want and dev["length"] == state, (i, dev)
            assert dev["mdev_uuid"] == mdev_uuid(i)
            m = resolve_token(store, dev["token"], mdev_uuid(i), migration_id=f"conc-{i}")
            assert m.sha256 == want and m.length == state and m.domain_name == f"conc-{i}"
            assert store.verify(m.id).sha256 == want  # re-hashed from disk
            with pytest.raises(TokenError):  # bound to its own mdev: no mix-up possible
                resolve_token(store, dev["token"], mdev_uuid((i + 1) % N))
            seen_ids.add(m.id)
        assert len(seen_ids) == N
        entries = store.list()
        assert sorted(e.id for e in entries) == sorted(seen_ids) and not any(e.problem for e in entries)
        names = os.listdir(store_dir)
        assert not [n for n in names if n.startswith(TEMP_PREFIX)], names
        assert len([n for n in names if n.endswith(".state")]) == N
        for i in range(N):
            stripped = (tmp_path / f"out-{i}").stat().st_size
            # the state left the stream: only token records (~250 bytes per 1 MiB block) remain
            assert stripped < real.stat().st_size + state // 2000 + 64 * 1024, (i, stripped)

    # one stream spliced back is byte-identical to what was generated
    back = subprocess.run([sys.executable, "-m", "libvirt_mdev.cli", "splice", str(tmp_path / "out-3"), "-",
                           "--store", str(store_dir)], capture_output=True, cwd=REPO, env=env(), timeout=600)
    assert back.returncode == 0, back.stderr.decode()
    regen = subprocess.run([sys.executable, "-m", "tests.faults.gen_stream", str(real), "1003", str(state)],
                           capture_output=True, cwd=REPO, env=env(), timeout=600)
    assert hashlib.sha256(back.stdout).digest() == hashlib.sha256(regen.stdout).digest()

    report = {"streams": N, "stream_mib": SIZE_MIB, "wall_s": round(wall, 2),
              "throughput_mib_s": round(total / MiB / wall, 1)}
    print(f"\nconcurrent strips: {report}")
    if os.environ.get("LIBVIRT_MDEV_CONCURRENT_REPORT"):
        Path(os.environ["LIBVIRT_MDEV_CONCURRENT_REPORT"]).write_text(json.dumps(report))


PROXY_MIB = int(os.environ.get("LIBVIRT_MDEV_PROXY_CONCURRENT_MIB", "128"))


@pytest.mark.e2e
@pytest.mark.slow
def test_concurrent_proxied_migrations_into_one_store(real_qmp_stream: Path, tmp_path: Path):
    """N proxy processes (one per armed domain, as the systemd units run them) filter N
    distinct injected-state streams at once into one store: every destination gets the
    stream byte for byte, every state is stored under its own domain's mdev."""
    from .proxyrun import DestHost, HashSink, start_proxy, start_source
    from .proxyrun import domain_uuid as p_dom
    from .proxyrun import mdev_uuid as p_mdev
    real = real_qmp_stream
    state = PROXY_MIB * MiB - real.stat().st_size
    host = DestHost(tmp_path / "dest", N).setup()
    for i in range(N):
        host.arm(i, f"live-{i}")
    sinks = [HashSink() for _ in range(N)]
    proxies = [start_proxy(host, i, sinks[i].port) for i in range(N)]
    t0 = time.monotonic()
    sources = [start_source(real, 2000 + i, state, proxies[i][1], tmp_path / f"psha-{i}") for i in range(N)]
    sessions = []
    for i, ((px, _port), (gen, cat)) in enumerate(zip(proxies, sources, strict=True)):
        out, err = px.communicate(timeout=900)
        assert gen.wait(timeout=60) == 0 and cat.wait(timeout=60) == 0
        assert px.returncode == 0, err
        (sess,) = [json.loads(line) for line in out.splitlines() if '"session"' in line]
        assert sess["ok"], sess
        sessions.append(sess)
        assert sinks[i].done.wait(60)
    wall = time.monotonic() - t0
    with Store.open(host.store) as store:
        ids = set()
        for i, sess in enumerate(sessions):
            state_sha, stream_sha = (tmp_path / f"psha-{i}").read_text().split()
            assert sinks[i].hasher.hexdigest() == stream_sha and not sinks[i].reset  # byte for byte
            (dev,) = sess["devices"]
            m = resolve_token(store, dev["token"], p_mdev(i), migration_id=f"live-{i}")
            assert (m.sha256, m.length, m.domain_uuid) == (state_sha, state, p_dom(i))
            assert store.verify(m.id).sha256 == state_sha
            ids.add(m.id)
        assert len(ids) == N and sorted(e.id for e in store.list()) == sorted(ids)
        assert not [n for n in os.listdir(host.store) if n.startswith(TEMP_PREFIX)]
    report = {"migrations": N, "stream_mib": PROXY_MIB, "wall_s": round(wall, 2),
              "throughput_mib_s": round(N * PROXY_MIB / wall, 1)}
    print(f"\nconcurrent proxied migrations: {report}")
    if os.environ.get("LIBVIRT_MDEV_CONCURRENT_REPORT"):
        Path(os.environ["LIBVIRT_MDEV_CONCURRENT_REPORT"] + ".proxy").write_text(json.dumps(report))
