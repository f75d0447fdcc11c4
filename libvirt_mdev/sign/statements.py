"""Signed-stream format 2: the statements that travel *ahead of* the bytes they cover.

Format 1 signed a VFIO device's state and config section in statements sent *after*
them, so every byte had already been forwarded to QEMU (and by QEMU to the vendor
driver) when a changed byte was detected.  Format 2 (docs/signing-wire.md) signs each
VFIO data block in a ``block`` statement that the destination verifies before it
reads the block, and holds the block until its hash matches.  This module defines the
two statement kinds of format 2 that :mod:`.keys` does not know:

``hello`` (``v`` = 2)  as format 1's hello (migration id, sequence, time, domain,
                       source host, signer); ``v`` = 2 is the signed claim that the
                       stream uses format 2, so a format-1 stream can never pass as one.
``block``              one VFIO data block: migration, signer, device idstr and instance
                       id, ``seq`` (0, 1, 2, ... per device), ``length``, ``sha256`` of the
                       block's bytes, and ``prev``: the SHA-256 of the previous block
                       statement of that device (64 zeros for the first), so a dropped,
                       reordered or duplicated block breaks the chain.
``packet``             one multifd device-state packet (QEMU 10, side channels): migration,
                       signer, idstr, instance id, the VFIODeviceStatePacket's ``idx`` and
                       ``flags``, ``length`` and ``sha256`` of the packet's exact bytes, and
                       ``count``: the device's number of packets on its config packet (0 on a
                       data packet).  No chain: packets race over channels; the index orders
                       them (docs/signing-wire.md).

The config and device statements keep :mod:`.keys`' format-1 kinds (the device
statement is rebuilt from the manifest by ``load``); only their place in the stream
changes (the config statement now precedes its section).

Statements are parsed from untrusted bytes before their signature can be checked, so
:func:`parse_statement` bounds the size and the nesting depth *before* ``json.loads``:
no attacker-chosen nesting reaches a recursive parser.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

from ..errors import SignatureError
from ..store.manifest import is_sha256, is_uuid
from .keys import (
    MAX_STATEMENT,
    STATEMENT_VERSION,
    SigningKey,
    TrustedKeys,
    check_fields,
    check_signature,
    sign_checked,
    verify_statement,
)

#: the statement version that marks signed-stream format 2 (format 1 is keys.STATEMENT_VERSION)
FORMAT = 2
#: the largest VFIO data block the source proxy signs (it holds one whole block to sign it
#: ahead of its bytes; QEMU >= 8.0 writes blocks of at most 1 MiB, QEMU <= 7.2 what the
#: vendor driver's migration region holds at once)
MAX_SIGNED_BLOCK = 64 << 20
#: the largest VFIO config section signed ahead of itself (PCI config space of 4 KiB,
#: an MSI-X table of at most 2048 * 16 bytes and its PBA: far below)
MAX_SIGNED_CONFIG = 1 << 20
#: statements are flat JSON objects: depth 1; anything deeper is refused unparsed
MAX_DEPTH = 1
#: the ``prev`` of a device's first block statement
CHAIN_START = "0" * 64
MAX_IDSTR = 256

_COMMON = {"v": int, "kind": str, "migration": str, "source_host": str, "signer": str, "time": int}
FIELDS: dict[str, dict[str, Any]] = {
    "hello": dict(_COMMON, domain_uuid=str, seq=int),
    "block": {"v": int, "kind": str, "migration": str, "signer": str, "idstr": str, "instance_id": int,
              "seq": int, "length": int, "sha256": str, "prev": str},
    "packet": {"v": int, "kind": str, "migration": str, "signer": str, "idstr": str, "instance_id": int,
               "idx": int, "flags": int, "length": int, "sha256": str, "count": int},
}
#: VFIODeviceStatePacket flag of the config packet (stream/wire.py:VfioPacketFlag.CONFIG_STATE)
_CONFIG_STATE = 1

_OPEN, _CLOSE, _QUOTE, _BACKSLASH = frozenset(b"{["), frozenset(b"}]"), ord('"'), ord("\\")


def nesting_depth(body: bytes, limit: int = MAX_DEPTH) -> int:
    """The deepest bracket nesting of JSON text *body*, outside strings, scanning once
    without recursion; stops early (returning limit + 1) once *limit* is exceeded."""
    depth = deepest = 0
    in_string = escaped = False
    for c in body:
        if in_string:
            if escaped:
                escaped = False
            elif c == _BACKSLASH:
                escaped = True
            elif c == _QUOTE:
                in_string = False
        elif c == _QUOTE:
            in_string = True
        elif c in _OPEN:
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    return deepest
        elif c in _CLOSE:
            depth -= 1
    return deepest


def parse_statement(body: bytes) -> dict[str, Any]:
    """The JSON object in an untrusted statement body, parsed only after its size and
    nesting are known to be small (a flat object of at most MAX_STATEMENT bytes).

    Raises:
        SignatureError: too long, nested, not ASCII JSON, not an object.
    """
    if len(body) > MAX_STATEMENT:
        raise SignatureError(f"signed statement of {len(body)} bytes (limit {MAX_STATEMENT}); refusing")
    if nesting_depth(body) > MAX_DEPTH:
        raise SignatureError(f"signed statement nested deeper than {MAX_DEPTH} level (statements are "
                             f"flat JSON objects); refusing")
    try:
        stmt = json.loads(body.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise SignatureError("signed statement is not ASCII JSON; refusing") from None
    if not isinstance(stmt, dict):
        raise SignatureError("signed statement is not a JSON object; refusing")
    return stmt


def check_statement(stmt: dict[str, Any]) -> dict[str, Any]:
    """Validate the shape of a format-2 statement (untrusted until verified).

    Raises:
        SignatureError: unknown kind, unknown/missing/ill-typed fields, bad values.
    """
    kind = stmt.get("kind")
    if kind not in FIELDS or stmt.get("v") != FORMAT:
        raise SignatureError(f"signed statement of unknown kind {str(kind)[:20]!r} (version "
                             f"{str(stmt.get('v'))[:8]})")
    check_fields(stmt, kind, FIELDS[kind])
    if kind == "hello" and not is_uuid(stmt["domain_uuid"]):
        raise SignatureError("signed hello: domain_uuid is not a lowercase UUID")
    if kind == "block":
        if not 0 < len(stmt["idstr"]) <= MAX_IDSTR or not stmt["idstr"].isprintable():
            raise SignatureError("signed block statement: malformed idstr")
        if not (is_sha256(stmt["sha256"]) and is_sha256(stmt["prev"])):
            raise SignatureError("signed block statement: sha256/prev are not 64 lowercase hex digits")
        if min(stmt["instance_id"], stmt["seq"], stmt["length"]) < 0:
            raise SignatureError("signed block statement: negative number")
    if kind == "packet":
        _check_packet(stmt)
    return stmt


def _check_packet(stmt: dict[str, Any]) -> None:
    """The shape of a ``packet`` statement: a device, numbers in range, and ``count``
    consistent with ``flags`` (the config packet is the last, so it counts idx + 1)."""
    if not 0 < len(stmt["idstr"]) <= MAX_IDSTR or not stmt["idstr"].isprintable():
        raise SignatureError("signed packet statement: malformed idstr")
    if not is_sha256(stmt["sha256"]):
        raise SignatureError("signed packet statement: sha256 is not 64 lowercase hex digits")
    if min(stmt["instance_id"], stmt["idx"], stmt["flags"], stmt["length"], stmt["count"]) < 0:
        raise SignatureError("signed packet statement: negative number")
    expected = stmt["idx"] + 1 if stmt["flags"] & _CONFIG_STATE else 0
    if stmt["count"] != expected:
        raise SignatureError(f"signed packet statement: count {stmt['count']} for packet {stmt['idx']} "
                             f"(expected {expected})")


def sign(key: SigningKey, stmt: dict[str, Any]) -> tuple[bytes, bytes]:
    """(canonical bytes, signature) of a format-2 statement, signed as :mod:`.keys` signs
    (same context prefix: ``v`` and ``kind`` are inside the signed bytes, so a statement
    of one kind or format can never verify as another)."""
    check_statement(stmt)
    return sign_checked(key, stmt)


def verify(trusted: TrustedKeys, body: bytes, signature: bytes) -> dict[str, Any]:
    """Parse (bounded), validate and verify a statement of either format.

    Format-1 kinds (device, config) go to :func:`.keys.verify_statement`, once the
    body is known to be flat; format-2 kinds (hello v2, block) are checked here.

    Raises:
        SignatureError: malformed, not canonical, unknown key, bad signature.
    """
    stmt = parse_statement(body)
    if stmt.get("v") == STATEMENT_VERSION:
        if stmt.get("kind") == "hello":
            raise SignatureError("a format-1 hello statement (statements after the data, signed by an "
                                 "older libvirt-mdev): upgrade the source host's libvirt-mdev; refusing")
        return verify_statement(trusted, body, signature)
    check_statement(stmt)
    return check_signature(trusted, stmt, body, signature)


def hello(**fields: Any) -> dict[str, Any]:
    return check_statement(dict(fields, v=FORMAT, kind="hello"))


def block(**fields: Any) -> dict[str, Any]:
    return check_statement(dict(fields, v=FORMAT, kind="block"))


def packet(**fields: Any) -> dict[str, Any]:
    return check_statement(dict(fields, v=FORMAT, kind="packet"))


def chain_hash(body: bytes) -> str:
    """The ``prev`` the next block statement of the device must carry."""
    return hashlib.sha256(body).hexdigest()


__all__ = [
    "CHAIN_START",
    "FORMAT",
    "MAX_DEPTH",
    "MAX_SIGNED_BLOCK",
    "MAX_SIGNED_CONFIG",
    "block",
    "chain_hash",
    "check_statement",
    "hello",
    "nesting_depth",
    "packet",
    "parse_statement",
    "sign",
    "verify",
]
