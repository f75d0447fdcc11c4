"""The reference loader re-verifies the source signature kept in the manifest
(``require_signature``), through the real CLI; and ``keygen`` writes a usable key pair."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from pathlib import Path

import pytest

from libvirt_mdev.sign.keys import TrustedKeys, load_signing_key, parse_public_key
from libvirt_mdev.store import issue_token
from libvirt_mdev.store.store import MANIFEST_SUFFIX
from libvirt_mdev.store.tokens import parse_token
from tests.harness.cli import one_line_error, run_cli
from tests.store.conftest import make_sysfs

from .conftest import MDEV_A, MDEV_B, sign, verify

REPO = Path(__file__).resolve().parents[2]


def cli(*args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, config=config)


def one_line(r: subprocess.CompletedProcess[str]) -> str:
    return one_line_error(r.stderr)


@pytest.fixture
def setup(tmp_path: Path, plain_stream, key_a, key_b, store):
    """A store with verified signed states, a fake sysfs with both mdevs, key files, configs."""
    sysfs = make_sysfs(tmp_path / "sys", {MDEV_A: "nvidia-63", MDEV_B: "nvidia-64"})
    keys = tmp_path / "keys"
    keys.mkdir()
    for name, k in (("a.pub", key_a), ("b.pub", key_b)):
        (keys / name).write_text(k.public.to_text())
        (keys / name).chmod(0o644)

    def conf(name: str, require: bool, trusted: str) -> Path:
        p = tmp_path / name
        p.write_text(f"[libvirt-mdev]\nstore = {store.root}\nsysfs_root = {sysfs}\n"
                     f"require_signature = {'yes' if require else 'no'}\ntrusted_keys = {trusted}\n")
        return p

    o = verify(sign(plain_stream, key_a), store, [key_a])
    assert o.error is None
    return {"results": {r.mdev_uuid: r for r in o.results}, "conf": conf, "keys": keys}


def test_load_signed_state_re_verified(setup):
    conf = setup["conf"]("c", True, str(setup["keys"] / "a.pub"))
    r = setup["results"][MDEV_A]
    out = cli("load", r.token, "--mdev", MDEV_A, "--json", config=conf)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["sha256"] == r.sha256 and len(got["signer"]) == 32


def test_load_refuses_state_signed_by_a_key_no_longer_trusted(setup):
    conf = setup["conf"]("c", True, str(setup["keys"] / "b.pub"))
    r = setup["results"][MDEV_A]
    out = cli("load", r.token, "--mdev", MDEV_A, config=conf)
    assert out.returncode == 11
    assert "unknown key" in one_line(out)


def test_load_refuses_unsigned_state_when_required(setup, plain_stream, key_a, store):
    o = verify(plain_stream, store, [key_a], require=False, domain=None)
    assert o.error is None
    token = next(r.token for r in o.results if r.mdev_uuid == MDEV_B)
    conf = setup["conf"]("c", True, str(setup["keys"] / "a.pub"))
    out = cli("load", token, "--mdev", MDEV_B, config=conf)
    assert out.returncode == 11 and "carries no source signature" in one_line(out)
    conf_off = setup["conf"]("off", False, "")
    assert cli("load", token, "--mdev", MDEV_B, config=conf_off).returncode == 0


def test_load_refuses_signature_moved_to_another_state(setup, store):
    """Copy device A's signature onto device B's manifest (a well-formed, correctly
    named manifest file): the rebuilt statement is not what was signed."""
    ra, rb = setup["results"][MDEV_A], setup["results"][MDEV_B]
    ma, mb = store.manifest(parse_token(ra.token)), store.manifest(parse_token(rb.token))
    forged = dataclasses.replace(mb, signature=ma.signature)
    store.dir.write_atomic(forged.id + MANIFEST_SUFFIX, forged.to_json())
    conf = setup["conf"]("c", True, str(setup["keys"] / "a.pub"))
    out = cli("load", issue_token(forged), "--mdev", MDEV_B, config=conf)
    assert out.returncode == 11 and "does not verify" in one_line(out)


def test_trusted_key_file_writable_by_others_refused(setup):
    bad = setup["keys"] / "a.pub"
    bad.chmod(0o666)
    with pytest.raises(Exception) as ei:
        TrustedKeys.from_files([bad])
    assert "others may change it" in str(ei.value)


def test_keygen_writes_root_only_key_pair(tmp_path):
    out = cli("keygen", "--out", str(tmp_path / "k"), "--json")
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    d = tmp_path / "k"
    assert oct(d.stat().st_mode & 0o777) == "0o700"
    assert oct((d / "host.key").stat().st_mode & 0o777) == "0o600"
    key = load_signing_key(d / "host.key", uid=os.geteuid())
    pub = parse_public_key((d / "host.pub").read_bytes())
    assert key.key_id == pub.key_id == got["key_id"]
    again = cli("keygen", "--out", str(d))
    assert again.returncode == 1 and "already exists" in one_line(again)
    (d / "host.key").chmod(0o644)
    with pytest.raises(Exception) as ei:
        load_signing_key(d / "host.key", uid=os.geteuid())
    assert "expected 0600" in str(ei.value)
