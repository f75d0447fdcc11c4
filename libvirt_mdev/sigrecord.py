"""The signed-statement record: how a signed statement travels in a QEMU migration stream.

A signed statement travels as a top-level FULL section of its own::

    04 <be32 0xfffffff0> <counted "libvirt-mdev/signed-statement"> <be32 0> <be32 1>
    "LMDS1\\n" <canonical statement JSON> "\\n" <base64 Ed25519 signature>
    7e ff ff ff f0

Why this shape:

* **QEMU fails closed on it.**  Its loader looks the idstr up among the machine's
  devices, finds nothing and aborts the incoming migration ("Unknown savevm section
  or instance").  So if a destination proxy were ever bypassed, a signed stream could
  not be loaded by accident: the record never reaches a vendor driver (unlike a data
  block inside the device's section would).
* **Our codec needs no change to carry it.**  A FULL section of an unknown idstr is an
  opaque vmstate body, ended by its footer.  The body is ASCII, so it can never
  contain the footer's 0xff bytes: the boundary is exact.
* The section id is far above anything QEMU assigns (it counts handlers from 0).

The destination keeps, per (source key, domain), the newest hello sequence it accepted
(:class:`ReplayGuard`), so a captured stream cannot be replayed to it.
"""
from __future__ import annotations

import base64
import binascii
import json

from .errors import SignatureError
from .store.store import Store
from .stream.writer import encode_footer, encode_section_start

SIG_IDSTR = "libvirt-mdev/signed-statement"
SIG_SECTION_ID = 0xFFFFFFF0
SIG_MAGIC = b"LMDS1\n"
#: records are a few hundred bytes
MAX_RECORD = 16384


def encode_record(body: bytes, signature: bytes) -> bytes:
    payload = SIG_MAGIC + body + b"\n" + base64.b64encode(signature)
    return (encode_section_start(SIG_SECTION_ID, SIG_IDSTR, 0, 1, full=True) + payload
            + encode_footer(SIG_SECTION_ID))


def decode_record(payload: bytes) -> tuple[bytes, bytes]:
    """(statement bytes, signature) of a record body.

    Raises:
        SignatureError: not a record of this version.
    """
    if not payload.startswith(SIG_MAGIC) or payload.count(b"\n") != 2:
        raise SignatureError("malformed signed-statement record")
    body, b64 = payload[len(SIG_MAGIC):].split(b"\n")
    try:
        return body, base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError("signed-statement record: the signature is not base64") from None


class ReplayGuard:
    """Per (signer, domain): the newest hello sequence accepted, kept in the store.

    A file ``replay-<key id>-<domain uuid>.seq`` (0600 root, written atomically under
    its own lock); gc leaves it alone (not a content name).
    """

    LOCK = ".replay.lock"

    def __init__(self, store: Store) -> None:
        self.store = store

    def advance(self, signer: str, domain_uuid: str, seq: int, migration: str) -> None:
        name = f"replay-{signer}-{domain_uuid}.seq"
        d = self.store.dir
        with d.locked(self.LOCK, exclusive=True):
            data = d.read_small(name, missing_ok=True)
            last = json.loads(data)["seq"] if data else -1
            if seq <= last:
                raise SignatureError(f"migration {migration} of domain {domain_uuid} is not newer than "
                                     f"one already received from key {signer} (replayed stream "
                                     f"refused)")
            d.write_atomic(name, json.dumps({"seq": seq, "migration": migration}).encode())


__all__ = ["SIG_IDSTR", "SIG_SECTION_ID", "SIG_MAGIC", "MAX_RECORD", "encode_record", "decode_record",
           "ReplayGuard"]
