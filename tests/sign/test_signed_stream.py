"""Signed device state through the source and destination layers (recorded streams).

Each attack row must be refused with one clear SignatureError line, and at the latest
before the END_OF_STATE of the refused device leaves the destination layer (QEMU would
finish loading the device on it): the output is a strict prefix of the unsigned stream
that stops before that marker, and nothing of that device is committed to the store.
Rows where a block or config byte changed must stop before that block or section:
those are in test_signed_mitm.py (format 2 verifies every block before forwarding it).
"""
from __future__ import annotations

import json
import re

import pytest

from libvirt_mdev.errors import SignatureError
from libvirt_mdev.sign.keys import SigningKey, TrustedKeys, verify_manifest
from libvirt_mdev.sign.layers import SIG_IDSTR, SIG_SECTION_ID, decode_record
from libvirt_mdev.store.tokens import parse_token
from libvirt_mdev.stream.wire import BE32, BE64, VfioFlag
from libvirt_mdev.stream.writer import encode_footer, encode_section_start

from .conftest import DOMAIN, IDSTR_A, IDSTR_B, MARK_A, MARK_B, OTHER_DOMAIN, Outcome, sign, verify

HEADER = encode_section_start(SIG_SECTION_ID, SIG_IDSTR, 0, 1, full=True)
FOOTER = encode_footer(SIG_SECTION_ID)


def records(data: bytes) -> list[tuple[int, int, dict]]:
    """(start, end, statement) of every signed record in *data*."""
    out = []
    for m in re.finditer(re.escape(HEADER), data):
        end = data.index(FOOTER, m.end()) + len(FOOTER)
        body, _sig = decode_record(data[m.end():end - len(FOOTER)])
        out.append((m.start(), end, json.loads(body)))
    return out


def device_record(data: bytes, idstr: str, kind: str = "device") -> tuple[int, int, dict]:
    return next(r for r in records(data) if r[2].get("idstr") == idstr and r[2]["kind"] == kind)


def refused(o: Outcome, *words: str) -> str:
    assert isinstance(o.error, SignatureError), o.error
    msg = o.error.message
    assert "\n" not in msg and msg
    for w in words:
        assert w in msg, msg
    return msg


def stops_before_end_of(o: Outcome, plain: bytes, idstr: str, sid_by_idstr: dict[str, int]) -> None:
    """The output is a prefix of the unsigned stream that ends before the device's
    END-section END_OF_STATE (so QEMU never got it)."""
    assert plain.startswith(o.output)
    sid = sid_by_idstr[idstr]
    end_hdr = bytes([3]) + BE32.pack(sid)
    pos = plain.index(end_hdr)
    eos = plain.index(BE64.pack(VfioFlag.END_OF_STATE) + encode_footer(sid), pos)
    assert len(o.output) <= eos


@pytest.fixture(scope="module")
def sids(plain_stream: bytes) -> dict[str, int]:
    out = {}
    for idstr in (IDSTR_A, IDSTR_B):
        name = idstr.encode()
        i = plain_stream.index(bytes([len(name)]) + name)
        out[idstr] = BE32.unpack_from(plain_stream, i - 4)[0]
    return out


def test_valid_signature_accepted_output_identical_and_manifests_signed(plain_stream, key_a, store):
    signed = sign(plain_stream, key_a)
    kinds = [r[2]["kind"] for r in records(signed)]
    assert kinds == ["hello", "device", "device", "config", "config"]
    o = verify(signed, store, [key_a])
    assert o.error is None
    assert o.output == plain_stream  # every record stripped, nothing else changed
    assert SIG_IDSTR.encode() not in o.output
    assert [s["kind"] for s in o.verified if s["kind"] != "block"] == kinds
    # every data block went through its own block statement
    assert o.blocks == {r.idstr: r.blocks for r in o.results} and all(o.blocks.values())
    trusted = TrustedKeys([key_a.public])
    for r in o.results:
        m = store.manifest(parse_token(r.token))
        assert m.signer == key_a.key_id and m.signature.startswith("ed25519 v1 ")
        assert m.migration_id == "dest-mig-1" and m.source_host == "src-a"
        stmt = verify_manifest(m, trusted)
        assert stmt["sha256"] == m.sha256 and stmt["mdev_uuid"] == m.mdev_uuid


