"""`virsh migrate --live` between two real libvirt hosts, signed on A and verified on B.

The layout the README documents (UNIX-socket migration, libvirt ≥ 6.8):

* A: ``libvirt-mdev proxy --mode sign --listen unix:/run/libvirt/mig/sig.sock --forward B:PORT``
  (A's host key from ``libvirt-mdev keygen``; the domain is found from the connecting
  QEMU's ``-uuid`` and its XML read from A's libvirtd);
* B: our hook in qemu.d arms the migration; ``libvirt-mdev proxy --listen B:PORT --forward
  unix:/run/libvirt/mig/sig.sock`` with ``require_signature = yes`` and A's public key in
  ``trusted_keys``;
* ``virsh migrate --live DOM B --migrateuri unix:///run/libvirt/mig/sig.sock``.

With ``--tls`` (``virsh migrate --tls --tls-destination A``) both proxies also get
``--tls-dir`` (libvirt's ``migrate_tls_x509_cert_dir``) and ``--tls-hostname B``.

The guest has no mdev (no hardware here): the signed hello is what is verified live.
"""
from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from libvirt_mdev.sign.keys import generate_key, write_key_pair
from tests.harness import logging_hook
from tests.harness.guests import migratable_guest
from tests.harness.migration import CONF, ProxyProcess, config_text, define_and_start, our_hook
from tests.harness.twohosts import TwoHosts

from .pki import make_pki

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

KEYDIR = "/etc/libvirt/libvirt-mdev"
SOCK = "/run/libvirt/mig/sig.sock"
PORT = 49160
PKI = "/etc/libvirt/pki-migration"


def b_config(trusted: str) -> str:
    return config_text(arm_all=True, require_signature=True, trusted_keys=trusted, require_guard=False)


@pytest.fixture(scope="module")
def hosts(e2e_tools: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoHosts]:
    base = tmp_path_factory.mktemp("sigl")
    pki = make_pki(base / "pki", "lmA", "lmB")
    certs = {side: {f"{PKI}/{f.name}": f.read_bytes() for f in pki[f"lm{side}"].iterdir()} for side in "AB"}
    two = TwoHosts(base / "two", hooks=[logging_hook()], hooks_b=[our_hook(base / "staging")],
                   extra_files_a={CONF: config_text(runtime=None, store=None, host_key=f"{KEYDIR}/host.key"),
                                  **certs["A"]},
                   extra_files_b={CONF: b_config(f"{KEYDIR}/a.pub"), **certs["B"]})
    for host in (two.a, two.b):  # libvirt's TLS migration settings (qemu.conf)
        plain = host._qemu_conf
        host._qemu_conf = lambda plain=plain: (plain() + f'migrate_tls_x509_cert_dir = "{PKI}"\n'  # type: ignore
                                               'migrate_tls_x509_verify = 1\n')
    two.start()
    try:
        # A's host key, as `libvirt-mdev keygen` makes it; B trusts A's public key, not another
        key = generate_key("lmA")
        write_key_pair(key, two.a.host_path(KEYDIR), uid=0)
        kb = two.b.host_path(KEYDIR)
        kb.mkdir(mode=0o755, exist_ok=True)
        (kb / "a.pub").write_text(key.public.to_text())
        (kb / "other.pub").write_text(generate_key("elsewhere").public.to_text())
        for f in ("a.pub", "other.pub"):
            (kb / f).chmod(0o644)
        yield two
    finally:
        two.stop()


def run_migration(hosts: TwoHosts, name: str, tmp_path: Path,
                  tls: bool = False) -> tuple[subprocess.CompletedProcess, dict, dict]:
    spec = migratable_guest(name)
    define_and_start(hosts.a, spec, tmp_path)
    addr = hosts.address("B")
    tls_opts = ["--tls-dir", PKI, "--tls-hostname", "lmB"] if tls else []
    dest = ProxyProcess(hosts.b, "--listen", f"{addr}:{PORT}", "--forward", f"unix:{SOCK}", *tls_opts)
    src = ProxyProcess(hosts.a, "--mode", "sign", "--listen", f"unix:{SOCK}", "--forward", f"{addr}:{PORT}", *tls_opts)
    try:
        started = time.monotonic()
        virsh_tls = ["--tls", "--tls-destination", "lmA"] if tls else []
        r = hosts.migrate(spec.name, *virsh_tls, migrateuri=f"unix://{SOCK}", check=False)
        print(f"virsh migrate: {time.monotonic() - started:.2f}s rc={r.returncode} {r.stderr.strip()}")
        sres = src.result()
        print("source proxy:", sres)
        return r, sres, dest.result(timeout=15)
    finally:
        for p in (src, dest):
            p.stop()


