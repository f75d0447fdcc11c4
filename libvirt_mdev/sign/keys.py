"""Ed25519 signatures over device state: host keys, key ids, signed statements.

Why sign at all (SECURITY.md §6): TLS migration authenticates the *connection*, and the
SHA-256 in each manifest protects the state once it is in our store.  Neither says
*which host produced the state*.  A signature made on the source, by a key only root
there holds, over a statement binding the state's hash to the device, the mdev, the
domain and the migration, lets the destination refuse state that a compromised
network hop, a rogue peer or a replayed capture produced — and the loader can check
it again, long after the migration, from the manifest alone.

Keys: one Ed25519 key pair per host (``libvirt-mdev keygen``).  The private key is a
PKCS#8 PEM file, 0600 root in a 0700 root directory (checked by :mod:`.store.acl` on
every read).  The public key is one line, ``libvirt-mdev-ed25519 <base64> <comment>``
(PEM ``PUBLIC KEY`` files are accepted too); the destination lists the source hosts'
public key files in ``trusted_keys``.  A key's id is the first 128 bits of the SHA-256
of its raw 32 bytes, in hex: short enough to print, long enough that nobody can make
a second key with the same id.

Statements are canonical JSON (sorted keys, no whitespace, ASCII), signed with a
fixed context prefix so a signature over a statement can never be mistaken for a
signature over anything else.  Two kinds:

``hello``   first thing in a signed stream: migration id, sequence (ns clock), time,
            domain uuid, source host, signer.  Freshness and replay are judged on it.
``device``  after each VFIO device's state: migration id, domain uuid, source host,
            signer, time, idstr, instance id, mdev uuid, mdev type, length, sha256.
``config``  after each VFIO device's config section (PCI config space and MSI-X that
            QEMU writes to the device): the same without the mdev, over the config bytes.

The destination stores a device statement's signature in the manifest's
``signature`` field as ``ed25519 v1 <time> <source migration id> <base64 signature>``
(and the key id in ``signer``): every other field of the statement *is* a manifest
field, so :func:`verify_manifest` can rebuild the exact signed bytes from the manifest.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import AlreadyExists, SignatureError, StoreError
from ..store.acl import SecureDir, read_protected_file
from ..store.manifest import WORD_RE, Manifest, is_sha256, is_uuid

PUBKEY_PREFIX = "libvirt-mdev-ed25519"
#: prefix of every signed message: domain separation from any other use of the key
CONTEXT = b"libvirt-mdev signed statement v1\x00"
STATEMENT_VERSION = 1
KEY_ID_HEX = 32
SIG_TAG = "ed25519 v1"
#: longest statement we accept (they are a few hundred bytes)
MAX_STATEMENT = 8192

_COMMON = {"v": int, "kind": str, "migration": str, "domain_uuid": (str, type(None)),
           "source_host": str, "signer": str, "time": int}
FIELDS: dict[str, dict[str, Any]] = {
    "hello": dict(_COMMON, seq=int),
    "device": dict(_COMMON, idstr=str, instance_id=int, mdev_uuid=(str, type(None)),
                   mdev_type=(str, type(None)), length=int, sha256=str),
    "config": dict(_COMMON, idstr=str, instance_id=int, length=int, sha256=str),
}


def key_id(raw: bytes) -> str:
    """The id of the public key whose raw bytes are *raw*."""
    return hashlib.sha256(raw).hexdigest()[:KEY_ID_HEX]


def new_migration_id(now_ns: int | None = None) -> str:
    """A migration id that sorts by time (for humans) and is unique (random tail)."""
    ns = time.time_ns() if now_ns is None else now_ns
    return f"{ns:016x}-{secrets.token_hex(4)}"


@dataclass(frozen=True)
class PublicKey:
    raw: bytes
    comment: str = ""
    #: where it was read from (for messages)
    origin: str = ""

    @property
    def key_id(self) -> str:
        return key_id(self.raw)

    def to_text(self) -> str:
        comment = f" {self.comment}" if self.comment else ""
        return f"{PUBKEY_PREFIX} {base64.b64encode(self.raw).decode()}{comment}\n"

    def verify(self, signature: bytes, message: bytes) -> bool:
        try:
            Ed25519PublicKey.from_public_bytes(self.raw).verify(signature, message)
        except InvalidSignature:
            return False
        return True


def parse_public_key(data: bytes, where: str = "public key") -> PublicKey:
    """A public key from its one-line form or a PEM ``PUBLIC KEY`` block.

    Raises:
        SignatureError: not an Ed25519 public key in either form.
    """
    try:
        text = data.decode("ascii").strip()
    except UnicodeDecodeError:
        raise SignatureError(f"{where} is not ASCII text (expected '{PUBKEY_PREFIX} <base64>')") from None
    if text.startswith("-----BEGIN PUBLIC KEY-----"):
        try:
            key = serialization.load_pem_public_key(text.encode())
        except ValueError:
            raise SignatureError(f"{where} is not a valid PEM public key") from None
        if not isinstance(key, Ed25519PublicKey):
            raise SignatureError(f"{where} is not an Ed25519 key")
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return PublicKey(raw, "", where)
    parts = text.split(None, 2)
    if len(parts) < 2 or parts[0] != PUBKEY_PREFIX or "\n" in text:
        raise SignatureError(f"{where} is not a libvirt-mdev public key (expected one line "
                             f"'{PUBKEY_PREFIX} <base64> [comment]')")
    try:
        raw = base64.b64decode(parts[1], validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError(f"{where}: the key is not valid base64") from None
    if len(raw) != 32:
        raise SignatureError(f"{where}: an Ed25519 public key has 32 bytes, not {len(raw)}")
    return PublicKey(raw, parts[2] if len(parts) > 2 else "", where)


@dataclass(frozen=True)
class SigningKey:
    """This host's private key and its public half."""

    private: Ed25519PrivateKey
    public: PublicKey

    @property
    def key_id(self) -> str:
        return self.public.key_id

    def sign(self, message: bytes) -> bytes:
        return self.private.sign(message)

    def private_pem(self) -> bytes:
        return self.private.private_bytes(serialization.Encoding.PEM,
                                          serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption())

    @classmethod
    def from_private(cls, private: Ed25519PrivateKey, comment: str = "") -> SigningKey:
        raw = private.public_key().public_bytes(serialization.Encoding.Raw,
                                                serialization.PublicFormat.Raw)
        return cls(private, PublicKey(raw, comment))


