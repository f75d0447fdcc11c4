"""Signed VFIO device state on multifd side channels (QEMU 10 ``x-migration-multifd-transfer``), through the real
proxies over sockets: live/signdevstate.py, docs/signing-wire.md.

Synthetic channels in QEMU's exact framing (testkit.multifd, testkit.synth); a "destination QEMU" (MultiSink)
records each connection.  The good case goes source QEMU → signing proxy → verifying proxy → destination; the
attacks are built offline with the same signing code (a signing context, its main channel signed by SignLayer, its
packets by SignPacketSink) and changed the way a network attacker between the two proxies could, then sent to the
verifying proxy.  Every attack must fail the whole migration closed (main and side channels reset), with nothing of
the attacked packet forwarded and nothing loadable.
"""
from __future__ import annotations

import dataclasses
import io
import socket
import threading
import time
from pathlib import Path

import pytest

from libvirt_mdev.cli.load import load_state
from libvirt_mdev.errors import SignatureError
from libvirt_mdev.filter import Binding
from libvirt_mdev.live.limits import ProxyLimits
from libvirt_mdev.live.proxy import MigrationProxy
from libvirt_mdev.live.signdevstate import SignPacketSink
from libvirt_mdev.sign.keys import SigningKey, generate_key
from libvirt_mdev.sign.layers import SignContext, sign_stream
from libvirt_mdev.sign.record import SIG_IDSTR, SIG_SECTION_ID
from libvirt_mdev.store import Store
from libvirt_mdev.stream.writer import encode_footer
from testkit.multifd import split_device_packet
from testkit.synth import SyntheticVfioDevice
from tests.proxy.conftest import DOM_UUID, ID_A, ID_B, U1, U2, ProxyEnv, wait_results
from tests.proxy.test_channels import MultiSink, connect, finish, was_reset
from tests.proxy.test_multifd_devstate import (
    assert_failed_closed,
    loadable,
    main_with,
    migrate,
    side,
    stored_packets,
    vfio_device,
)

from .test_signed_proxy import sign_proxy, trusting

BINDINGS = {ID_A: Binding(U1, "nvidia-222"), ID_B: Binding(U2, "nvidia-224")}


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return generate_key("src")


@pytest.fixture
def sink() -> MultiSink:
    s = MultiSink()
    yield s
    s.close()


def context(key: SigningKey, **over: object) -> SignContext:
    """What the signing proxy's session signs with (its migration id is fresh, as in each session)."""
    ctx = SignContext(key=key, source_host="src", domain_uuid=DOM_UUID, bindings=dict(BINDINGS))
    return dataclasses.replace(ctx, **over)  # type: ignore[arg-type]


def signed_main(ctx: SignContext, main: bytes) -> bytes:
    out = bytearray()
    sign_stream(io.BytesIO(main), out.extend, ctx)
    return bytes(out)


def signed(ctx: SignContext, packet: bytes) -> bytes:
    """*packet* as the signing proxy forwards it: its statement packet, then the packet."""
    ev, payload = split_device_packet(packet)
    s = SignPacketSink(ctx)
    s.begin(ev)
    s.data(memoryview(payload))
    return b"".join(bytes(x) for x in s.end())


def statement(ctx: SignContext, packet: bytes) -> bytes:
    """The statement packet alone."""
    return signed(ctx, packet)[:-len(packet)]


def after_hello(main: bytes) -> int:
    """How much of the signed main channel the verifying proxy needs to verify its hello: the hello record and the
    next record's header (a body ends at the footer followed by a well-formed record, SECURITY.md §8)."""
    footer = encode_footer(SIG_SECTION_ID)
    return main.index(footer, main.index(SIG_IDSTR.encode())) + len(footer) + 1024


def pieces(packet: bytes) -> list[bytes]:
    """Parts of a packet's state bytes (none of them anywhere else): none may reach the destination."""
    payload = split_device_packet(packet)[1]
    return [payload[12:44], payload[-32:]]


def forwarded(sink: MultiSink) -> bytes:
    return b"".join(bytes(c["data"]) for c in sink.conns)


@pytest.fixture
def dest(proxy_env: ProxyEnv, key: SigningKey, sink: MultiSink) -> MigrationProxy:
    """The verifying destination proxy (require_signature, trusting *key*), armed, in front of *sink*."""
    trusting(proxy_env, key)
    proxy_env.arm()
    return proxy_env.proxy(sink.endpoint)


def wait_loadable(env: ProxyEnv, token: str) -> None:
    deadline = time.monotonic() + 10   # the last side channel may settle just after the main one
    while not loadable(env.config.store, token):
        assert time.monotonic() < deadline, "the accepted migration's multifd state is not loadable"
        time.sleep(0.05)


