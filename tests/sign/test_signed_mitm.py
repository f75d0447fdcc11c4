"""A man in the middle between the two proxies (signed-stream format 2, docs/signing-wire.md).

The claim under test: with ``require_signature``, no byte of a VFIO data block or of a
VFIO config section reaches the destination QEMU (here: the verify layer's output, or
the byte sink behind the real verifying proxy) unless the source signed exactly it.
So for a changed byte the output must *end before the changed block* (the earlier,
intact blocks did pass: blocks are not all held back), and a dropped, reordered or
duplicated block is refused before it is forwarded.
"""
from __future__ import annotations

import io
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from libvirt_mdev.errors import SignatureError
from libvirt_mdev.live.relay import Endpoint
from libvirt_mdev.sign.keys import generate_key, hello_statement, sign_statement
from libvirt_mdev.sign.layers import SIG_IDSTR, SIG_SECTION_ID, encode_payload
from libvirt_mdev.sign.record import SIG_MAGIC, SIG_MAGIC_V1
from libvirt_mdev.sign.statements import nesting_depth
from libvirt_mdev.stream import VfioBlockEnd, VfioBlockStart, iter_events
from libvirt_mdev.stream.events import SectionFull
from libvirt_mdev.stream.writer import encode_footer, encode_section_start, encode_vfio_block
from testkit.synth import SyntheticVfioDevice, inject
from tests.stream.builders import small_stream

from .conftest import DOMAIN, IDSTR_A, IDSTR_B, MARK_A, MARK_B, sign, verify

HEADER = encode_section_start(SIG_SECTION_ID, SIG_IDSTR, 0, 1, full=True)
FOOTER = encode_footer(SIG_SECTION_ID)


@dataclass(frozen=True)
class Block:
    """A VFIO data block: [start, end) covers its DEV_DATA_STATE header and its bytes."""

    start: int
    end: int
    section_id: int


def blocks(data: bytes) -> list[Block]:
    out, start = [], None
    for ev in iter_events(io.BytesIO(data)):
        if type(ev) is VfioBlockStart:
            start = ev.offset
        elif type(ev) is VfioBlockEnd:
            assert start is not None
            out.append(Block(start, ev.offset, ev.section_id))
    return out


def full_section_start(data: bytes, idstr: str) -> int:
    for ev in iter_events(io.BytesIO(data)):
        if type(ev) is SectionFull and ev.idstr == idstr:
            return ev.offset
    raise AssertionError(f"no FULL section for {idstr}")