def test_token_mode_works_with_signatures(plain_stream, key_a, store):
    o = verify(sign(plain_stream, key_a), store, [key_a], mode="token")
    assert o.error is None and MARK_A not in o.output and MARK_B not in o.output
    assert all(store.manifest(parse_token(r.token)).signer == key_a.key_id for r in o.results)


def test_unknown_key_refused(plain_stream, key_a, key_b, store, sids):
    o = verify(sign(plain_stream, key_b), store, [key_a])
    refused(o, "unknown key", key_b.key_id, "trusted_keys")
    assert o.output == b"" or plain_stream.startswith(o.output)
    assert store.list() == []


def test_wrong_key_refused(plain_stream, key_a, key_b, store):
    # claims to be key A (its id, its public half), but signed with B's private key
    impostor = SigningKey(private=key_b.private, public=key_a.public)
    o = verify(sign(plain_stream, impostor), store, [key_a])
    refused(o, "does not verify", key_a.key_id)
    assert store.list() == []


def test_tampered_state_refused_before_end_of_state(plain_stream, key_a, store, sids):
    signed = bytearray(sign(plain_stream, key_a))
    signed[signed.index(MARK_B) + 3] ^= 0x01
    flipped = bytearray(plain_stream)
    flipped[flipped.index(MARK_B) + 3] ^= 0x01
    o = verify(bytes(signed), store, [key_a])
    refused(o, IDSTR_B, "changed in transit")
    assert [e.manifest.idstr for e in store.list()] == [IDSTR_A]  # A verified, B never committed
    stops_before_end_of(o, bytes(flipped), IDSTR_B, sids)


def test_tampered_statement_refused(plain_stream, key_a, store, sids):
    signed = sign(plain_stream, key_a)
    start, end, _stmt = device_record(signed, IDSTR_A)
    payload = signed[start + len(HEADER):end - len(FOOTER)]
    forged = payload.replace(b'"mdev_type":"nvidia-63"', b'"mdev_type":"nvidia-99"')
    assert forged != payload
    o = verify(signed[:start + len(HEADER)] + forged + signed[end - len(FOOTER):], store, [key_a])
    refused(o, "does not verify")
    stops_before_end_of(o, plain_stream, IDSTR_A, sids)
    assert store.list() == []


def test_swapped_devices_refused(plain_stream, key_a, store, sids):
    signed = sign(plain_stream, key_a)
    a, b = device_record(signed, IDSTR_A), device_record(signed, IDSTR_B)
    ra, rb = signed[a[0]:a[1]], signed[b[0]:b[1]]
    swapped = signed[:a[0]] + rb + signed[a[1]:b[0]] + ra + signed[b[1]:]
    o = verify(swapped, store, [key_a])
    refused(o, f"after VFIO device {IDSTR_A}", f"is for {IDSTR_B}", "swapped")
    stops_before_end_of(o, plain_stream, IDSTR_A, sids)


def test_replayed_statement_from_older_migration_refused(plain_stream, key_a, store, sids):
    old = sign(plain_stream, key_a, migration_id="0000000000000001-aaaaaaaa")
    new = sign(plain_stream, key_a, migration_id="0000000000000002-bbbbbbbb")
    o_start, o_end, _ = device_record(old, IDSTR_A)
    n_start, n_end, _ = device_record(new, IDSTR_A)
    mixed = new[:n_start] + old[o_start:o_end] + new[n_end:]
    o = verify(mixed, store, [key_a])
    refused(o, "migration is 0000000000000001-aaaaaaaa", "0000000000000002-bbbbbbbb", "replayed")
    stops_before_end_of(o, plain_stream, IDSTR_A, sids)


def test_replayed_whole_stream_refused(plain_stream, key_a, store):
    signed = sign(plain_stream, key_a)
    assert verify(signed, store, [key_a]).error is None
    o = verify(signed, store, [key_a])
    refused(o, "not newer than", "replayed")
    assert o.output == plain_stream[:len(o.output)] and MARK_A not in o.output


def test_stale_hello_refused(plain_stream, key_a, store):
    signed = sign(plain_stream, key_a, clock=lambda: 1_000_000.0)
    refused(verify(signed, store, [key_a]), "signed", "ago", "replayed")