# --------------------------------------------------------------------------- the good case
def test_signed_device_state_on_side_channels_through_both_proxies(proxy_env: ProxyEnv, key: SigningKey,
                                                                   sink: MultiSink, tmp_path: Path) -> None:
    """Source QEMU → signing proxy → verifying proxy → destination QEMU: every packet verified before it is
    stored and forwarded, statements stripped, packets and RAM byte-identical, the state stored and loadable."""
    dev = vfio_device()
    main = main_with(tmp_path, dev)
    p0, p1, p2, cfg = dev.multifd_packets()
    sides = [side(0, p0, p2), side(1, cfg, p1)]   # the config packet before packet 1: out of order
    trusting(proxy_env, key)
    proxy_env.arm()
    dst = proxy_env.proxy(sink.endpoint)
    src = sign_proxy(proxy_env, key, tmp_path, dst.address)
    try:
        main_reset, resets = migrate(src, main, sides, first=len(main) - 64)
        wait_results(dst)
    finally:
        src.stop()
    s, d = src.results[0], dst.results[0]
    assert s.ok and d.ok, (s.error, d.error)
    assert not main_reset and not any(resets)
    got = sink.wait(3)
    assert bytes(got[0]["data"]) == main   # the main channel's statements stripped
    assert sorted(bytes(c["data"]) for c in got[1:]) == sorted(sides)   # statement packets stripped
    # the verifying proxy got the statement packets too, and forwarded the channels' own bytes exactly
    assert d.channel_bytes_in > d.channel_bytes_out == sum(map(len, sides))
    (m,) = [x for x in d.devices if x.get("channel") == "multifd"]
    assert (m["idstr"], m["mdev_uuid"], m["blocks"]) == (ID_A, U1, 4)
    assert sorted(stored_packets(proxy_env.config.store, m["token"])) == sorted([p0, p1, p2, cfg])
    wait_loadable(proxy_env, m["token"])
    # its manifest carries no signature (docs/signing-wire.md "What the manifest keeps"): a loader that requires
    # one refuses it, before the token is spent
    with Store.open(proxy_env.config.store) as store:
        with pytest.raises(SignatureError, match="carries no source signature"):
            load_state(store, m["token"], U1, proxy_env.config.sysfs_root, None, require_signature=True,
                       trusted_keys=proxy_env.config.trusted_keys)
    assert loadable(proxy_env.config.store, m["token"])


def test_signed_packets_sent_to_the_verifying_proxy_pass(proxy_env: ProxyEnv, key: SigningKey, sink: MultiSink,
                                                         dest: MigrationProxy, tmp_path: Path) -> None:
    """The offline-signed channels the attacks below change, unchanged: they pass (so each attack's refusal is
    the attack's doing), with two devices."""
    a, b = vfio_device(ID_A, size=5000), vfio_device(ID_B, size=70000, seed=4)
    ctx = context(key)
    main = signed_main(ctx, main_with(tmp_path, a, b))
    pa, pb = a.multifd_packets(), b.multifd_packets()
    sides = [side(0, *(signed(ctx, p) for p in pa)), side(1, *(signed(ctx, p) for p in pb))]
    main_reset, resets = migrate(dest, main, sides, first=after_hello(main))
    res = dest.results[0]
    assert res.ok, res.error
    assert not main_reset and not any(resets)
    got = sink.wait(3)
    assert sorted(bytes(c["data"]) for c in got[1:]) == sorted(map(strip, sides))   # statements stripped
    multifd = {(x["idstr"], x["mdev_uuid"]) for x in res.devices if x.get("channel") == "multifd"}
    assert multifd == {(ID_A, U1), (ID_B, U2)}
    assert SIG_IDSTR.encode() not in forwarded(sink)


def strip(channel: bytes) -> bytes:
    """*channel* without its statement packets (what the destination QEMU must get)."""
    out, i, name = bytearray(), 0, SIG_IDSTR.encode()
    while (j := channel.find(name, i)) >= 0:
        start = j - 12                             # the multifd packet header before the idstr
        size = int.from_bytes(channel[j + 260:j + 264], "big")
        out += channel[i:start]
        i = j + 264 + size
    return bytes(out + channel[i:])