@pytest.fixture(scope="module")
def stream(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """Two devices whose END sections carry several blocks each (64 KiB blocks)."""
    base = tmp_path_factory.mktemp("mitm") / "base.stream"
    base.write_bytes(small_stream())
    out = io.BytesIO()
    inject(str(base), out, [
        SyntheticVfioDevice(idstr=IDSTR_A, precopy_size=20_000, stopcopy_size=400_000, block_size=1 << 16,
                            marker=MARK_A, seed=31),
        SyntheticVfioDevice(idstr=IDSTR_B, stopcopy_size=300_001, block_size=1 << 16, framing="v2",
                            marker=MARK_B, seed=32)])
    return out.getvalue()


@dataclass
class Signed:
    plain: bytes
    signed: bytes
    #: per real block of the plain stream (same order): its statement block and itself in *signed*
    pairs: list[tuple[Block, Block]]
    plain_blocks: list[Block]


@pytest.fixture
def signed_a(stream: bytes, key_a) -> Signed:
    s = sign(stream, key_a)
    sb, pb = blocks(s), blocks(stream)
    assert len(sb) == 2 * len(pb)
    pairs = [(sb[2 * i], sb[2 * i + 1]) for i in range(len(pb))]
    for (_stmt, real), plain in zip(pairs, pb, strict=True):
        assert s[real.start:real.end] == stream[plain.start:plain.end]
    return Signed(stream, s, pairs, pb)


def end_block(sg: Signed, idstr_sid: int, k: int) -> int:
    """Index (in pairs) of the k-th block of section *idstr_sid*'s END section (the last blocks)."""
    mine = [i for i, p in enumerate(sg.plain_blocks) if p.section_id == idstr_sid]
    return mine[-5 + k]  # each device has at least 5 END blocks of 64 KiB


def sid_of(sg: Signed, idstr: str) -> int:
    name = idstr.encode()
    i = sg.plain.index(bytes([len(name)]) + name)
    return int.from_bytes(sg.plain[i - 4:i], "big")


def refused(o, *words: str) -> str:
    assert isinstance(o.error, SignatureError), o.error
    msg = o.error.message
    assert msg and "\n" not in msg
    for w in words:
        assert w in msg, msg
    return msg


def test_unchanged_signed_stream_passes_byte_identically(signed_a: Signed, key_a, store):
    o = verify(signed_a.signed, store, [key_a])
    assert o.error is None and o.output == signed_a.plain
    assert sum(o.blocks.values()) == len(signed_a.plain_blocks)


@pytest.mark.parametrize("device", [IDSTR_A, IDSTR_B])
def test_changed_byte_in_a_data_block_never_reaches_qemu(signed_a: Signed, key_a, store, device):
    k = end_block(signed_a, sid_of(signed_a, device), 2)
    _stmt, real = signed_a.pairs[k]
    bad = bytearray(signed_a.signed)
    pos = (real.start + real.end) // 2
    bad[pos] ^= 0x01
    window = bytes(bad[pos - 24:pos + 24])
    o = verify(bytes(bad), store, [key_a])
    refused(o, device, "data block", "changed in transit")
    plain_block = signed_a.plain_blocks[k]
    assert signed_a.plain.startswith(o.output)
    assert len(o.output) <= plain_block.start  # not one byte of the changed block went out
    assert window not in o.output
    # the blocks before it did go out as they were verified (nothing more is held than one block)
    assert len(o.output) >= signed_a.plain_blocks[k - 1].end
    assert [e.manifest.idstr for e in store.list()] == ([IDSTR_A] if device == IDSTR_B else [])


@pytest.mark.parametrize("device", [IDSTR_A, IDSTR_B])
def test_changed_byte_in_the_config_section_never_reaches_qemu(signed_a: Signed, key_a, store, device):
    sig_full = full_section_start(signed_a.signed, device)
    bad = bytearray(signed_a.signed)
    pos = sig_full + len(HEADER) + 40  # inside the config vmstate, after DEV_CONFIG_STATE
    bad[pos] ^= 0x20
    o = verify(bytes(bad), store, [key_a])
    refused(o, device, "config section", "changed in transit")
    assert signed_a.plain.startswith(o.output)
    assert len(o.output) <= full_section_start(signed_a.plain, device)  # not even its header went out


def _without(data: bytes, *spans: tuple[int, int]) -> bytes:
    out, pos = bytearray(), 0
    for a, b in sorted(spans):
        out += data[pos:a]
        pos = b
    return bytes(out + data[pos:])


def refused_before_block(sg: Signed, o, k: int, *words: str) -> None:
    """*o* refused device A's state (with *words*) and let out only plain stream that ends before block *k*."""
    refused(o, IDSTR_A, *words)
    assert sg.plain.startswith(o.output) and len(o.output) <= sg.plain_blocks[k].start


def test_dropped_block_refused_before_anything_after_it(signed_a: Signed, key_a, store):
    k = end_block(signed_a, sid_of(signed_a, IDSTR_A), 1)
    stmt, real = signed_a.pairs[k]
    o = verify(_without(signed_a.signed, (stmt.start, real.end)), store, [key_a])
    refused_before_block(signed_a, o, k, "dropped")


def test_dropped_statement_block_refused(signed_a: Signed, key_a, store):
    k = end_block(signed_a, sid_of(signed_a, IDSTR_A), 1)
    stmt, _real = signed_a.pairs[k]
    o = verify(_without(signed_a.signed, (stmt.start, stmt.end)), store, [key_a])
    refused_before_block(signed_a, o, k, "without a signed block statement")


def test_dropped_last_block_refused_before_end_of_state(signed_a: Signed, key_a, store):
    sid = sid_of(signed_a, IDSTR_A)
    k = max(i for i, p in enumerate(signed_a.plain_blocks) if p.section_id == sid)
    stmt, real = signed_a.pairs[k]
    o = verify(_without(signed_a.signed, (stmt.start, real.end)), store, [key_a])
    refused_before_block(signed_a, o, k, "changed in transit")  # the device statement's length/hash
    assert store.list() == []


def test_reordered_blocks_refused(signed_a: Signed, key_a, store):
    k = end_block(signed_a, sid_of(signed_a, IDSTR_A), 1)
    (s1, r1), (s2, r2) = signed_a.pairs[k], signed_a.pairs[k + 1]
    assert r1.end == s2.start
    d = signed_a.signed
    swapped = d[:s1.start] + d[s2.start:r2.end] + d[s1.start:r1.end] + d[r2.end:]
    o = verify(swapped, store, [key_a])
    refused_before_block(signed_a, o, k, "reordered")


def test_duplicated_block_refused(signed_a: Signed, key_a, store):
    k = end_block(signed_a, sid_of(signed_a, IDSTR_A), 1)
    stmt, real = signed_a.pairs[k]
    d = signed_a.signed
    dup = d[:real.end] + d[stmt.start:real.end] + d[real.end:]
    o = verify(dup, store, [key_a])
    refused(o, IDSTR_A, "duplicated")
    # block k went out once; its copy did not
    assert signed_a.plain.startswith(o.output) and len(o.output) == signed_a.plain_blocks[k].end


def test_block_statement_moved_to_the_other_device_refused(signed_a: Signed, key_a, store):
    sa, sb = sid_of(signed_a, IDSTR_A), sid_of(signed_a, IDSTR_B)
    ka = end_block(signed_a, sa, 0)
    kb = end_block(signed_a, sb, 0)
    d = signed_a.signed
    (a_stmt, _), (b_stmt, _) = signed_a.pairs[ka], signed_a.pairs[kb]
    # device B's statement in device A's END section (each end block is 64 KiB: the lengths agree)
    moved = d[:a_stmt.start] + d[b_stmt.start:b_stmt.end] + d[a_stmt.end:]
    o = verify(moved, store, [key_a])
    refused(o, IDSTR_A, "swapped devices")
    assert len(o.output) <= signed_a.plain_blocks[ka].start


# -- the stream format: old format refused, statement bodies bounded before parsing -------------


def _replace_hello(signed: bytes, payload: bytes) -> bytes:
    start = signed.index(HEADER)
    end = signed.index(FOOTER, start) + len(FOOTER)
    return signed[:start] + HEADER + payload + FOOTER + signed[end:]


def test_format_1_stream_refused_with_a_clear_line(signed_a: Signed, key_a, store):
    start = signed_a.signed.index(HEADER) + len(HEADER)
    old = signed_a.signed[:start] + SIG_MAGIC_V1 + signed_a.signed[start + len(SIG_MAGIC):]
    o = verify(old, store, [key_a])
    refused(o, "format 1", "upgrade libvirt-mdev on the source host")
    assert MARK_A not in o.output and store.list() == []


def test_format_1_hello_in_a_format_2_record_refused(signed_a: Signed, key_a, store):
    stmt = hello_statement(migration="0000000000000001-aaaaaaaa", domain_uuid=DOMAIN, source_host="src-a",
                           signer=key_a.key_id, time=int(__import__("time").time()), seq=1)
    body, sig = sign_statement(key_a, stmt)
    o = verify(_replace_hello(signed_a.signed, encode_payload(body, sig)), store, [key_a])
    refused(o, "format-1 hello", "upgrade")
    assert MARK_A not in o.output


def test_nesting_depth_ignores_brackets_in_strings():
    assert nesting_depth(b'{"a":"[[[{{{\\"]]"}') == 1
    assert nesting_depth(b"[" * 4000 + b"]" * 4000) == 2  # stops counting past the limit
    assert nesting_depth(b"{}") == 1 and nesting_depth(b"1") == 0


@pytest.mark.parametrize("body", [b"[" * 4000 + b"]" * 4000, b'{"a":' * 1300 + b"1" + b"}" * 1300])
def test_deeply_nested_statement_refused_in_one_line(signed_a: Signed, key_a, store, body):
    payload = SIG_MAGIC + body + b"\nAAAA"
    for bad in (_replace_hello(signed_a.signed, payload),
                # as the statement block ahead of the first data block
                signed_a.signed[:signed_a.pairs[0][0].start] + encode_vfio_block(payload)
                + signed_a.signed[signed_a.pairs[0][0].end:]):
        o = verify(bad, store, [key_a])
        refused(o, "nested deeper than 1 level")
        assert MARK_A not in o.output


# -- through the real proxies, with a man in the middle ------------------------------------------


@pytest.fixture(scope="module")
def src_key():
    return generate_key("src")


class Mitm:
    """Between the source proxy and the destination proxy: reads the whole signed stream,
    applies *tamper*, sends it on, and relays the return path back."""

    def __init__(self, forward: Endpoint, tamper: Callable[[bytes], bytes]) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1)
        self.forward, self.tamper = forward, tamper
        self.seen = b""
        threading.Thread(target=self._run, daemon=True).start()

    @property
    def endpoint(self) -> Endpoint:
        return Endpoint("127.0.0.1", self.sock.getsockname()[1])

    def _run(self) -> None:
        conn, _ = self.sock.accept()
        buf = bytearray()
        while chunk := conn.recv(1 << 20):
            buf += chunk
        self.seen = bytes(buf)
        out = socket.create_connection((self.forward.host, self.forward.port))
        try:
            out.sendall(self.tamper(self.seen))
            out.shutdown(socket.SHUT_WR)
            while back := out.recv(65536):
                conn.sendall(back)
        except OSError:
            pass
        finally:
            out.close()
            conn.close()
            self.sock.close()


