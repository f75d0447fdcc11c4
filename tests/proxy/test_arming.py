"""The proxy's policy and plumbing without QEMU: which record, which types, addresses, sends."""
from __future__ import annotations

import socket
import threading
from dataclasses import replace

import pytest

from libvirt_mdev.errors import MdevError, MdevMissing, NotFound, TypeMismatch, UsageError
from libvirt_mdev.filter import Binding
from libvirt_mdev.live.arming import Claims, bindings_from_pending, check_local_types, select_pending
from libvirt_mdev.live.relay import Endpoint, send_views
from libvirt_mdev.store.pending import read_pending

from .conftest import DOM_UUID, ID_A, ID_B, U1, U2, ProxyEnv

OTHER_UUID = "5a9c2a4e-7d1b-4b8e-8f57-0c1d2e3f4002"


@pytest.mark.parametrize("text,expect", [
    ("10.0.0.2:49152", Endpoint("10.0.0.2", 49152)),
    ("[::1]:5000", Endpoint("::1", 5000)),
    ("unix:/run/libvirt-mdev/m.sock", Endpoint(path="/run/libvirt-mdev/m.sock")),
    ("unix:///run/libvirt/mig/x.sock", Endpoint(path="/run/libvirt/mig/x.sock")),
])
def test_endpoint_parse(text: str, expect: Endpoint) -> None:
    assert Endpoint.parse(text) == expect


@pytest.mark.parametrize("text", ["10.0.0.2", "host:", ":80", "h:99999", "unix:relative.sock", "h:port"])
def test_endpoint_parse_refuses_bad_addresses(text: str) -> None:
    with pytest.raises(UsageError, match="HOST:PORT|absolute"):
        Endpoint.parse(text)


def test_no_pending_record_is_a_refusal(proxy_env: ProxyEnv) -> None:
    with pytest.raises(NotFound, match="no incoming migration is armed"):
        select_pending(proxy_env.config, None)


def test_one_record_is_served_several_need_domain(proxy_env: ProxyEnv) -> None:
    rec = proxy_env.arm()
    assert select_pending(proxy_env.config, None) == rec
    other = proxy_env.arm([], name="vm2", uuid=OTHER_UUID)
    with pytest.raises(MdevError, match="2 incoming migrations are armed .*--domain"):
        select_pending(proxy_env.config, None)
    assert select_pending(proxy_env.config, "vm2") == other
    assert select_pending(proxy_env.config, DOM_UUID) == rec
    with pytest.raises(NotFound, match="domain vm3"):
        select_pending(proxy_env.config, "vm3")


def test_armed_types_are_checked_against_local_sysfs(proxy_env: ProxyEnv) -> None:
    rec = proxy_env.arm()
    check_local_types(rec, proxy_env.config.sysfs_root)  # both match
    rec = replace(rec, devices=(rec.devices[0], replace(rec.devices[1], type="nvidia-223")))
    with pytest.raises(TypeMismatch, match=f"mdev {U2} .* armed for type nvidia-223 but this host now has "
                                           f"type nvidia-224"):
        check_local_types(rec, proxy_env.config.sysfs_root)
    gone = replace(rec.devices[1], mdev_uuid="4b20d080-1b54-4048-85b3-a6a62d165c09")
    rec = replace(rec, devices=(rec.devices[0], gone))
    with pytest.raises(MdevMissing, match="no longer exists"):
        check_local_types(rec, proxy_env.config.sysfs_root)


def test_bindings_follow_the_record(proxy_env: ProxyEnv) -> None:
    assert bindings_from_pending(proxy_env.arm()) == {ID_A: Binding(U1, "nvidia-222"),
                                                     ID_B: Binding(U2, "nvidia-224")}


def test_claims_refuse_a_second_connection_and_a_replay(proxy_env: ProxyEnv) -> None:
    rec = proxy_env.arm()
    claims = Claims()
    claims.claim(rec)
    with pytest.raises(MdevError, match="second connection .*--parallel"):
        claims.claim(rec)
    claims.release(rec)
    with pytest.raises(MdevError, match="already served; refusing a replayed connection"):
        claims.claim(rec)
    assert read_pending(proxy_env.config.runtime_dir, DOM_UUID) == rec  # removal is the session's job


def test_send_views_survives_partial_sends() -> None:
    a, b = socket.socketpair()
    a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    views = [memoryview(bytes([i % 251]) * (i * 997 % 70000 + 1)) for i in range(1500)]  # > IOV_MAX pieces
    want = b"".join(bytes(v) for v in views)
    got = bytearray()

    def drain() -> None:
        while len(got) < len(want):
            got.extend(b.recv(1 << 16))

    t = threading.Thread(target=drain)
    t.start()
    assert send_views(a, views) == len(want)
    t.join(30)
    assert bytes(got) == want
    a.close()
    b.close()


def test_example_config_loads() -> None:
    from pathlib import Path

    from libvirt_mdev.config import load_config

    conf = load_config(Path(__file__).resolve().parents[2] / "examples" / "libvirt-mdev.conf")
    assert conf.proxy_listen == "10.0.0.2:49300" and conf.arm_all is False and conf.mode == "splice"
    Endpoint.parse(conf.proxy_listen)


# --------------------------------------------------------------------------- stale records (issue 12)
def test_a_stale_record_never_blocks_another_domain_and_is_never_served(tmp_path) -> None:
    import time

    from libvirt_mdev.config import Config
    from libvirt_mdev.errors import MdevError
    from libvirt_mdev.live.arming import select_pending
    from libvirt_mdev.store.pending import PENDING_GRACE, write_pending
    from testkit.fakeproc import make_fake_proc

    now = time.time()
    stale_uuid, live_uuid = "5a9c2a4e-7d1b-4b8e-8f57-0c1d2e3f4a01", "5a9c2a4e-7d1b-4b8e-8f57-0c1d2e3f4a02"
    cfg = Config(runtime_dir=tmp_path / "run", store=tmp_path / "store")

    def arm(uuid: str, name: str, created: float) -> None:
        write_pending(cfg.runtime_dir, {"domain_name": name, "domain_uuid": uuid, "migration_id": f"m-{name}",
                                        "created": int(created), "devices": []})

    arm(stale_uuid, "tiny", now - 10)  # 'domain tiny already exists': no QEMU was started for it
    arm(live_uuid, "other", now - 5)
    proc = make_fake_proc(tmp_path / "proc", {live_uuid: now - 4})
    assert select_pending(cfg, None, proc).domain_uuid == live_uuid
    with pytest.raises(MdevError, match="2 incoming migrations are armed"):
        select_pending(cfg, None, None)  # without looking at the QEMUs: today's refusal
    # alone and past its grace, the stale record is refused, not served to any stream
    from libvirt_mdev.store.pending import remove_pending
    remove_pending(cfg.runtime_dir, live_uuid)
    arm(stale_uuid, "tiny", now - PENDING_GRACE - 1)
    with pytest.raises(MdevError, match=r"domain tiny .* is stale: .*pending clear " + stale_uuid):
        select_pending(cfg, None, proc)
