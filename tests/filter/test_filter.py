"""strip / splice on real streams and save images, through the real CLI.

Round trip: strip leaves none of the state bytes in the stream; splice restores the
original byte for byte; a stripped+spliced real save image restores on a real libvirtd.
Stream-side attack rows: kill -9 mid-strip, out of space mid-strip, a block larger than
the stream, state for a device the domain does not have, swapped and forged token records.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from libvirt_mdev.store import Store
from testkit.synth import SyntheticVfioDevice, inject
from tests.harness.cli import one_line_error as cli_one_line_error
from tests.harness.cli import run_cli

REPO = Path(__file__).resolve().parents[2]
MARK_A = b"\x8f-SECRET-STATE-OF-DEVICE-A-" + os.urandom(8).hex().encode()
MARK_B = b"\x8f-SECRET-STATE-OF-DEVICE-B-" + os.urandom(8).hex().encode()


def cli(*args: str, check: bool = False, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, check=check, timeout=timeout)


def one_line_error(r: subprocess.CompletedProcess[str]) -> str:
    return cli_one_line_error(r.stderr)


def devices(big: int = 3_000_000) -> list[SyntheticVfioDevice]:
    return [SyntheticVfioDevice(idstr="0000:00:05.0/vfio", precopy_size=200_000, stopcopy_size=big,
                                marker=MARK_A, seed=11),
            SyntheticVfioDevice(idstr="0000:00:06.0/vfio", stopcopy_size=70_001, framing="v2",
                                marker=MARK_B, seed=12)]


@pytest.fixture(scope="module")
def injected(real_save_image: Path, tmp_path_factory) -> tuple[Path, list[SyntheticVfioDevice]]:
    out = tmp_path_factory.mktemp("inj") / "vfio.save"
    devs = devices()
    with open(out, "wb") as fh:
        inject(str(real_save_image), fh, devs)
    return out, devs


@pytest.mark.e2e
def test_strip_then_splice_round_trip_on_a_real_save_image(injected, tmp_path):
    src, devs = injected
    store = tmp_path / "store"
    stripped, back = tmp_path / "stripped", tmp_path / "back"
    r = cli("strip", str(src), str(stripped), "--store", str(store), "--json", check=True)
    out = json.loads(r.stdout)
    got = {d["idstr"]: d for d in out["devices"]}
    for d in devs:
        assert got[d.idstr]["length"] == d.state_bytes
        assert got[d.idstr]["sha256"] == d.expected_sha256()
        assert got[d.idstr]["token"].startswith("mdev-state-v1:")
    data = stripped.read_bytes()
    assert MARK_A in src.read_bytes() and MARK_A not in data and MARK_B not in data
    assert len(data) < src.stat().st_size - 3_000_000
    insp = json.loads(cli("inspect", "--json", str(stripped), check=True).stdout)
    assert insp["kind"] == "save-image" and all(v["state_bytes"] == 0 and v["token_records"] > 0 for v in insp["vfio"])
    cli("splice", str(stripped), str(back), "--store", str(store), check=True)
    assert back.read_bytes() == src.read_bytes()
    # splice of the unstripped image: stores and verifies, output identical
    again = tmp_path / "again"
    r = cli("splice", str(src), str(again), "--store", str(store), "--json", check=True)
    assert again.read_bytes() == src.read_bytes()
    assert {d["sha256"] for d in json.loads(r.stdout)["devices"]} == {d.expected_sha256() for d in devs}
    st = os.stat(store)
    assert st.st_mode & 0o777 == 0o700
    for name in os.listdir(store):
        assert os.stat(store / name).st_mode & 0o777 == 0o600


@pytest.mark.e2e
def test_stripped_and_spliced_real_image_restores_and_runs(real_save_image, real_save_guest, libvirt_host, tmp_path):
    store = tmp_path / "store"
    stripped, back = tmp_path / "s.save", tmp_path / "b.save"
    cli("strip", str(real_save_image), str(stripped), "--store", str(store), check=True)
    cli("splice", str(stripped), str(back), "--store", str(store), check=True)
    assert back.read_bytes() == real_save_image.read_bytes()
    libvirt_host.virsh("restore", str(back))
    try:
        assert libvirt_host.domstate(real_save_guest.name) == "running"
    finally:
        libvirt_host.virsh("destroy", real_save_guest.name, check=False)


@pytest.mark.e2e
def test_tampered_state_is_refused_by_splice(injected, tmp_path):
    src, _devs = injected
    store = tmp_path / "store"
    stripped = tmp_path / "stripped"
    out = json.loads(cli("strip", str(src), str(stripped), "--store", str(store), "--json", check=True).stdout)
    victim = store / f"{out['devices'][0]['sha256']}.state"
    with open(victim, "r+b") as fh:
        fh.seek(1000)
        fh.write(b"X")
    r = cli("splice", str(stripped), str(tmp_path / "back"), "--store", str(store))
    assert r.returncode == 4
    assert "does not match its manifest" in one_line_error(r)
    assert not (tmp_path / "back").exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".back.tmp")]


@pytest.mark.e2e
def test_state_for_a_device_the_domain_lacks_is_refused(injected, tmp_path):
    src, _ = injected
    xml = tmp_path / "dom.xml"
    xml.write_text("<domain type='kvm'><name>d</name><uuid>11111111-2222-4333-8444-555555555555</uuid><devices>"
                   "<hostdev mode='subsystem' type='mdev' model='vfio-pci'><source>"
                   "<address uuid='4b20d080-1b54-4048-85b3-a6a62d165c01'/></source>"
                   "<address type='pci' domain='0x0000' bus='0x00' slot='0x05' function='0x0'/></hostdev>"
                   "</devices></domain>")
    r = cli("strip", str(src), str(tmp_path / "o"), "--store", str(tmp_path / "st"), "--domain-xml", str(xml))
    assert r.returncode == 7
    assert "0000:00:06.0/vfio" in one_line_error(r)
    assert not (tmp_path / "o").exists()


@pytest.mark.e2e
def test_bound_state_carries_the_mdev_uuid(injected, tmp_path):
    src, _ = injected
    xml = tmp_path / "dom.xml"
    hd = ("<hostdev mode='subsystem' type='mdev' model='vfio-pci'><source><address uuid='{u}'/></source>"
          "<address type='pci' domain='0x0000' bus='0x00' slot='0x{s:02x}' function='0x0'/></hostdev>")
    xml.write_text("<domain><name>d</name><devices>" + hd.format(u="4b20d080-1b54-4048-85b3-a6a62d165c01", s=5)
                   + hd.format(u="4b20d080-1b54-4048-85b3-a6a62d165c02", s=6) + "</devices></domain>")
    out = json.loads(cli("strip", str(src), str(tmp_path / "o"), "--store", str(tmp_path / "st"),
                         "--domain-xml", str(xml), "--json", check=True).stdout)
    assert {d["idstr"]: d["mdev_uuid"] for d in out["devices"]} == {
        "0000:00:05.0/vfio": "4b20d080-1b54-4048-85b3-a6a62d165c01",
        "0000:00:06.0/vfio": "4b20d080-1b54-4048-85b3-a6a62d165c02"}


def _vfio_stream(tmp_path: Path, real_qmp_stream: Path, size: int) -> Path:
    out = tmp_path / "big.stream"
    with open(out, "wb") as fh:
        inject(str(real_qmp_stream), fh, [SyntheticVfioDevice(stopcopy_size=size, marker=MARK_A)])
    return out


@pytest.mark.e2e
def test_kill_9_mid_strip_leaves_nothing_the_loader_accepts(real_qmp_stream, tmp_path):
    src = _vfio_stream(tmp_path, real_qmp_stream, 400 << 20)
    store = tmp_path / "store"
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-m", "libvirt_mdev.cli", "strip", str(src), str(out), "--store", str(store)],
                         cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until state is being written
        temps = list(os.listdir(store)) if store.exists() else []
        if any(n.startswith(".tmp") and os.stat(store / n).st_size > (1 << 20) for n in temps):
            break
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not out.exists()
    names = os.listdir(store)
    assert not [n for n in names if n.endswith(".json")], names  # no manifest: no token resolves
    with Store.open(store) as st:
        assert st.list() == []
    r = cli("store", "gc", "--store", str(store), "--json", check=True)
    assert json.loads(r.stdout)["removed_temp"]
    assert not [n for n in os.listdir(store) if n.startswith(".tmp")]
    # the killed run's output temp file is removed by the next run writing the same name
    assert [n for n in os.listdir(tmp_path) if n.startswith(".out.tmp-")]
    cli("strip", str(real_qmp_stream), str(out), "--store", str(store), check=True)
    assert out.exists() and not [n for n in os.listdir(tmp_path) if n.startswith(".out.tmp-")]


@pytest.mark.e2e
def test_out_of_space_mid_strip_is_a_clean_error(real_qmp_stream, tmp_path):
    src = _vfio_stream(tmp_path, real_qmp_stream, 8 << 20)
    store = tmp_path / "small"
    store.mkdir(mode=0o700)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(store)], check=True)
    try:
        r = cli("strip", str(src), str(tmp_path / "out"), "--store", str(store))
        assert r.returncode == 4
        assert "no space left" in one_line_error(r)
        assert not (tmp_path / "out").exists()
        assert not [n for n in os.listdir(store) if n.endswith(".json") or n.endswith(".state")]
    finally:
        subprocess.run(["umount", str(store)], check=True)


def test_block_larger_than_the_stream_is_refused(tmp_path):
    from libvirt_mdev.stream.wire import BE64
    from tests.stream.test_reader import _stream_with, vfio_records
    s, e, c = vfio_records(30, b"y" * 100)
    e = e.replace(BE64.pack(100), BE64.pack(1 << 40), 1)
    src = tmp_path / "claim.stream"
    src.write_bytes(_stream_with(s, e, c))
    r = cli("strip", str(src), str(tmp_path / "out"), "--store", str(tmp_path / "st"))
    assert r.returncode == 3
    assert "VFIO data block" in one_line_error(r)
    assert not (tmp_path / "out").exists()
    assert not [n for n in os.listdir(tmp_path / "st") if not n.startswith(".lock")]


def test_token_records_are_refused_from_a_live_peer(tmp_path):
    """A source must not be able to name state already in our store (proxy mode)."""
    import io

    from libvirt_mdev.errors import TokenError
    from libvirt_mdev.filter import TOKEN_MAGIC, FilterOptions, filter_stream
    from libvirt_mdev.stream.writer import encode_vfio_block
    from tests.stream.test_reader import _stream_with, vfio_records
    s, e, c = vfio_records(30, b"z")
    forged = e.replace(encode_vfio_block(b"z"), encode_vfio_block(TOKEN_MAGIC + b'{"v":1}'), 1)
    with Store.open(tmp_path / "st", create=True) as st:
        with pytest.raises(TokenError, match="only accepted by an offline splice"):
            filter_stream(io.BytesIO(_stream_with(s, forged, c)), io.BytesIO().write, st,
                          FilterOptions(mode="splice", accept_tokens=False))
        assert st.list() == []