def _through_proxies(env, key, data: bytes, tmp_path: Path, tamper: Callable[[bytes], bytes]):
    from tests.proxy.conftest import Sink, replay, wait_results

    from .test_signed_proxy import sign_proxy

    env.arm()
    sink = Sink()
    dest = env.proxy(sink.endpoint)
    mitm = Mitm(dest.address, tamper)
    src = sign_proxy(env, key, tmp_path, mitm.endpoint)
    try:
        replay(src.address.port, data)
        wait_results(src)
        wait_results(dest)
    finally:
        src.stop()
    sink.wait()
    return dest.results[0], sink


@pytest.fixture
def mitm_env(proxy_env, src_key):
    from .test_signed_proxy import trusting

    return trusting(proxy_env, src_key)


def test_mitm_between_real_proxies_changed_block_never_reaches_the_sink(mitm_env, src_key, injected_stream,
                                                                         tmp_path):
    from tests.proxy.conftest import ID_A
    from tests.proxy.conftest import MARK_A as PROXY_MARK_A
    data, _devs = injected_stream
    pb = blocks(data)
    # the middle one of device A's three END blocks (1 MiB each)
    a_sid = next(b.section_id for b in pb if PROXY_MARK_A in data[b.start:b.end])
    target = [b for b in pb if b.section_id == a_sid][-2]
    snippet = data[target.start + 100_000:target.start + 100_064]
    changed = bytearray(snippet)
    changed[10] ^= 0x04

    def flip(s: bytes) -> bytes:
        i = s.index(snippet)
        return s[:i] + bytes(changed) + s[i + len(snippet):]

    res, sink = _through_proxies(mitm_env, src_key, data, tmp_path, flip)
    assert not res.ok and res.exit_code == 11 and "changed in transit" in res.error and ID_A in res.error
    assert data.startswith(sink.data) and len(sink.data) <= target.start
    assert bytes(changed) not in sink.data


