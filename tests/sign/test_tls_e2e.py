"""TLS live migrations (what ``virsh migrate --tls`` sets up) between two real QEMU 7.2
processes with test certificates, through both proxies: each proxy terminates TLS with
its own host's migration certificates and re-originates it, and signs / verifies in
between.  Host A (source) is ``lmsrc``, host B (destination) ``lmdest``; one CA.

Naming, as an operator must wire it: the source QEMU checks the name of whoever it
connects to — its own host's sign proxy — so it is told A's name (``virsh migrate --tls
--tls-destination A``); A's proxy checks B's name (``--tls-hostname B``) on B's proxy;
B's proxy presents B's server certificate and checks B's name on B's QEMU.

Plus the refusals: TLS into a proxy without certificates, plain text into a TLS proxy,
a source host with certificates of another CA, and a source that insists on B's name
from its own host's proxy.
"""
from __future__ import annotations

import logging
from pathlib import Path

import pytest

from libvirt_mdev.live.tlsbridge import TlsCreds

from .live import World, make_world, migrate
from .pki import make_pki

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
A, B = "lmsrc", "lmdest"


@pytest.fixture
def world(tmp_path: Path, e2e_tools) -> World:
    return make_world(tmp_path)


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    return make_pki(tmp_path / "pki", A, B)


def tls_both(pki: dict[str, Path]) -> dict:
    return {"src_qemu_tls": pki[A], "tls_hostname": A, "dst_qemu_tls": pki[B],
                "src_proxy_tls": TlsCreds(pki[A], B), "dst_proxy_tls": TlsCreds(pki[B], B)}


def test_tls_live_migration_through_both_proxies_signed_and_verified(world, pki):
    src_cfg, dst_cfg = world.configs("a")
    o = migrate(world, src_cfg, dst_cfg, **tls_both(pki))
    assert o.dst_outcome == "running", (o.dst_outcome, [r.error for r in o.src_results + o.dst_results])
    assert o.src_status == "postmigrate"
    s, d = o.src_results[0], o.dst_results[0]
    assert s.ok and d.ok, (s.error, d.error)
    assert d.bytes_in > 100_000  # the proxy parsed the plain stream inside the TLS
    assert d.bytes_back > 0 and s.bytes_back == d.bytes_back  # the return path crossed both bridges
    assert (world.dir / "store" / f"replay-{world.keys['a'].key_id}-{s.domain_uuid}.seq").exists()


def test_tls_migration_into_a_proxy_without_certificates_is_refused(world, pki):
    src_cfg, dst_cfg = world.configs("a")
    o = migrate(world, src_cfg, dst_cfg, **dict(tls_both(pki), dst_proxy_tls=None))
    assert o.dst_outcome.startswith("failed") and o.src_status == "running"
    err = o.dst_results[0].error
    assert "uses TLS" in err and "--tls" in err and "\n" not in err


def test_plain_source_into_a_tls_proxy_is_refused(world, pki):
    src_cfg, dst_cfg = world.configs("a")
    o = migrate(world, src_cfg, dst_cfg, dst_proxy_tls=TlsCreds(pki[B], B))  # QEMUs and A's proxy: plain
    assert o.dst_outcome.startswith("failed") and o.src_status == "running"
    assert "did not start TLS" in o.dst_results[0].error


def test_source_host_with_certificates_from_another_ca_is_refused(world, pki, tmp_path):
    """Host A (QEMU and its proxy) holds certificates of another CA than B's: B's proxy's
    handshake fails, nothing is forwarded to B's QEMU."""
    other = make_pki(tmp_path / "other", A)
    src_cfg, dst_cfg = world.configs("a")
    o = migrate(world, src_cfg, dst_cfg, **dict(tls_both(pki), src_qemu_tls=other[A],
                                                src_proxy_tls=TlsCreds(other[A], B)))
    assert o.dst_outcome.startswith("failed") and o.src_status == "running"
    d = o.dst_results[0]
    assert not d.ok and "handshake failed" in d.error and d.bytes_out == 0, d.error


@pytest.fixture
def tls_log() -> list[str]:
    """What the TLS bridge logs (the package logger may not propagate: setup_logging)."""
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("libvirt-mdev.tls")
    logger.addHandler(handler)
    yield lines
    logger.removeHandler(handler)


def test_source_qemu_expecting_the_destination_name_from_its_own_proxy_fails(world, pki, tls_log):
    """Without --tls-destination A, the source QEMU wants B's name from A's proxy, which
    only holds A's certificate: QEMU checks the name after the handshake and hangs up,
    so the migration fails at the first hop and the log says why (documented wiring)."""
    src_cfg, dst_cfg = world.configs("a")
    o = migrate(world, src_cfg, dst_cfg, **dict(tls_both(pki), tls_hostname=B))
    assert o.dst_outcome.startswith("failed") and o.src_status == "running"
    s = o.src_results[0]
    assert not s.ok and s.bytes_in == 0, s.error
    assert "probably rejected our certificate" in s.error and "--tls-destination" in s.error, s.error