def generate_key(comment: str = "") -> SigningKey:
    return SigningKey.from_private(Ed25519PrivateKey.generate(), comment)


def write_key_pair(key: SigningKey, out_dir: Path, name: str = "host.key", *,
                   uid: int = 0, force: bool = False) -> tuple[Path, Path]:
    """Write *key* as ``<name>`` (private, 0600) and ``<stem>.pub`` in *out_dir* (0700,
    created if missing).  Refuses to overwrite an existing private key unless *force*.

    Returns (private key path, public key path).
    Raises:
        StoreAccessError: the directory is not root's 0700 directory, symlinks...
        SignatureError: a key already exists and *force* is not set.
    """
    pub_name = (name[:-4] if name.endswith(".key") else name) + ".pub"
    with SecureDir.open(out_dir, create=True, uid=uid, what="host key") as d:
        if d.exists(name) and not force:
            raise AlreadyExists(f"{d.describe(name)} already exists; keep it (its public key is "
                                 f"{d.describe(pub_name)}) or pass --force to replace it")
        d.write_atomic(pub_name, key.public.to_text().encode())
        d.write_atomic(name, key.private_pem())
        return d.path / name, d.path / pub_name


def load_signing_key(path: Path, *, uid: int = 0) -> SigningKey:
    """This host's private key from *path* (0600 root in a 0700 root directory).

    Raises:
        SignatureError: missing or not an Ed25519 PEM private key.
        StoreAccessError: wrong owner/mode, symlink.
    """
    try:
        with SecureDir.open(path.parent, uid=uid, what="host key") as d:
            data = d.read_small(path.name)
    except StoreError as exc:
        if "does not exist" in exc.message:
            raise SignatureError(f"no host key at {path}: create one with 'libvirt-mdev keygen "
                                 f"--out {path.parent}'") from None
        raise
    assert data is not None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise SignatureError(f"host key {path} is not an unencrypted PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"host key {path} is not an Ed25519 key")
    return SigningKey.from_private(key, os.uname().nodename)


class TrustedKeys:
    """The source hosts' public keys this destination accepts, by key id."""

    def __init__(self, keys: Iterable[PublicKey] = ()) -> None:
        self._keys = {k.key_id: k for k in keys}

    @classmethod
    def from_files(cls, paths: Iterable[Path], *, uid: int = 0) -> TrustedKeys:
        """Read every ``trusted_keys`` file (root-owned, not writable by others)."""
        keys = []
        for p in paths:
            data = read_protected_file(p, uid=uid, what="trusted key file", limit=16384)
            keys.append(parse_public_key(data, f"trusted key file {p}"))
        return cls(keys)

    def __len__(self) -> int:
        return len(self._keys)

    def ids(self) -> list[str]:
        return sorted(self._keys)

    def get(self, kid: object) -> PublicKey:
        if not isinstance(kid, str) or kid not in self._keys:
            known = ", ".join(self.ids()) or "none configured"
            raise SignatureError(f"signed by unknown key {str(kid)[:40]!r}, which is not in "
                                 f"trusted_keys (trusted: {known}); add the source host's public "
                                 f"key file to trusted_keys")
        return self._keys[kid]


# -- statements -------------------------------------------------------------------------


def canonical(stmt: dict[str, Any]) -> bytes:
    return json.dumps(stmt, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def check_fields(stmt: dict[str, Any], kind: str, types: dict[str, Any]) -> None:
    """The checks every statement format shares: exactly the fields of *kind*, each of its
    type (a bool is no number), and its word fields in :data:`WORD_RE`'s alphabet.

    Raises:
        SignatureError: naming the first field that is wrong.
    """
    if set(stmt) != set(types):
        diff = sorted(set(stmt) ^ set(types))
        raise SignatureError(f"signed {kind} statement has wrong fields ({diff[0]!r})")
    for k, typ in types.items():
        v = stmt[k]
        if isinstance(v, bool) or not isinstance(v, typ):
            raise SignatureError(f"signed statement field {k!r} has the wrong type")
    for k in ("migration", "source_host", "signer"):
        if k in stmt and not WORD_RE.match(stmt[k]):
            raise SignatureError(f"signed statement field {k!r} has characters outside [A-Za-z0-9._:@+-]")


def check_statement(stmt: Any) -> dict[str, Any]:
    """Validate the shape of a statement (untrusted until its signature is checked).

    Raises:
        SignatureError: not an object, unknown kind, unknown/missing/ill-typed fields.
    """
    if not isinstance(stmt, dict) or stmt.get("kind") not in FIELDS:
        raise SignatureError("signed statement of unknown kind")
    check_fields(stmt, stmt["kind"], FIELDS[stmt["kind"]])
    if stmt["v"] != STATEMENT_VERSION:
        raise SignatureError(f"signed statement version {stmt['v']} (this version reads {STATEMENT_VERSION})")
    for k in ("domain_uuid", "mdev_uuid"):
        if stmt.get(k) is not None and not is_uuid(stmt[k]):
            raise SignatureError(f"signed statement field {k!r} is not a lowercase UUID")
    if stmt["kind"] in ("device", "config") and not is_sha256(stmt["sha256"]):
        raise SignatureError("signed statement sha256 is not 64 lowercase hex digits")
    return stmt


def sign_statement(key: SigningKey, stmt: dict[str, Any]) -> tuple[bytes, bytes]:
    """(canonical statement bytes, signature).  *stmt* must name *key* as signer."""
    check_statement(stmt)
    return sign_checked(key, stmt)


def sign_checked(key: SigningKey, stmt: dict[str, Any]) -> tuple[bytes, bytes]:
    """The last step every statement kind and format shares: *stmt* (already checked)
    names *key* as signer; sign its canonical bytes under the context prefix."""
    if stmt["signer"] != key.key_id:
        raise SignatureError("statement names another signer than the signing key")
    body = canonical(stmt)
    return body, key.sign(CONTEXT + body)


def verify_statement(trusted: TrustedKeys, body: bytes, signature: bytes) -> dict[str, Any]:
    """Check *signature* over *body* with the trusted key *body* names; return the statement.

    Raises:
        SignatureError: malformed, unknown key, or the signature does not verify
            (other bytes, another key).
    """
    if len(body) > MAX_STATEMENT:
        raise SignatureError(f"signed statement of {len(body)} bytes (limit {MAX_STATEMENT})")
    try:
        stmt = json.loads(body.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise SignatureError("signed statement is not ASCII JSON") from None
    check_statement(stmt)
    return check_signature(trusted, stmt, body, signature)


def check_signature(trusted: TrustedKeys, stmt: dict[str, Any], body: bytes, signature: bytes) -> dict[str, Any]:
    """*body* is *stmt* in canonical form and *signature* verifies over it with the
    trusted key it names (every statement kind and format shares this last step).

    Raises:
        SignatureError: not canonical, unknown key, bad signature.
    """
    if canonical(stmt) != body:
        raise SignatureError("signed statement is not in canonical form")
    key = trusted.get(stmt["signer"])
    if not key.verify(signature, CONTEXT + body):
        raise SignatureError(f"{stmt['kind']} statement signature does not verify with trusted key "
                             f"{key.key_id} ({key.origin or key.comment}): the statement was changed "
                             f"or signed with another key")
    return stmt


def device_statement(**fields: Any) -> dict[str, Any]:
    return check_statement(dict(fields, v=STATEMENT_VERSION, kind="device"))


def config_statement(**fields: Any) -> dict[str, Any]:
    return check_statement(dict(fields, v=STATEMENT_VERSION, kind="config"))


def hello_statement(**fields: Any) -> dict[str, Any]:
    return check_statement(dict(fields, v=STATEMENT_VERSION, kind="hello"))


# -- the manifest's signature field ----------------------------------------------------------


def manifest_signature(stmt: dict[str, Any], signature: bytes) -> str:
    """The text stored in ``Manifest.signature`` for a verified device statement."""
    return f"{SIG_TAG} {stmt['time']} {stmt['migration']} {base64.b64encode(signature).decode()}"


def statement_of_manifest(m: Manifest) -> tuple[dict[str, Any], bytes]:
    """Rebuild the signed device statement (and the signature) from a manifest.

    Raises:
        SignatureError: the manifest carries no or a malformed signature field.
    """
    if m.signature is None or m.signer is None:
        raise SignatureError(f"state {m.id[:16]}... of {m.idstr} carries no signature")
    parts = m.signature.split(" ")
    if len(parts) != 5 or " ".join(parts[:2]) != SIG_TAG or not parts[2].isdigit():
        raise SignatureError(f"state {m.id[:16]}...: malformed signature field")
    try:
        sig = base64.b64decode(parts[4], validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError(f"state {m.id[:16]}...: the signature is not valid base64") from None
    stmt = device_statement(migration=parts[3], domain_uuid=m.domain_uuid,
                            source_host=m.source_host or "", signer=m.signer, time=int(parts[2]),
                            idstr=m.idstr, instance_id=m.instance_id, mdev_uuid=m.mdev_uuid,
                            mdev_type=m.mdev_type, length=m.length, sha256=m.sha256)
    return stmt, sig


def verify_manifest(m: Manifest, trusted: TrustedKeys) -> dict[str, Any]:
    """Re-verify a stored state's signature from its manifest (the reference loader).

    Raises:
        SignatureError: unsigned, unknown key, or the signature does not cover these
            exact fields (a changed manifest, or a signature moved from another state).
    """
    stmt, sig = statement_of_manifest(m)
    try:
        return verify_statement(trusted, canonical(stmt), sig)
    except SignatureError as exc:
        raise SignatureError(f"state {m.id[:16]}... for mdev {m.mdev_uuid}: {exc.message}") from None
