"""Per-device signatures through the real proxies over sockets, on a recorded real QEMU 7.2
stream with two synthetic VFIO devices (QEMU's framing, made-up state): the source proxy
in sign mode, the destination proxy with require_signature, a byte sink as the
destination QEMU.  (Live QEMU guests here have no VFIO device; see test_signed_live_e2e.py.)
"""
from __future__ import annotations

import dataclasses
import io
import os
from pathlib import Path

import pytest

from libvirt_mdev.filter import Binding
from libvirt_mdev.live.proxy import MigrationProxy, ProxyOptions
from libvirt_mdev.live.relay import Endpoint
from libvirt_mdev.sign.keys import SigningKey, TrustedKeys, generate_key, verify_manifest, write_key_pair
from libvirt_mdev.sign.layers import SignContext, sign_stream
from libvirt_mdev.stream.wire import BE32, BE64, VfioFlag
from libvirt_mdev.stream.writer import encode_footer
from tests.proxy.conftest import (
    DOM_UUID,
    ID_A,
    ID_B,
    MARK_A,
    U1,
    U2,
    ProxyEnv,
    Sink,
    replay,
    wait_results,
)

DOMAIN_XML = f"""<domain type='kvm'><name>vm1</name><uuid>{DOM_UUID}</uuid><devices>
<hostdev mode='subsystem' type='mdev' model='vfio-pci'><source><address uuid='{U1}'/></source>
<address type='pci' domain='0x0000' bus='0x00' slot='0x05' function='0x0'/></hostdev>
<hostdev mode='subsystem' type='mdev' model='vfio-pci'><source><address uuid='{U2}'/></source>
<address type='pci' domain='0x0000' bus='0x00' slot='0x06' function='0x0'/></hostdev>
</devices></domain>"""


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return generate_key("src")


def trusting(env: ProxyEnv, key: SigningKey) -> ProxyEnv:
    """*env* as a destination that requires signatures and trusts only *key*."""
    pub = env.root / "src.pub"
    pub.write_text(key.public.to_text())
    pub.chmod(0o644)
    env.config = dataclasses.replace(env.config, require_signature=True, trusted_keys=(pub,))
    return env


@pytest.fixture
def signed_env(proxy_env: ProxyEnv, key: SigningKey) -> ProxyEnv:
    return trusting(proxy_env, key)


def sign_proxy(env: ProxyEnv, key: SigningKey, workdir: Path, forward: Endpoint) -> MigrationProxy:
    """The source host's side, started: *key* as its host key, the domain's XML, a sign-mode proxy forwarding to
    *forward*. The caller stops it."""
    write_key_pair(key, workdir / "srckeys", uid=os.geteuid())
    (workdir / "dom.xml").write_text(DOMAIN_XML)
    src_cfg = dataclasses.replace(env.config, host_key=workdir / "srckeys" / "host.key",
                                  require_signature=False, trusted_keys=())
    src = MigrationProxy(src_cfg, ProxyOptions(forward=forward, mode="sign", domain=DOM_UUID,
                                               domain_xml=workdir / "dom.xml"))
    src.bind(Endpoint("127.0.0.1", 0))
    src.start()
    return src


def signed(data: bytes, key: SigningKey) -> bytes:
    ctx = SignContext(key=key, source_host="src", domain_uuid=DOM_UUID,
                      bindings={ID_A: Binding(U1, "nvidia-222"), ID_B: Binding(U2, "nvidia-224")})
    out = bytearray()
    sign_stream(io.BytesIO(data), out.extend, ctx)
    return bytes(out)


def committed(env: ProxyEnv):
    from libvirt_mdev.store import Store
    with Store.open(env.config.store) as s:
        return [e.manifest for e in s.list() if e.manifest is not None]


def test_source_sign_proxy_to_verifying_destination_proxy(signed_env: ProxyEnv, key, injected_stream,
                                                           tmp_path: Path) -> None:
    data, devs = injected_stream
    signed_env.arm()
    sink = Sink(reply=b"\x00\x01\x00\x00")
    dest = signed_env.proxy(sink.endpoint)
    src = sign_proxy(signed_env, key, tmp_path, dest.address)  # the source host, a sign-mode proxy in front
    try:
        got = replay(src.address.port, data)
        wait_results(src)
        wait_results(dest)
    finally:
        src.stop()
    s, d = src.results[0], dest.results[0]
    assert s.ok and d.ok, (s.error, d.error)
    assert sink.wait() and sink.data == data  # every signed record stripped, nothing else changed
    assert got.back == b"\x00\x01\x00\x00"
    assert s.bytes_out > s.bytes_in == len(data) == d.bytes_out
    assert [x["idstr"] for x in s.devices] == [ID_A, ID_B]
    trusted = TrustedKeys([key.public])
    by_id = {m.idstr: m for m in committed(signed_env)}
    for dev in devs:
        m = by_id[dev.idstr]
        assert m.sha256 == dev.expected_sha256() and m.signer == key.key_id
        assert verify_manifest(m, trusted)["mdev_type"] == m.mdev_type


def test_tampered_state_through_the_proxy_never_reaches_its_end_of_state(signed_env: ProxyEnv, key,
                                                                         injected_stream) -> None:
    data, _devs = injected_stream
    bad = bytearray(signed(data, key))
    bad[bad.index(MARK_A) + 5] ^= 0x40
    res, sink = signed_env.replay_once(bytes(bad))
    assert not res.ok and res.error_kind == "signature" and res.exit_code == 11
    assert "changed in transit" in res.error and ID_A in res.error
    sink.wait()
    # what QEMU got stops before device A's END-section END_OF_STATE; A was never committed
    i = data.index(ID_A.encode())
    sid = BE32.unpack_from(data, i - 5)[0]
    end = data.index(BE64.pack(VfioFlag.END_OF_STATE) + encode_footer(sid), data.index(bytes([3]) + BE32.pack(sid)))
    assert len(sink.data) <= end
    assert all(m.idstr != ID_A for m in committed(signed_env))


def test_unsigned_stream_refused_by_a_destination_that_requires_signatures(signed_env: ProxyEnv,
                                                                          injected_stream) -> None:
    data, _devs = injected_stream
    res, sink = signed_env.replay_once(data)
    assert not res.ok and "no signed statement" in res.error and res.exit_code == 11
    sink.wait()
    assert MARK_A not in sink.data and committed(signed_env) == []
