"""Issue 11 item 4: signed save images and restore permits (no libvirt needed here; the
real `virsh save`/`virsh restore` run is tests/offline/test_saveimage_e2e.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from libvirt_mdev.sign.keys import generate_key, write_key_pair
from libvirt_mdev.store.permit import RestoreNotVerified, admit_restore, write_permit
from tests.store.conftest import make_sysfs

from .saveimg import DOM_UUID, MARK, U5, U6, cli, domain_xml, one_line, save_image

XML = domain_xml({5: U5, 6: U6}, types={U5: "nvidia-63", U6: "nvidia-63"})


def host(tmp: Path, name: str, trusted: list[Path] = (), require: bool = True) -> tuple[Path, Path]:
    """(config, public key) of host *name*: its own store, runtime dir and key pair."""
    d = tmp / name
    d.mkdir()
    _priv, pub = write_key_pair(generate_key(name), d / "keys", uid=os.geteuid())
    cfg = d / "lm.conf"
    cfg.write_text(f"[libvirt-mdev]\nstore = {d / 'store'}\nruntime_dir = {d / 'run'}\n"
                   f"host_key = {d / 'keys' / 'host.key'}\nrequire_signature = {'yes' if require else 'no'}\n"
                   f"trusted_keys = {' '.join(map(str, trusted))}\n")
    return cfg, pub


@pytest.fixture
def hosts(tmp_path: Path) -> tuple[Path, Path, Path]:
    a, pub_a = host(tmp_path, "A", require=False)
    trusted = tmp_path / "trusted"
    trusted.mkdir(mode=0o755)
    (trusted / "A.pub").write_bytes(pub_a.read_bytes())
    b, _ = host(tmp_path, "B", [trusted / "A.pub"])
    c, _ = host(tmp_path, "C", require=False)  # an unknown key
    return a, b, c


def test_sign_on_a_verify_on_b_then_permit_admits_once(tmp_path: Path, hosts) -> None:
    a, b, _c = hosts
    img = save_image(tmp_path / "vm.save", XML)
    # A: strip (state into A's store), then sign: the stripped image's tokens are resolved
    assert cli("strip", str(img), str(tmp_path / "vm.stripped"), config=a).returncode == 0
    r = cli("sign", str(tmp_path / "vm.stripped"), str(tmp_path / "vm.signed"), "--json", config=a)
    assert r.returncode == 0, r.stderr
    kinds = [s["kind"] for s in json.loads(r.stdout)["statements"]]
    assert kinds.count("device") == 2 and kinds.count("config") == 2 and kinds[0] == "hello"
    # B: verifying splice; output = the original image, byte for byte; manifests keep the signature
    out = tmp_path / "vm.verified"
    r = cli("splice", str(tmp_path / "vm.signed"), str(out), "--json", config=b)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == img.read_bytes()
    rows = json.loads(cli("store", "list", "--json", config=b).stdout)["states"]
    assert len(rows) == 2 and all(s["signature"] and s["status"] == "ready" for s in rows)
    # load on B verifies the signature again (require_signature is on)
    sysfs = make_sysfs(tmp_path / "sys", {U5: "nvidia-63", U6: "nvidia-63"})
    tok = next(f"mdev-state-v1:{s['id']}" for s in rows if s["mdev_uuid"] == U5)
    r = cli("load", tok, "--mdev", U5, "--sysfs-root", str(sysfs), "--sink", str(tmp_path / "sink"), config=b)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "sink").read_bytes().startswith(MARK)
    # the permit: libvirtd stands in as a process holding the image open
    holder = subprocess.Popen([sys.executable, "-c", "import sys,time; f=open(sys.argv[1],'rb'); time.sleep(60)",
                               str(out)])
    try:
        time.sleep(0.5)
        with pytest.raises(RestoreNotVerified, match="libvirt-mdev splice"):
            admit_restore(tmp_path / "B" / "run", "11111111-2222-4333-8444-555555555555", holder.pid)
        p = admit_restore(tmp_path / "B" / "run", DOM_UUID, holder.pid, require_signer=True)
        assert p.domain_uuid == DOM_UUID and p.signer is not None
        with pytest.raises(RestoreNotVerified):  # spent: one verification, one restore
            admit_restore(tmp_path / "B" / "run", DOM_UUID, holder.pid)
    finally:
        holder.kill()
        holder.wait()


def test_permit_refuses_changed_file_expired_and_unheld(tmp_path: Path) -> None:
    f = tmp_path / "img"
    f.write_bytes(b"x" * 100)
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", "import sys,time; f=open(sys.argv[1],'rb'); time.sleep(60)",
                               str(f)])
    try:
        time.sleep(0.5)
        write_permit(run, DOM_UUID, f, "0" * 64)
        with open(f, "r+b") as fh:  # changed after verification: ctime moves
            fh.write(b"y")
        with pytest.raises(RestoreNotVerified):
            admit_restore(run, DOM_UUID, holder.pid)
        write_permit(run, DOM_UUID, f, "0" * 64, now=time.time() - 10_000)  # expired
        with pytest.raises(RestoreNotVerified):
            admit_restore(run, DOM_UUID, holder.pid)
        write_permit(run, DOM_UUID, f, "0" * 64)
        idle = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        try:
            with pytest.raises(RestoreNotVerified):  # the file is valid, but that process does not hold it
                admit_restore(run, DOM_UUID, idle.pid)
        finally:
            idle.kill()
            idle.wait()
        with pytest.raises(RestoreNotVerified):  # unsigned permit where signatures are required
            admit_restore(run, DOM_UUID, holder.pid, require_signer=True)
        assert admit_restore(run, DOM_UUID, holder.pid).domain_uuid == DOM_UUID
    finally:
        holder.kill()
        holder.wait()


def test_unsigned_tampered_and_unknown_key_images_refused(tmp_path: Path, hosts) -> None:
    a, b, c = hosts
    img = save_image(tmp_path / "vm.save", XML)
    out = tmp_path / "out"
    one_line(cli("splice", str(img), str(out), config=b), 11, "no source signature", "libvirt-mdev sign")
    one_line(cli("strip", str(img), str(out), config=b), 11, "no source signature")
    assert not out.exists()
    rows = json.loads(cli("store", "list", "--json", config=b).stdout)["states"]
    assert rows and all(s["status"] == "refused" for s in rows)
    # unknown key
    assert cli("sign", str(img), str(tmp_path / "c.signed"), config=c).returncode == 0
    one_line(cli("splice", str(tmp_path / "c.signed"), str(out), config=b), 11, "unknown key")
    # tampered: one byte of device state, and one byte of a config section
    assert cli("sign", str(img), str(tmp_path / "a.signed"), config=a).returncode == 0
    data = (tmp_path / "a.signed").read_bytes()
    at = data.index(MARK) + 3
    bad = tmp_path / "t.signed"
    bad.write_bytes(data[:at] + bytes([data[at] ^ 1]) + data[at + 1:])
    one_line(cli("splice", str(bad), str(out), config=b), 11, "changed in transit")
    assert not out.exists() and not (tmp_path / "B" / "run" / "permits").exists()
    # a signed image fed straight to QEMU would carry records QEMU refuses; unsigned splice output has none
    assert b"libvirt-mdev/signed-statement" in data


def test_signed_image_on_a_host_without_keys_is_spliced_without_its_records(tmp_path: Path, hosts) -> None:
    a, _b, c = hosts  # C trusts nobody and requires nothing
    img = save_image(tmp_path / "vm.save", XML)
    assert cli("sign", str(img), str(tmp_path / "s"), config=a).returncode == 0
    r = cli("splice", str(tmp_path / "s"), str(tmp_path / "o"), config=c)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o").read_bytes() == img.read_bytes()
