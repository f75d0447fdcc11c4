"""Real QEMU multifd migrations (2 channels) through the relay, the TLS and the signing proxies.

Two QEMUs (the one on PATH: 7.2 here) run with the armed domain's ``-uuid``, as libvirt starts them:

* relay (``--mode relay``, the source host's end of the UNIX-socket layout) in front of a filtering proxy: every
  channel is carried verbatim, the filtering proxy binds and checks them;
* a TLS filtering proxy (``--tls-dir``; QEMU's ``tls-creds`` on both ends): TLS terminated and re-originated
  on each channel, side channels bound like plain ones;
* the signed layout: the signing proxy (``--mode sign``) on the source's UNIX socket in front of a verifying
  filtering proxy.  A side channel of another VM is refused alone (the migration completes); a side channel
  that another process opens with the signed domain's uuid fails the migration closed (the guest stays).
"""
from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from libvirt_mdev.config import Config
from libvirt_mdev.live.proxy import MigrationProxy, ProxyOptions, SessionResult
from libvirt_mdev.live.relay import Endpoint
from libvirt_mdev.live.tlsbridge import TlsCreds
from testkit.multifd import channel_init, device_packet
from tests.harness.qemu_vm import QemuVM
from tests.harness.relay import SideChannelInjector
from tests.harness.util import free_port, random_file
from tests.sign.live import DOMAIN, World, make_world
from tests.sign.pki import make_pki

from .conftest import DOM_UUID, ProxyEnv, assert_source_kept_the_guest, wait_results

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
MIB = 128
A, B = "lmsrc", "lmdest"
OTHER_UUID = "0b0b0b0b-1111-4222-8333-444455556666"


