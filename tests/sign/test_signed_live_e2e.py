"""Live migrations of a real QEMU 7.2 guest through a signing source proxy and a
verifying destination proxy (loopback, UNIX sockets), and what QEMU does when a
signed stream reaches it without the destination proxy (it must fail closed).

The guest has no mdev (no vGPU on this machine), so what is signed and verified
live is the stream's hello statement (domain, migration, freshness, replay); the
per-device statements are exercised on QEMU-framed streams in test_signed_stream.py.
The source proxy finds the domain from the connecting QEMU's ``-uuid`` (SO_PEERCRED),
as it would for libvirt's QEMU.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from .live import DOMAIN, World, make_world, migrate

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture
def world(tmp_path: Path, e2e_tools) -> World:
    return make_world(tmp_path)


def test_signed_live_migration_through_both_proxies(world):
    src_cfg, dst_cfg = world.configs("a")
    o = migrate(world, src_cfg, dst_cfg)
    assert o.dst_outcome == "running", o.dst_outcome
    assert o.src_status == "postmigrate"
    assert len(o.src_results) == 1 and o.src_results[0].ok and o.src_results[0].domain_uuid == DOMAIN
    assert len(o.dst_results) == 1 and o.dst_results[0].ok, o.dst_results[0].error
    # the hello was verified and the replay guard advanced to the source's migration
    guard = world.dir / "store" / f"replay-{world.keys['a'].key_id}-{DOMAIN}.seq"
    assert json.loads(guard.read_text())["migration"] == o.src_results[0].migration_id
    d = o.dst_results[0]
    assert d.bytes_out < d.bytes_in  # the signed record did not reach QEMU
    assert d.bytes_back > 0  # QEMU's return path came back through both proxies


def test_live_migration_signed_by_an_untrusted_key_is_aborted(world):
    src_cfg, dst_cfg = world.configs("b")  # the destination trusts only host b
    o = migrate(world, src_cfg, dst_cfg)
    assert o.dst_outcome.startswith("failed"), o.dst_outcome
    assert o.src_status == "running"  # the source kept the guest
    assert len(o.dst_results) == 1 and not o.dst_results[0].ok
    assert "unknown key" in o.dst_results[0].error and o.dst_results[0].exit_code == 11


def test_signed_stream_without_destination_proxy_fails_closed_in_qemu(world):
    src_cfg, _ = world.configs("a")
    o = migrate(world, src_cfg, None)
    assert o.dst_outcome.startswith("failed"), o.dst_outcome
    assert o.src_status == "running"
    assert "libvirt-mdev/signed-statement" in o.dst_stderr and "Unknown savevm section" in o.dst_stderr
