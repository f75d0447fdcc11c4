"""The signed-statement record: how a signed statement travels in a QEMU migration stream.

A signed statement's payload is ``"LMDS2\\n" <canonical statement JSON> "\\n" <base64
Ed25519 signature>`` (format 2, docs/signing-wire.md).  Hello, config and device
statements travel as a top-level FULL section of their own::

    04 <be32 0xfffffff0> <counted "libvirt-mdev/signed-statement"> <be32 0> <be32 1>
    <payload>
    7e ff ff ff f0

A block statement travels inside its device's VFIO section, as a data block of its own
right before the block it covers (``DEV_DATA_STATE <be64 n> <payload>``): a top-level
section cannot sit between two blocks of one END section, and the source proxy holds
at most one block to sign it.  The destination tells the two apart by position (in a
format-2 stream every data block is preceded by its statement block) and strips them.
Format 1 (``LMDS1``: statements after the data) is refused with a line that says so.

A ``packet`` statement (multifd side channels, QEMU 10) travels as a multifd
device-state packet of its own, right before the packet it covers on the same channel,
with this record's idstr and instance id 0 (:func:`encode_statement_packet`).

Why this shape:

* **QEMU fails closed on it.**  Its loader looks the idstr up among the machine's
  devices, finds nothing and aborts the incoming migration ("Unknown savevm section
  or instance").  The hello record comes right after the CONFIGURATION, before any
  section, so if a destination proxy were ever bypassed, QEMU aborts a signed stream
  at its hello, before any VFIO section (and so before any block statement, which
  QEMU would otherwise take for device state).
* **Our codec needs no change to carry it.**  A FULL section of an unknown idstr is an
  opaque vmstate body, ended by its footer.  The body is ASCII, so it can never
  contain the footer's 0xff bytes: the boundary is exact.
* The section id is far above anything QEMU assigns (it counts handlers from 0).
* On a side channel QEMU's multifd receive thread hands a device-state packet to the
  device its idstr names; no device is named like this record, so QEMU refuses it
  ("Unknown idstr ... for load state buffer") and the incoming migration never
  completes (QEMU 10.0 stalls: docs/signing-wire.md).

The destination keeps, per (source key, domain), the newest hello sequence it accepted
(:class:`ReplayGuard`), so a captured stream cannot be replayed to it.
"""
from __future__ import annotations

import base64
import binascii
import json

from ..errors import SignatureError
from ..store.store import Store
from ..stream.multifd import DEVICE_PACKET, MULTIFD_MAGIC, MULTIFD_VERSION, PACKET_HEADER, MultifdFlag
from ..stream.writer import encode_footer, encode_section_start, encode_vfio_block

SIG_IDSTR = "libvirt-mdev/signed-statement"
SIG_SECTION_ID = 0xFFFFFFF0
SIG_MAGIC = b"LMDS2\n"
#: format 1: statements after the data they cover (refused)
SIG_MAGIC_V1 = b"LMDS1\n"
#: records are a few hundred bytes
MAX_RECORD = 16384
#: the instance id of a statement packet on a multifd side channel
SIG_INSTANCE = 0


def encode_payload(body: bytes, signature: bytes) -> bytes:
    return SIG_MAGIC + body + b"\n" + base64.b64encode(signature)


def encode_record(body: bytes, signature: bytes) -> bytes:
    """A statement as a top-level FULL section (hello, config, device)."""
    return (encode_section_start(SIG_SECTION_ID, SIG_IDSTR, 0, 1, full=True) + encode_payload(body, signature)
            + encode_footer(SIG_SECTION_ID))


def encode_statement_block(body: bytes, signature: bytes) -> bytes:
    """A block statement as a VFIO data block (inside the device's section)."""
    return encode_vfio_block(encode_payload(body, signature))


def encode_statement_packet(body: bytes, signature: bytes) -> bytes:
    """A packet statement as a multifd device-state packet (a side channel, QEMU 10),
    framed as QEMU frames its own: header, idstr[256], instance id, size, payload."""
    payload = encode_payload(body, signature)
    idstr = SIG_IDSTR.encode("ascii").ljust(DEVICE_PACKET.size - 8, b"\0")
    return (PACKET_HEADER.pack(MULTIFD_MAGIC, MULTIFD_VERSION, int(MultifdFlag.DEVICE_STATE))
            + DEVICE_PACKET.pack(idstr, SIG_INSTANCE, len(payload)) + payload)


def decode_record(payload: bytes) -> tuple[bytes, bytes]:
    """(statement bytes, signature) of a record body.

    Raises:
        SignatureError: a format-1 record, or not a record of this format.
    """
    if payload.startswith(SIG_MAGIC_V1):
        raise SignatureError("the stream is signed in format 1 (statements after the data they cover, "
                             "from an older libvirt-mdev on the source host); this destination verifies "
                             "each block before forwarding it and accepts format 2 only: upgrade "
                             "libvirt-mdev on the source host; refusing")
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


__all__ = [
    "MAX_RECORD",
    "SIG_IDSTR",
    "SIG_INSTANCE",
    "SIG_MAGIC",
    "SIG_MAGIC_V1",
    "SIG_SECTION_ID",
    "ReplayGuard",
    "decode_record",
    "encode_payload",
    "encode_record",
    "encode_statement_block",
    "encode_statement_packet",
]