def test_other_domain_refused(plain_stream, key_a, store):
    o = verify(sign(plain_stream, key_a, domain_uuid=OTHER_DOMAIN), store, [key_a])
    refused(o, OTHER_DOMAIN, DOMAIN)


def test_other_mdev_binding_refused(plain_stream, key_a, store, sids):
    from libvirt_mdev.filter import Binding

    from .conftest import BINDINGS
    b = dict(BINDINGS)
    b[IDSTR_A] = Binding("5b1c1f36-2d0b-4c8e-9a43-7d2f3c0e9aff", "nvidia-63")
    o = verify(sign(plain_stream, key_a, bindings=b), store, [key_a])
    refused(o, IDSTR_A, "5b1c1f36-2d0b-4c8e-9a43-7d2f3c0e9aff")
    stops_before_end_of(o, plain_stream, IDSTR_A, sids)


def test_missing_signature_refused_when_required(plain_stream, key_a, store):
    o = verify(plain_stream, store, [key_a])
    refused(o, "no signed statement", "require_signature")
    assert MARK_A not in o.output and store.list() == []


def test_missing_signature_accepted_when_not_required(plain_stream, key_a, store):
    o = verify(plain_stream, store, [key_a], require=False)
    assert o.error is None and o.output == plain_stream
    assert all(store.manifest(parse_token(r.token)).signature is None for r in o.results)


def test_device_statement_removed_refused(plain_stream, key_a, store, sids):
    signed = sign(plain_stream, key_a)
    start, end, _ = device_record(signed, IDSTR_B)
    o = verify(signed[:start] + signed[end:], store, [key_a])
    refused(o, IDSTR_B, "not followed by a signed statement")
    stops_before_end_of(o, plain_stream, IDSTR_B, sids)


def test_records_stripped_unverified_without_keys_and_requirement(plain_stream, key_b, store):
    o = verify(sign(plain_stream, key_b), store, [], require=False)
    assert o.error is None and o.output == plain_stream


def test_forged_record_kinds_and_garbage_refused(plain_stream, key_a, store):
    signed = sign(plain_stream, key_a)
    start, end, _ = records(signed)[0]
    for payload in (b"LMDS1\n{}\nAAAA", b"garbage", b"LMDS1\n" + b"{" * 9000 + b"\nAA"):
        o = verify(signed[:start] + HEADER + payload + FOOTER + signed[end:], store, [key_a])
        refused(o)


def config_end_offset(plain: bytes, sid: int) -> int:
    """Offset of the END_OF_STATE that ends the device's config (FULL) section."""
    return plain.index(BE64.pack(VfioFlag.END_OF_STATE) + encode_footer(sid), plain.index(
        bytes([4]) + BE32.pack(sid)))


def test_tampered_config_section_refused_before_its_end_of_state(plain_stream, key_a, store, sids):
    signed = bytearray(sign(plain_stream, key_a))
    sid = sids[IDSTR_B]
    cfg = signed.index(BE64.pack(VfioFlag.DEV_CONFIG_STATE), signed.index(bytes([4]) + BE32.pack(sid)))
    signed[cfg + 8 + 40] ^= 0x20  # a byte of the PCI config space
    o = verify(bytes(signed), store, [key_a])
    refused(o, IDSTR_B, "config section", "changed in transit")
    assert len(o.output) <= config_end_offset(plain_stream, sid)


def test_config_statement_removed_refused(plain_stream, key_a, store, sids):
    signed = sign(plain_stream, key_a)
    start, end, _ = device_record(signed, IDSTR_A, "config")
    o = verify(signed[:start] + signed[end:], store, [key_a])
    refused(o, IDSTR_A, "config section is not preceded by a signed config statement")
    assert plain_stream.startswith(o.output) and len(o.output) <= config_end_offset(plain_stream, sids[IDSTR_A])


def test_config_statement_in_place_of_a_device_statement_refused(plain_stream, key_a, store, sids):
    signed = sign(plain_stream, key_a)
    d0, d1, _ = device_record(signed, IDSTR_A)
    c0, c1, _ = device_record(signed, IDSTR_A, "config")
    o = verify(signed[:d0] + signed[c0:c1] + signed[d1:], store, [key_a])
    refused(o, "config statement", IDSTR_A, "another statement's section was due")
    stops_before_end_of(o, plain_stream, IDSTR_A, sids)
