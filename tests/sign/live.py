"""Shared driver for the live tests: a real QEMU 7.2 source and destination joined by a
signing source proxy and (optionally) a verifying destination proxy, over UNIX sockets."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from qemu.qmp.qmp_client import ExecInterruptedError

from libvirt_mdev.config import Config
from libvirt_mdev.live.proxy import MigrationProxy, ProxyOptions, SessionResult
from libvirt_mdev.live.relay import Endpoint
from libvirt_mdev.live.tlsbridge import TlsCreds
from libvirt_mdev.sign.keys import SigningKey, generate_key, write_key_pair
from libvirt_mdev.store.pending import write_pending
from tests.harness._proc import HarnessError
from tests.harness.qemu_vm import QemuVM

DOMAIN = "3c9a4f0e-6b1d-4e7a-9f2c-8d5e1a0b7c64"
DOMAIN_XML = f"<domain type='qemu'><name>sigvm</name><uuid>{DOMAIN}</uuid><devices/></domain>"
TLS_HOST = "lmdest"


@dataclass
class World:
    dir: Path
    keys: dict[str, SigningKey]

    def configs(self, trusted: str) -> tuple[Config, Config]:
        d = self.dir
        src = Config(host_key=d / "keys-a" / "host.key", store=d / "src-store", runtime_dir=d / "src-run")
        dst = Config(store=d / "store", runtime_dir=d / "run", require_signature=True, require_guard=False,
                     trusted_keys=(d / f"{trusted}.pub",))
        return src, dst


def make_world(d: Path) -> World:
    """Keys for two source hosts, public key files, a domain XML, an armed pending record."""
    uid = os.geteuid()
    keys = {}
    for name in ("a", "b"):
        k = generate_key(f"src-{name}")
        write_key_pair(k, d / f"keys-{name}", uid=uid)
        (d / f"{name}.pub").write_text(k.public.to_text())
        keys[name] = k
    (d / "dom.xml").write_text(DOMAIN_XML)
    (d / "run").mkdir(mode=0o700)
    now = int(time.time())
    write_pending(d / "run", {"domain_name": "sigvm", "domain_uuid": DOMAIN, "migration_id": f"{now}-e2e",
                              "created": now, "devices": []}, uid=uid)
    return World(d, keys)


@dataclass
class Outcome:
    src_status: str
    dst_outcome: str
    dst_stderr: str
    src_results: list[SessionResult] = field(default_factory=list)
    dst_results: list[SessionResult] = field(default_factory=list)
    seconds: float = 0.0


def qemu_tls_args(pki: Path | None, endpoint: str) -> list[str]:
    if pki is None:
        return []
    verify = ",verify-peer=on" if endpoint == "server" else ""
    return ["-object", f"tls-creds-x509,id=tls0,dir={pki},endpoint={endpoint}{verify}"]


def migrate(w: World, src_cfg: Config, dst_cfg: Config | None, *, src_qemu_tls: Path | None = None,
            tls_hostname: str = TLS_HOST, dst_qemu_tls: Path | None = None,
            src_proxy_tls: TlsCreds | None = None, dst_proxy_tls: TlsCreds | None = None) -> Outcome:
    """Source QEMU → sign proxy → [verify proxy →] destination QEMU.

    src_qemu_tls / dst_qemu_tls: the QEMUs' x509 credential directories (TLS on);
    tls_hostname: the name the source QEMU checks in the certificate of whoever it
    connects to (libvirt's tls-hostname, ``virsh migrate --tls-destination``);
    src_proxy_tls / dst_proxy_tls: the proxies' ``--tls-dir``/``--tls-hostname``.
    """
    d = w.dir
    dst_sock, dproxy_sock, sproxy_sock = d / "dst.sock", d / "dproxy.sock", d / "sproxy.sock"
    with QemuVM(d / "vm", name="sig-src", memory_mib=128, with_disk=False,
                extra_args=["-uuid", DOMAIN, *qemu_tls_args(src_qemu_tls, "client")]) as src, \
            QemuVM(d / "vm", name="sig-dst", memory_mib=128, with_disk=False, incoming_defer=True,
                   extra_args=["-uuid", DOMAIN, *qemu_tls_args(dst_qemu_tls, "server")]) as dst:
        # with a return path the source waits for the destination's verdict, as libvirt's
        # confirm phase does: a refused migration leaves the source running, never paused
        for vm in (src, dst):
            vm.qmp("migrate-set-capabilities", capabilities=[{"capability": "return-path", "state": True}])
        if dst_qemu_tls is not None:
            dst.qmp("migrate-set-parameters", **{"tls-creds": "tls0"})
        if src_qemu_tls is not None:
            src.qmp("migrate-set-parameters", **{"tls-creds": "tls0", "tls-hostname": tls_hostname})
        dst.incoming(f"unix:{dst_sock}")
        proxies = []
        first_hop = dst_sock
        if dst_cfg is not None:
            opts = ProxyOptions(forward=Endpoint(path=str(dst_sock)), tls=dst_proxy_tls)
            dp = MigrationProxy(dst_cfg, opts)
            dp.bind(Endpoint(path=str(dproxy_sock)))
            proxies.append(dp.start())
            first_hop = dproxy_sock
        sp = MigrationProxy(src_cfg, ProxyOptions(forward=Endpoint(path=str(first_hop)), mode="sign",
                                                  domain_xml=d / "dom.xml",
                                                  tls=src_proxy_tls))
        sp.bind(Endpoint(path=str(sproxy_sock)))
        proxies.append(sp.start())
        started = time.monotonic()
        try:
            src.migrate(f"unix:{sproxy_sock}")
            try:
                src.wait_migration(60)
                dst.wait_status("running", 30)
                outcome = dst.status()
            except (HarnessError, ExecInterruptedError, ConnectionError) as exc:
                # a destination QEMU whose incoming migration failed exits: QMP goes away
                outcome = f"failed: {type(exc).__name__}: {exc}"
            seconds = time.monotonic() - started
            time.sleep(0.3)
            for p in proxies:
                p.join(10)
            src_status = src.status()
        finally:
            for p in proxies:
                p.stop()
        err = (d / "vm" / "sig-dst.stderr").read_text(errors="replace")
        return Outcome(src_status, outcome, err, sp.results, proxies[0].results if dst_cfg else [],
                       round(seconds, 3))


__all__ = ["DOMAIN", "TLS_HOST", "Outcome", "World", "make_world", "migrate", "replace"]