# --------------------------------------------------------------------------- attacks
def run_attack(proxy_env: ProxyEnv, key: SigningKey, dest: MigrationProxy, sink: MultiSink, tmp_path: Path,
               build: str) -> list[bytes]:
    """One device, four packets; channel 0 carries the attacked packet (packet 1).  Checks the refusal; returns
    the bytes that must not reach the destination."""
    dev = vfio_device()
    ctx = context(key)
    main = signed_main(ctx, main_with(tmp_path, dev))
    p0, p1, p2, cfg = dev.multifd_packets()
    s0, s1, s2, sc = (signed(ctx, p) for p in (p0, p1, p2, cfg))
    other = vfio_device(ID_B, size=3000, seed=9).multifd_packets()[0]
    old = context(ctx.key)                      # an earlier signing session of the same key and domain
    wrong = context(generate_key("not-trusted"))
    bad = p1
    text, ch0 = {
        "tampered packet": ("changed in transit", [s0, s1[:-40] + bytes([s1[-40] ^ 1]) + s1[-39:]]),
        "tampered statement": ("does not verify", [s0, _flip_in_statement(s1, p1)]),
        "replayed statement of another migration": ("migration is .* replayed from another migration",
                                                   [s0, signed(old, p1)]),
        "another device's statement": ("another device's statement", [s0, statement(ctx, other) + p1]),
        "packet without statement": ("carries no signature, and this host requires signed device state",
                                     [s0, p1]),
        "statement without packet at EOF": ("at the end of its multifd channel, without its packet",
                                            [s0, statement(ctx, p1)]),
        "statement followed by another statement": ("is not followed by its packet",
                                                    [s0, statement(ctx, p1), s2]),
        "statement of another packet (reordered)": ("changed in transit", [s0, statement(ctx, p2) + p1]),
        # before packet 0: the set cannot be complete when the copy arrives
        "duplicate packet": ("arrived twice", [s1, s1, s0]),
        "wrong key": ("unknown key", [s0, signed(wrong, p1)]),
    }[build]
    ch1 = [s2, sc]
    if build == "statement followed by another statement":   # packet 2 comes on channel 0 only, after the lie
        bad, ch1 = p2, [sc]
    sides = [side(0, *ch0), side(1, *ch1)]
    main_reset, resets = migrate(dest, main, sides, first=after_hello(main))
    must_not = [] if build == "duplicate packet" else pieces(bad)
    assert_failed_closed(dest, sink, main_reset, resets, text, None, proxy_env.config.store)
    return must_not


def _flip_in_statement(pair: bytes, packet: bytes) -> bytes:
    """A statement packet with one byte of its signed JSON changed (its sha256's first hex digit)."""
    stmt = bytearray(pair[:-len(packet)])
    i = stmt.index(b'"sha256":"') + len(b'"sha256":"')
    stmt[i] = ord("0") if stmt[i] != ord("0") else ord("1")
    return bytes(stmt) + packet


ATTACKS = ["tampered packet", "tampered statement", "replayed statement of another migration",
           "another device's statement", "packet without statement", "statement without packet at EOF",
           "statement followed by another statement", "statement of another packet (reordered)",
           "duplicate packet", "wrong key"]


@pytest.mark.parametrize("attack", ATTACKS)
def test_an_attack_on_a_signed_side_channel_fails_the_whole_migration(proxy_env: ProxyEnv, key: SigningKey,
                                                                      sink: MultiSink, dest: MigrationProxy,
                                                                      tmp_path: Path, attack: str) -> None:
    must_not = run_attack(proxy_env, key, dest, sink, tmp_path, attack)
    data = forwarded(sink)
    assert not any(p in data for p in must_not)     # nothing of the attacked packet reached the destination
    assert SIG_IDSTR.encode() not in data             # nor any statement


def test_a_verifying_host_still_refuses_unsigned_device_state(proxy_env: ProxyEnv, key: SigningKey,
                                                              sink: MultiSink, dest: MigrationProxy,
                                                              tmp_path: Path) -> None:
    """Unsigned packets only (the main channel signed): refused at the first packet's header."""
    dev = vfio_device()
    main = signed_main(context(key), main_with(tmp_path, dev))
    p0, p1, p2, cfg = dev.multifd_packets()
    main_reset, resets = migrate(dest, main, [side(0, p0, p1), side(1, p2, cfg)], first=after_hello(main))
    assert_failed_closed(dest, sink, main_reset, resets, "carries no signature", dev.marker,
                         proxy_env.config.store)
    assert not any(p in forwarded(sink) for q in (p0, p1, p2) for p in pieces(q))