@pytest.fixture(scope="module")
def ram_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random guest RAM: most of it travels on the side channels."""
    return random_file(tmp_path_factory.mktemp("mfmodes") / "ram.bin", MIB)


def qemu_pair(tmp_path: Path, ram_file: Path, uuid: str, *, src_args: tuple[str, ...] = (),
              dst_args: tuple[str, ...] = ()) -> Iterator[tuple[QemuVM, QemuVM]]:
    """A source and a ``-incoming defer`` destination with multifd (2 channels) and a return path."""
    src = QemuVM(tmp_path, name="src", memory_mib=MIB, with_disk=False, ram_file=ram_file,
                 extra_args=["-uuid", uuid, *src_args])
    dst = QemuVM(tmp_path, name="dst", memory_mib=MIB, with_disk=False, ram_file=ram_file, incoming_defer=True,
                 extra_args=["-uuid", uuid, *dst_args])
    with src, dst:
        for vm in (src, dst):
            vm.qmp("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True},
                                                             {"capability": "return-path", "state": True}])
            vm.qmp("migrate-set-parameters", **{"multifd-channels": 2})
        yield src, dst


def start(px: MigrationProxy, listen: Endpoint) -> MigrationProxy:
    px.bind(listen)
    return px.start()


def test_multifd_through_a_relay_and_a_filtering_proxy(proxy_env: ProxyEnv, tmp_path: Path, ram_file: Path) -> None:
    proxy_env.arm([])
    for src, dst in qemu_pair(tmp_path, ram_file, DOM_UUID):
        port = free_port()
        dst.incoming(f"tcp:127.0.0.1:{port}")
        px = proxy_env.proxy(Endpoint("127.0.0.1", port))
        relay = start(MigrationProxy(proxy_env.config, ProxyOptions(forward=px.address, mode="relay")),
                      Endpoint(path=str(tmp_path / "relay.sock")))
        try:
            src.migrate(f"unix:{tmp_path / 'relay.sock'}")
            assert src.wait_migration(timeout=180)["status"] == "completed"
            dst.wait_status("running", timeout=60)
            wait_results(px, timeout=60)
            wait_results(relay, 3, timeout=60)   # the relay carried 3 connections: main + 2 side channels
        finally:
            relay.stop()
        assert px.results[0].ok, px.results[0].error
        assert all(r.ok for r in relay.results), [r.error for r in relay.results]
        assert px.channels is not None and not px.channels.refusals
        assert sum(r.bytes_in for r in relay.results) > (MIB << 20) // 2   # the RAM went through the relay
        assert "2 multifd channel(s)" in proxy_env.config.log_file.read_text()


def tls_args(d: Path, endpoint: str) -> tuple[str, ...]:
    verify = ",verify-peer=on" if endpoint == "server" else ""
    return ("-object", f"tls-creds-x509,id=tls0,dir={d},endpoint={endpoint}{verify}")


def test_multifd_through_a_tls_filtering_proxy(proxy_env: ProxyEnv, tmp_path: Path, ram_file: Path) -> None:
    """QEMU runs TLS on each channel: the proxy terminates it on every one, binds the side channels behind
    it and re-originates TLS to the destination QEMU for each."""
    pki = make_pki(tmp_path / "pki", A, B)
    proxy_env.arm([])
    for src, dst in qemu_pair(tmp_path, ram_file, DOM_UUID, src_args=tls_args(pki[A], "client"),
                              dst_args=tls_args(pki[B], "server")):
        port = free_port()
        dst.qmp("migrate-set-parameters", **{"tls-creds": "tls0"})
        src.qmp("migrate-set-parameters", **{"tls-creds": "tls0", "tls-hostname": B})
        dst.incoming(f"tcp:127.0.0.1:{port}")
        px = proxy_env.proxy(Endpoint("127.0.0.1", port), tls=TlsCreds(pki[B], B))
        src.migrate(f"tcp:127.0.0.1:{px.address.port}")
        assert src.wait_migration(timeout=180)["status"] == "completed"
        dst.wait_status("running", timeout=60)
        wait_results(px, timeout=60)
        assert len(px.results) == 1    # the side channels are no sessions of their own
        res = px.results[0]
        assert res.ok and res.tls, res.error
        assert px.channels is not None and not px.channels.refusals
        assert res.bytes_in < (MIB << 20) // 2    # most of the RAM travelled on the side channels
        assert "2 multifd channel(s)" in proxy_env.config.log_file.read_text()


# --------------------------------------------------------------------------- the signed layout
@pytest.fixture
def world(tmp_path: Path) -> World:
    (tmp_path / "w").mkdir()
    return make_world(tmp_path / "w")


class Signed:
    """Source QEMU → signing proxy (UNIX) → verifying filtering proxy (UNIX) → destination QEMU (UNIX)."""

    def __init__(self, w: World, src_cfg: Config, dst_cfg: Config, *, src_tls: TlsCreds | None = None,
                 dst_tls: TlsCreds | None = None, domain: str | None = None) -> None:
        d = w.dir
        self.sock = d / "sproxy.sock"
        self.dst_sock = d / "dst.sock"
        self.dp = start(MigrationProxy(dst_cfg, ProxyOptions(forward=Endpoint(path=str(self.dst_sock)),
                                                             tls=dst_tls)),
                        Endpoint(path=str(d / "dproxy.sock")))
        self.sp = start(MigrationProxy(src_cfg, ProxyOptions(forward=Endpoint(path=str(d / "dproxy.sock")),
                                                             mode="sign", domain_xml=d / "dom.xml", tls=src_tls,
                                                             domain=domain)),
                        Endpoint(path=str(self.sock)))

    def migrate(self, src: QemuVM, dst: QemuVM) -> tuple[SessionResult, SessionResult]:
        """*src* migrates to *dst* through both proxies; once it completed and *dst* runs, each proxy's first
        session: (the signing proxy's, the verifying proxy's)."""
        dst.incoming(f"unix:{self.dst_sock}")
        src.migrate(f"unix:{self.sock}")
        assert src.wait_migration(timeout=180)["status"] == "completed"
        dst.wait_status("running", timeout=60)
        wait_results(self.sp, timeout=60)
        wait_results(self.dp, timeout=60)
        return self.sp.results[0], self.dp.results[0]

    def stop(self) -> None:
        for p in (self.sp, self.dp):
            p.stop()


@pytest.fixture
def signed(world: World) -> Iterator[Signed]:
    src_cfg, dst_cfg = world.configs("a")
    s = Signed(world, src_cfg, dst_cfg)
    yield s
    s.stop()


def test_multifd_through_the_signed_layout(world: World, signed: Signed, tmp_path: Path, ram_file: Path) -> None:
    for src, dst in qemu_pair(tmp_path, ram_file, DOMAIN):
        s, d = signed.migrate(src, dst)
        assert s.ok and d.ok, (s.error, d.error)
        assert len(signed.sp.results) == 1 and s.domain_uuid == DOMAIN
        assert signed.sp.sign_channels is not None and not signed.sp.sign_channels.refusals
        assert signed.dp.channels is not None and not signed.dp.channels.refusals
        assert s.bytes_in < (MIB << 20) // 2    # the RAM travelled on the side channels, through both proxies
        # the destination verified the signed stream (its replay guard moved on)
        assert (world.dir / "store" / f"replay-{world.keys['a'].key_id}-{DOMAIN}.seq").exists()


def test_multifd_through_the_signed_layout_with_tls(world: World, tmp_path: Path, ram_file: Path) -> None:
    """``virsh migrate --tls --parallel`` in the signed layout (docs/signing.md): TLS on each channel at each
    hop; the signing proxy finds each side channel behind its TLS and groups it with the signing session."""
    pki = make_pki(tmp_path / "pki", A, B)
    src_cfg, dst_cfg = world.configs("a")
    s = Signed(world, src_cfg, dst_cfg, src_tls=TlsCreds(pki[A], B), dst_tls=TlsCreds(pki[B], B))
    try:
        for src, dst in qemu_pair(tmp_path, ram_file, DOMAIN, src_args=tls_args(pki[A], "client"),
                                  dst_args=tls_args(pki[B], "server")):
            dst.qmp("migrate-set-parameters", **{"tls-creds": "tls0"})
            src.qmp("migrate-set-parameters", **{"tls-creds": "tls0", "tls-hostname": A})
            sr, dr = s.migrate(src, dst)
            assert sr.ok and dr.ok and sr.tls and dr.tls, (sr.error, dr.error)
            assert len(s.sp.results) == 1 and len(s.dp.results) == 1   # side channels are no sessions
            assert s.sp.sign_channels is not None and not s.sp.sign_channels.refusals
            assert s.dp.channels is not None and not s.dp.channels.refusals
            assert sr.bytes_in < (MIB << 20) // 2
    finally:
        s.stop()


def side(path: Path, uuid: str, cid: int) -> socket.socket:
    c = socket.socket(socket.AF_UNIX)
    c.connect(str(path))
    c.sendall(channel_init(uuid, cid))
    return c


def closed_by_proxy(c: socket.socket, timeout: float = 10) -> bool:
    """The proxy ended the connection (a UNIX socket has no reset: EOF, or ECONNRESET with unread data)."""
    c.settimeout(timeout)
    try:
        return c.recv(1) == b""
    except ConnectionResetError:
        return True
    finally:
        c.close()


def test_a_side_channel_of_another_vm_is_refused_alone_by_the_sign_proxy(signed: Signed, tmp_path: Path,
                                                                        ram_file: Path) -> None:
    for src, dst in qemu_pair(tmp_path, ram_file, DOMAIN):
        dst.incoming(f"unix:{signed.dst_sock}")
        src.migrate(f"unix:{signed.sock}", max_bandwidth=64 << 20)
        assert closed_by_proxy(side(signed.sock, OTHER_UUID, 1))
        assert src.wait_migration(timeout=180)["status"] == "completed"
        dst.wait_status("running", timeout=60)
        assert signed.sp.sign_channels is not None
        (why,) = signed.sp.sign_channels.refusals
        assert f"carries VM uuid {OTHER_UUID}" in why and "belongs to no signing session" in why, why


def test_a_side_channel_from_another_process_fails_the_signed_migration_closed(signed: Signed, tmp_path: Path,
                                                                               ram_file: Path) -> None:
    """Same uuid, a fresh channel id, but not opened by the migrating QEMU: the whole migration is reset and
    the guest keeps running on the source."""
    for src, dst in qemu_pair(tmp_path, ram_file, DOMAIN):
        dst.incoming(f"unix:{signed.dst_sock}")
        src.migrate(f"unix:{signed.sock}", max_bandwidth=16 << 20)   # ~8 s for 128 MiB
        src.wait_transferred(4 << 20)
        intruder = side(signed.sock, DOMAIN, 7)
        assert_source_kept_the_guest(src, timeout=120)
        intruder.close()
        wait_results(signed.sp, timeout=30)
        assert signed.sp.sign_channels is not None
        refusals = list(signed.sp.sign_channels.refusals)
        assert refusals and "not by the QEMU of the signing session" in refusals[0], refusals
        assert not signed.sp.results[0].ok


def test_device_state_injected_on_a_real_side_channel_is_refused_by_the_sign_proxy(world: World, tmp_path: Path,
                                                                                   ram_file: Path) -> None:
    """QEMU 10's vfio-pci x-migration-multifd-transfer, imitated: a device-state packet on a real side channel.
    The domain has no mdev, so the signing proxy refuses to sign it before any of it reaches B's proxy; the whole
    migration fails and the guest keeps running on the source."""
    src_cfg, dst_cfg = world.configs("a")
    s = Signed(world, src_cfg, dst_cfg, domain=DOMAIN)
    mark = b"VFIO-STATE-" + os.urandom(8).hex().encode()
    inj = SideChannelInjector(s.sock, device_packet("0000:00:05.0/vfio", 0, mark), listen=tmp_path / "inject.sock",
                              cut_both=True)
    try:
        for src, dst in qemu_pair(tmp_path, ram_file, DOMAIN):
            dst.incoming(f"unix:{s.dst_sock}")
            src.migrate(f"unix:{tmp_path / 'inject.sock'}")
            assert_source_kept_the_guest(src, timeout=120)
            assert inj.injected.is_set()
            wait_results(s.sp, timeout=30)
            assert s.sp.sign_channels is not None
            (why,) = s.sp.sign_channels.refusals
            assert "which the domain does not have" in why and "refusing to sign it" in why, why
            assert not s.sp.results[0].ok and "refusing to sign it" in (s.sp.results[0].error or "")
            # B's proxy never saw device state on a side channel (nothing of it left A)
            assert s.dp.channels is not None
            assert not any("device state" in r for r in s.dp.channels.refusals), list(s.dp.channels.refusals)
    finally:
        inj.close()
        s.stop()