def test_mitm_between_real_proxies_changed_config_never_reaches_the_sink(mitm_env, src_key, injected_stream,
                                                                          tmp_path):
    from tests.proxy.conftest import ID_B
    data, devs = injected_stream
    cfg = next(d for d in devs if d.idstr == ID_B).config_bytes()
    changed = bytearray(cfg)
    changed[30] ^= 0x80

    res, sink = _through_proxies(mitm_env, src_key, data, tmp_path,
                                 lambda s: s.replace(cfg, bytes(changed)))
    assert not res.ok and res.exit_code == 11 and "config section" in res.error and ID_B in res.error
    assert data.startswith(sink.data) and len(sink.data) <= full_section_start(data, ID_B)
    assert bytes(changed) not in sink.data


def test_mitm_between_real_proxies_unchanged_passes_byte_identically(mitm_env, src_key, injected_stream,
                                                                    tmp_path):
    data, _devs = injected_stream
    res, sink = _through_proxies(mitm_env, src_key, data, tmp_path, lambda s: s)
    assert res.ok, res.error
    assert sink.data == data


def test_nested_statement_through_the_proxy_is_a_signature_refusal_not_an_internal_error(
        mitm_env, injected_stream):
    data, _devs = injected_stream
    # an unauthenticated peer sends a record nested 4,000 deep right after the CONFIGURATION
    hello_at = next(ev.end for ev in iter_events(io.BytesIO(data)) if type(ev).__name__ == "Configuration")
    bad = data[:hello_at] + HEADER + SIG_MAGIC + b"[" * 4000 + b"]" * 4000 + b"\nAAAA" + FOOTER + data[hello_at:]
    res, sink = mitm_env.replay_once(bad)
    assert not res.ok and res.error_kind == "signature" and res.exit_code == 11, res
    assert "nested" in res.error and "\n" not in res.error
    sink.wait()
    assert len(sink.data) <= hello_at