def test_signed_packets_with_an_unsigned_main_channel_are_refused(proxy_env: ProxyEnv, key: SigningKey,
                                                                  sink: MultiSink, tmp_path: Path) -> None:
    """A host with trusted_keys but without require_signature takes an unsigned main channel; signed packets
    cannot be bound to a migration without its hello: refused, not forwarded unbound."""
    trusting(proxy_env, key)
    proxy_env.config = dataclasses.replace(proxy_env.config, require_signature=False)
    proxy_env.arm()
    px = proxy_env.proxy(sink.endpoint)
    dev = vfio_device()
    ctx = context(key)
    main = main_with(tmp_path, dev)
    p0, p1, p2, cfg = dev.multifd_packets()
    sides = [side(0, *(signed(ctx, p) for p in (p0, p1))), side(1, *(signed(ctx, p) for p in (p2, cfg)))]
    main_reset, resets = migrate(px, main, sides, first=len(main) - 64)
    assert_failed_closed(px, sink, main_reset, resets, "the main channel carries no signed hello", dev.marker,
                         proxy_env.config.store)


def test_a_statement_waits_for_the_main_channels_hello(proxy_env: ProxyEnv, key: SigningKey, sink: MultiSink,
                                                       dest: MigrationProxy, tmp_path: Path) -> None:
    """Side channels whose statements arrive before the main channel's hello wait for it (never forwarded
    unbound), then pass once it is verified."""
    dev = vfio_device(size=5000)
    ctx = context(key)
    main = signed_main(ctx, main_with(tmp_path, dev))
    sides = [side(0, *(signed(ctx, p) for p in dev.multifd_packets()))]
    m = connect(dest)
    first = main.index(SIG_IDSTR.encode()) - 20   # the header and CONFIGURATION, not the hello
    m.sendall(main[:first])
    resets: list[bool] = []
    t = threading.Thread(target=lambda: resets.append(finish(connect(dest), sides[0])))
    t.start()
    sink.wait_connected(2)
    time.sleep(0.5)
    assert SIG_IDSTR.encode() not in forwarded(sink) and dev.marker not in forwarded(sink)
    assert len(sink.conns[1]["data"]) <= sides[0].index(SIG_IDSTR.encode()) - 12   # held at the statement
    assert not finish(m, main[first:])
    t.join(20)
    wait_results(dest)
    assert dest.results[0].ok, dest.results[0].error
    assert resets == [False]


def test_a_statement_whose_hello_never_comes_is_refused_at_the_deadline(proxy_env: ProxyEnv, key: SigningKey,
                                                                        sink: MultiSink, tmp_path: Path) -> None:
    trusting(proxy_env, key)
    proxy_env.arm()
    px = proxy_env.proxy(sink.endpoint, limits=ProxyLimits(main_channel_timeout=1.0))
    dev = vfio_device(size=5000)
    ctx = context(key)
    main = signed_main(ctx, main_with(tmp_path, dev))
    m = connect(px)
    m.sendall(main[:main.index(SIG_IDSTR.encode()) - 20])   # never the hello
    s = connect(px)
    s.sendall(side(0, *(signed(ctx, p) for p in dev.multifd_packets())))
    s.shutdown(socket.SHUT_WR)
    assert was_reset(s, timeout=15) and was_reset(m, timeout=15)
    wait_results(px)
    res = px.results[0]
    assert not res.ok and "hello was not verified within 1s" in (res.error or ""), res.error
    assert dev.marker not in forwarded(sink)


def test_the_signing_proxy_refuses_a_device_the_domain_does_not_have(proxy_env: ProxyEnv, key: SigningKey,
                                                                      sink: MultiSink, tmp_path: Path) -> None:
    """Signing with a device the signing session does not know is refused on the source: nothing of it leaves."""
    trusting(proxy_env, key)
    proxy_env.arm()
    dst = proxy_env.proxy(sink.endpoint)
    src = sign_proxy(proxy_env, key, tmp_path, dst.address)
    stranger = SyntheticVfioDevice(idstr="0000:00:09.0/vfio", stopcopy_size=3000, framing="v2", multifd=True,
                                   seed=5, marker=b"\x8fSTRANGER")
    dev = vfio_device(size=3000)
    main = main_with(tmp_path, dev)
    pkts = dev.multifd_packets()
    bad = stranger.multifd_packets()[0]
    try:
        # one side channel: once it is refused, a second one would find no signing session and wait for one
        main_reset, resets = migrate(src, main, [side(0, *pkts[:-1], bad, pkts[-1])], first=len(main) - 64)
    finally:
        src.stop()
    res = src.results[0]
    assert not res.ok and "which the domain does not have" in (res.error or "") \
        and "refusing to sign it" in (res.error or ""), res.error
    assert main_reset and any(resets)
    assert not any(p in forwarded(sink) for p in pieces(bad))
