"""Fixtures for signed-state tests: host keys, a stream with two synthetic VFIO
devices (QEMU's framing around made-up state), and the domain binding both sides use."""
from __future__ import annotations

import dataclasses
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from libvirt_mdev.errors import MdevError
from libvirt_mdev.filter import Binding, FilterOptions
from libvirt_mdev.sign.keys import SigningKey, TrustedKeys, generate_key
from libvirt_mdev.sign.layers import ReplayGuard, SignContext, VerifyPolicy, sign_stream, verify_stream
from libvirt_mdev.store import Store
from testkit.synth import SyntheticVfioDevice, inject
from tests.proxy.conftest import injected_stream, proxy_env  # noqa: F401 - fixtures for the proxy tests here
from tests.stream.builders import small_stream

DOMAIN = "0f3e2b44-91aa-4b8f-8a1c-2a9c1d7e5b10"
OTHER_DOMAIN = "0f3e2b44-91aa-4b8f-8a1c-2a9c1d7e5b11"
MDEV_A = "5b1c1f36-2d0b-4c8e-9a43-7d2f3c0e9a01"
MDEV_B = "5b1c1f36-2d0b-4c8e-9a43-7d2f3c0e9a02"
IDSTR_A = "0000:00:05.0/vfio"
IDSTR_B = "0000:00:06.0/vfio"
MARK_A = b"\x8f-STATE-OF-DEVICE-A-" + os.urandom(6).hex().encode()
MARK_B = b"\x8f-STATE-OF-DEVICE-B-" + os.urandom(6).hex().encode()
BINDINGS = {IDSTR_A: Binding(MDEV_A, "nvidia-63"), IDSTR_B: Binding(MDEV_B, "nvidia-64")}


def devices() -> list[SyntheticVfioDevice]:
    return [SyntheticVfioDevice(idstr=IDSTR_A, precopy_size=30_000, stopcopy_size=300_000,
                                marker=MARK_A, seed=21),
            SyntheticVfioDevice(idstr=IDSTR_B, stopcopy_size=50_001, framing="v2", marker=MARK_B,
                                seed=22)]


@pytest.fixture(scope="session")
def plain_stream(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """An unsigned stream: hand-built RAM and vmstate sections plus two VFIO devices."""
    d = tmp_path_factory.mktemp("plain")
    base = d / "base.stream"
    base.write_bytes(small_stream())
    out = io.BytesIO()
    inject(str(base), out, devices())
    return out.getvalue()


@pytest.fixture(scope="session")
def key_a() -> SigningKey:
    return generate_key("src-a")


@pytest.fixture(scope="session")
def key_b() -> SigningKey:
    return generate_key("src-b")


def sign(data: bytes, key: SigningKey, **over: Any) -> bytes:
    ctx = SignContext(key=key, source_host="src-a", domain_uuid=DOMAIN, bindings=dict(BINDINGS))
    for k, v in over.items():
        setattr(ctx, k, v)
    out = bytearray()
    sign_stream(io.BytesIO(data), out.extend, ctx)
    return bytes(out)


@dataclass
class Outcome:
    output: bytes
    error: MdevError | None
    results: list[Any]
    verified: list[dict[str, Any]]
    #: idstr -> data blocks verified ahead of forwarding
    blocks: dict[str, int] = dataclasses.field(default_factory=dict)


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store.open(tmp_path / "store", create=True, uid=os.geteuid())
    yield s
    s.close()


def verify(data: bytes, store: Store, trusted: list[SigningKey], *, require: bool = True,
           domain: str | None = DOMAIN, mode: str = "splice", **policy: Any) -> Outcome:
    opts = FilterOptions(mode=mode, domain_name="guest1", domain_uuid=domain,
                         bindings=dict(BINDINGS), migration_id="dest-mig-1")
    pol = VerifyPolicy(TrustedKeys(k.public for k in trusted), require=require,
                       replay=ReplayGuard(store), **policy)
    out = bytearray()
    try:
        results, layer = verify_stream(io.BytesIO(data), out.extend, store, opts, pol)
    except MdevError as exc:
        return Outcome(bytes(out), exc, [], [])
    return Outcome(bytes(out), None, results, layer.verified, layer.blocks_verified())
