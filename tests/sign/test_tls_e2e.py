"""TLS live migrations (what ``virsh migrate --tls`` sets up) between two real QEMU 7.2
processes with test certificates, through both proxies: each proxy terminates TLS with
the host's migration certificates and re-originates it, and signs / verifies in between.
Plus the refusals: TLS into a proxy without certificates, plain into a TLS proxy, and a
source whose client certificate is from another CA."""
from __future__ import annotations

from pathlib import Path

import pytest

from .live import World, make_world, migrate
from .pki import make_pki

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture
def world(tmp_path: Path, e2e_tools) -> World:
    return make_world(tmp_path)


@pytest.fixture
def pki(tmp_path: Path) -> Path:
    return make_pki(tmp_path / "pki", "lmdest")


def test_tls_live_migration_through_both_proxies_signed_and_verified(world, pki):
    src_cfg, dst_cfg = world.configs("a")
    o = migrate(world, src_cfg, dst_cfg, qemu_tls=pki, proxy_tls=pki)
    assert o.dst_outcome == "running", (o.dst_outcome, [r.error for r in o.src_results + o.dst_results])
    assert o.src_status == "postmigrate"
    s, d = o.src_results[0], o.dst_results[0]
    assert s.ok and d.ok, (s.error, d.error)
    assert d.bytes_in > 100_000  # the proxy parsed the plain stream inside the TLS
    assert d.bytes_back > 0 and s.bytes_back == d.bytes_back  # the return path crossed both bridges
    assert (world.dir / "store" / f"replay-{world.keys['a'].key_id}-{s.domain_uuid}.seq").exists()


def test_tls_migration_into_a_proxy_without_certificates_is_refused(world, pki):
    src_cfg, dst_cfg = world.configs("a")
    o = migrate(world, src_cfg, dst_cfg, qemu_tls=pki, src_proxy_tls=pki)  # dest proxy has no --tls-dir
    assert o.dst_outcome.startswith("failed") and o.src_status == "running"
    err = o.dst_results[0].error
    assert "uses TLS" in err and "--tls" in err and "\n" not in err


def test_plain_source_into_a_tls_proxy_is_refused(world, pki):
    src_cfg, dst_cfg = world.configs("a")
    o = migrate(world, src_cfg, dst_cfg, dst_proxy_tls=pki)  # QEMUs and source proxy in plain text
    assert o.dst_outcome.startswith("failed") and o.src_status == "running"
    assert "did not start TLS" in o.dst_results[0].error


def test_source_host_with_certificates_from_another_ca_is_refused(world, pki, tmp_path):
    """The source host (QEMU and its proxy) holds certificates of another CA than the
    destination's: the destination proxy's handshake fails, nothing is forwarded."""
    other = make_pki(tmp_path / "other", "lmdest")
    src_cfg, dst_cfg = world.configs("a")
    o = migrate(world, src_cfg, dst_cfg, qemu_tls=other, src_proxy_tls=other, dst_proxy_tls=pki)
    assert o.dst_outcome.startswith("failed") and o.src_status == "running"
    d = o.dst_results[0]
    assert not d.ok and "handshake failed" in d.error and d.bytes_out == 0, d.error