def cleanup(hosts: TwoHosts, name: str) -> None:
    for host in (hosts.a, hosts.b):
        if host.virsh("domstate", name, check=False).stdout.strip() in ("running", "paused"):
            host.virsh("destroy", name, check=False)
    hosts.a.virsh("undefine", name, check=False)


def test_virsh_migrate_signed_on_a_verified_on_b(hosts: TwoHosts, tmp_path: Path) -> None:
    hosts.b.host_path(CONF).write_text(b_config(f"{KEYDIR}/a.pub"))
    name = "sig-ok"
    try:
        r, src, dest = run_migration(hosts, name, tmp_path)
        assert r.returncode == 0, r.stderr
        assert src["ok"] and dest["ok"], (src, dest)
        assert src["domain_uuid"] == dest["domain_uuid"]  # A found the domain from its QEMU
        assert dest["bytes_in"] > dest["bytes_out"] > 1 << 20  # the signed hello was stripped on B
        hosts.b.wait_guest_executes(name)
        assert hosts.a.domstate(name) == "shut off"
        guard = [p.name for p in hosts.b.host_path("/var/lib/libvirt/mdev-state").iterdir()
                 if p.name.startswith("replay-")]
        assert len(guard) == 1 and dest["domain_uuid"] in guard[0]
    finally:
        cleanup(hosts, name)


def test_virsh_migrate_signed_by_an_untrusted_host_is_refused(hosts: TwoHosts, tmp_path: Path) -> None:
    hosts.b.host_path(CONF).write_text(b_config(f"{KEYDIR}/other.pub"))  # B does not trust A
    name = "sig-bad"
    try:
        r, _src, dest = run_migration(hosts, name, tmp_path)
        assert r.returncode != 0
        assert not dest["ok"] and dest["exit_code"] == 11 and "unknown key" in dest["error"], dest
        hosts.a.wait_guest_executes(name)  # libvirt kept the guest on A
        assert hosts.b.virsh("domstate", name, check=False).returncode != 0
    finally:
        cleanup(hosts, name)


def test_virsh_migrate_tls_signed_on_a_verified_on_b(hosts: TwoHosts, tmp_path: Path) -> None:
    """virsh migrate --tls: A's proxy terminates its QEMU's TLS (A's certificate, hence
    --tls-destination A), signs, and re-originates TLS to B's proxy (checked for B's
    name); B's proxy terminates it, verifies, and re-originates TLS to B's QEMU."""
    hosts.b.host_path(CONF).write_text(b_config(f"{KEYDIR}/a.pub"))
    name = "sig-tls"
    try:
        r, src, dest = run_migration(hosts, name, tmp_path, tls=True)
        assert r.returncode == 0, r.stderr
        assert src["ok"] and dest["ok"], (src, dest)
        assert dest["bytes_in"] > dest["bytes_out"] > 1 << 20
        hosts.b.wait_guest_executes(name)
        assert hosts.a.domstate(name) == "shut off"
    finally:
        cleanup(hosts, name)


def test_virsh_migrate_tls_into_a_proxy_without_certificates_is_refused(hosts: TwoHosts, tmp_path: Path) -> None:
    hosts.b.host_path(CONF).write_text(b_config(f"{KEYDIR}/a.pub"))
    name = "sig-tls-no"
    spec = migratable_guest(name)
    define_and_start(hosts.a, spec, tmp_path)
    addr = hosts.address("B")
    dest = ProxyProcess(hosts.b, "--listen", f"{addr}:{PORT}", "--forward", f"unix:{SOCK}")  # no --tls-dir
    relay = ProxyProcess(hosts.a, "--mode", "relay", "--listen", f"unix:{SOCK}", "--forward", f"{addr}:{PORT}")
    try:
        r = hosts.migrate(spec.name, "--tls", "--tls-destination", "lmB", migrateuri=f"unix://{SOCK}",
                          check=False)
        res = dest.result(timeout=30)
        assert r.returncode != 0
        assert not res["ok"] and "uses TLS (virsh migrate --tls)" in res["error"], res
        hosts.a.wait_guest_executes(name)
    finally:
        for p in (relay, dest):
            p.stop()
        cleanup(hosts, name)
