"""Live migrations of a real QEMU 7.2 guest through a signing source proxy and a
verifying destination proxy (loopback, UNIX sockets), and what QEMU does when a
signed stream reaches it without the destination proxy (it must fail closed).

The guest has no mdev (no vGPU on this machine), so what is signed and verified
live is the stream's hello statement (domain, migration, freshness, replay); the
per-device statements are exercised on real-QEMU-framed streams in
test_signed_stream.py.  The source proxy finds the domain from the connecting
QEMU's ``-uuid`` (SO_PEERCRED), as it does for libvirt's QEMU.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from libvirt_mdev.config import Config
from libvirt_mdev.proxy import MigrationProxy, ProxyOptions
from libvirt_mdev.relay import Endpoint
from libvirt_mdev.sign import generate_key, write_key_pair
from libvirt_mdev.store.pending import write_pending
from tests.harness._proc import HarnessError
from tests.harness.qemu_vm import QemuVM

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DOMAIN = "3c9a4f0e-6b1d-4e7a-9f2c-8d5e1a0b7c64"
DOMAIN_XML = f"<domain type='qemu'><name>sigvm</name><uuid>{DOMAIN}</uuid><devices/></domain>"


@pytest.fixture
def world(tmp_path: Path, e2e_tools):
    """Keys for two source hosts, key files, a domain XML, an armed pending record."""
    d = tmp_path
    uid = os.geteuid()
    keys = {}
    for name in ("a", "b"):
        k = generate_key(f"src-{name}")
        write_key_pair(k, d / f"keys-{name}", uid=uid)
        (d / f"{name}.pub").write_text(k.public.to_text())
        keys[name] = k
    (d / "dom.xml").write_text(DOMAIN_XML)
    (d / "run").mkdir(mode=0o700)
    record = {"domain_name": "sigvm", "domain_uuid": DOMAIN, "migration_id": f"{int(time.time())}-e2e",
              "created": int(time.time()), "devices": []}
    write_pending(d / "run", record, uid=uid)
    return d, keys


def configs(d: Path, trusted: str) -> tuple[Config, Config]:
    src = Config(host_key=d / "keys-a" / "host.key", store=d / "src-store", runtime_dir=d / "src-run")
    dst = Config(store=d / "store", runtime_dir=d / "run", require_signature=True,
                 trusted_keys=(d / f"{trusted}.pub",))
    return src, dst


def migrate(d: Path, src_cfg: Config, dst_cfg: Config | None):
    """Source QEMU → sign proxy → [verify proxy →] destination QEMU.  Returns
    (source status, destination status or error, source result, destination result)."""
    dst_sock, dproxy_sock, sproxy_sock = d / "dst.sock", d / "dproxy.sock", d / "sproxy.sock"
    with QemuVM(d / "vm", name="sig-src", memory_mib=128, with_disk=False,
                extra_args=["-uuid", DOMAIN]) as src, \
            QemuVM(d / "vm", name="sig-dst", memory_mib=128, with_disk=False, incoming_defer=True,
                   extra_args=["-uuid", DOMAIN]) as dst:
        dst.incoming(f"unix:{dst_sock}")
        proxies = []
        first_hop = dst_sock
        if dst_cfg is not None:
            dp = MigrationProxy(dst_cfg, ProxyOptions(forward=Endpoint(path=str(dst_sock))))
            dp.bind(Endpoint(path=str(dproxy_sock)))
            proxies.append(dp.start())
            first_hop = dproxy_sock
        sp = MigrationProxy(src_cfg, ProxyOptions(forward=Endpoint(path=str(first_hop)), mode="sign",
                                                  domain_xml=d / "dom.xml"))
        sp.bind(Endpoint(path=str(sproxy_sock)))
        proxies.append(sp.start())
        try:
            src.migrate(f"unix:{sproxy_sock}")
            try:
                src.wait_migration(60)
                dst.wait_status("running", 30)
                outcome = dst.status()
            except HarnessError as exc:
                outcome = f"failed: {exc}"
            time.sleep(0.3)
            for p in proxies:
                p.join(10)
            src_status = src.status()
        finally:
            for p in proxies:
                p.stop()
        err = (d / "vm" / "sig-dst.stderr").read_text(errors="replace")
        return src_status, outcome, err, sp.results, (proxies[0].results if dst_cfg else [])


def test_signed_live_migration_through_both_proxies(world):
    d, keys = world
    src_cfg, dst_cfg = configs(d, "a")
    src_status, outcome, _err, sres, dres = migrate(d, src_cfg, dst_cfg)
    assert outcome == "running", outcome
    assert src_status == "postmigrate"
    assert len(sres) == 1 and sres[0].ok and sres[0].domain_uuid == DOMAIN
    assert len(dres) == 1 and dres[0].ok, dres[0].error
    # the hello was verified and the replay guard advanced to the source's migration
    guard = d / "store" / f"replay-{keys['a'].key_id}-{DOMAIN}.seq"
    assert json.loads(guard.read_text())["migration"] == sres[0].migration_id
    assert dres[0].bytes_out < dres[0].bytes_in  # the signed record did not reach QEMU


def test_live_migration_signed_by_an_untrusted_key_is_aborted(world):
    d, _keys = world
    src_cfg, dst_cfg = configs(d, "b")  # the destination trusts only host b
    src_status, outcome, _err, sres, dres = migrate(d, src_cfg, dst_cfg)
    assert outcome.startswith("failed"), outcome
    assert src_status == "running"  # the source kept the guest
    assert len(dres) == 1 and not dres[0].ok
    assert "unknown key" in dres[0].error and dres[0].exit_code == 11


def test_signed_stream_without_destination_proxy_fails_closed_in_qemu(world):
    d, _keys = world
    src_cfg, _ = configs(d, "a")
    src_status, outcome, err, _sres, _dres = migrate(d, src_cfg, None)
    assert outcome.startswith("failed"), outcome
    assert src_status == "running"
    assert "libvirt-mdev/signed-statement" in err and "Unknown savevm section" in err, err
