"""The manifest of one stored device state, and its canonical JSON form.

Why canonical: a manifest is named by the SHA-256 of its own bytes (its *id*, which
is what a load token names).  So there must be exactly one byte form per manifest:
sorted keys, no whitespace, ASCII only.  :func:`parse_manifest` rejects anything that
does not re-serialize to the very same bytes, so an edited manifest can neither keep
its name nor smuggle in extra fields.

Why the manifest and not the state is the token's name: two migrations can carry
byte-identical device state (an idle device), and must still get distinct,
separately spendable tokens.  State files are shared by content (``<sha256>.state``);
manifests are unique per migration and device (``<manifest id>.json``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from ..errors import StoreIntegrityError, UsageError
from ..stream.wire import VfioFraming

FORMAT_VERSION = 1
#: VFIO migration framings a manifest may record (stream.wire.VfioFraming)
VFIO_FRAMINGS = tuple(f.value for f in VfioFraming)

HEX64_RE = re.compile(r"[0-9a-f]{64}\Z")
UUID_RE = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\Z")
#: migration ids, host names, mdev type ids: a conservative printable alphabet
WORD_RE = re.compile(r"[A-Za-z0-9._:@+-]{1,255}\Z")
MAX_TEXT = 1024
#: fields added after format 1 shipped.  They are left out of the canonical bytes when
#: unset, so a manifest without them keeps its exact bytes and id (and a reader that
#: predates them still reads it); a stored ``null`` is not canonical and is refused.
LATER_FIELDS = frozenset({"driver_version", "parent_model"})


def _text_ok(value: str) -> bool:
    return 0 < len(value) <= MAX_TEXT and value.isprintable()


def is_uuid(value: object) -> bool:
    return isinstance(value, str) and bool(UUID_RE.match(value))


def is_sha256(value: object) -> bool:
    return isinstance(value, str) and bool(HEX64_RE.match(value))


@dataclass(frozen=True)
class StateMeta:
    """What the filter knows about a device's state before its bytes arrive.

    ``None`` means "not known" (e.g. an offline strip of a raw stream has no domain
    XML).  A state whose ``mdev_uuid`` or ``mdev_type`` is unknown is stored, but the
    loader refuses it (fail closed).
    """

    idstr: str                      #: VFIO section idstr, e.g. ``0000:00:05.0/vfio``
    instance_id: int
    version_id: int
    vfio_framing: str               #: ``v1`` or ``v2``
    migration_id: str               #: unique per migration (hook/proxy/strip run)
    mdev_uuid: str | None = None
    mdev_type: str | None = None  #: source mdev type id, e.g. ``nvidia-63``
    domain_name: str | None = None
    domain_uuid: str | None = None
    source_host: str | None = None
    #: the source mdev's vendor driver version and its parent's PCI ``vendor:device``,
    #: as ``annotate`` recorded them: what ``load`` checks under the match policy
    #: (:mod:`libvirt_mdev.mdev.policy`)
    driver_version: str | None = None
    parent_model: str | None = None

    def check(self) -> None:
        """Validate field values (the filter builds these from untrusted input).

        Raises:
            UsageError: a field has a value we would refuse to store.
        """
        problems = _problems(dataclasses.asdict(self), _META_TYPES)
        if problems:
            raise UsageError(f"invalid state metadata: {problems[0]}")


@dataclass(frozen=True)
class Manifest:
    """One stored state: :class:`StateMeta` plus what the store measured."""

    format: int
    idstr: str
    instance_id: int
    version_id: int
    vfio_framing: str
    migration_id: str
    mdev_uuid: str | None
    mdev_type: str | None
    domain_name: str | None
    domain_uuid: str | None
    source_host: str | None
    length: int                     #: bytes in the ``.state`` file
    sha256: str                     #: of the ``.state`` file; also its name
    created: int                    #: unix seconds
    signature: str | None = None  #: base64 Ed25519 signature (issue 8)
    signer: str | None = None     #: key id of the signer (issue 8)
    driver_version: str | None = None  #: the source's, see :class:`StateMeta`
    parent_model: str | None = None    #: the source's, see :class:`StateMeta`

    @classmethod
    def build(cls, meta: StateMeta, *, length: int, sha256: str, created: int,
              signature: str | None = None, signer: str | None = None) -> Manifest:
        return cls(format=FORMAT_VERSION, length=length, sha256=sha256, created=created,
                   signature=signature, signer=signer, **dataclasses.asdict(meta))

    def to_json(self) -> bytes:
        """The canonical bytes (what is stored and hashed); :data:`LATER_FIELDS` appear only when set."""
        fields = {k: v for k, v in dataclasses.asdict(self).items() if v is not None or k not in LATER_FIELDS}
        return json.dumps(fields, sort_keys=True, separators=(",", ":"),
                          ensure_ascii=True, allow_nan=False).encode("ascii")

    @property
    def id(self) -> str:
        """SHA-256 of the canonical bytes: the manifest's file name and token name."""
        return hashlib.sha256(self.to_json()).hexdigest()

    @property
    def state_name(self) -> str:
        return f"{self.sha256}.state"

    @property
    def meta(self) -> StateMeta:
        names = {f.name for f in dataclasses.fields(StateMeta)}
        return StateMeta(**{k: v for k, v in dataclasses.asdict(self).items() if k in names})

    def summary(self) -> dict[str, Any]:
        """A JSON-friendly dict for ``--json`` output (includes the id)."""
        out = dataclasses.asdict(self)
        out["id"] = self.id
        return out


_OPT_STR = (str, type(None))
_META_TYPES: dict[str, Any] = {
    "idstr": str, "instance_id": int, "version_id": int, "vfio_framing": str,
    "migration_id": str, "mdev_uuid": _OPT_STR, "mdev_type": _OPT_STR,
    "domain_name": _OPT_STR, "domain_uuid": _OPT_STR, "source_host": _OPT_STR,
    "driver_version": _OPT_STR, "parent_model": _OPT_STR,
}
_MANIFEST_TYPES: dict[str, Any] = dict(_META_TYPES, format=int, length=int, sha256=str,
                                       created=int, signature=_OPT_STR, signer=_OPT_STR)


def _problems(d: dict[str, Any], types: dict[str, Any]) -> list[str]:
    """Every reason *d* is not a valid record of the given field *types*."""
    out: list[str] = []
    unknown = sorted(set(d) - set(types))
    missing = sorted(set(types) - set(d) - LATER_FIELDS)
    if unknown:
        out.append(f"unknown field {unknown[0]!r}")
    if missing:
        out.append(f"missing field {missing[0]!r}")
    for key, typ in types.items():
        if key not in d:
            continue
        v = d[key]
        # bool is an int subclass: never accept it for a number
        if isinstance(v, bool) or not isinstance(v, typ):
            out.append(f"field {key!r} has the wrong type ({type(v).__name__})")
            continue
        if v is None:
            continue
        bad = _value_problem(key, v)
        if bad:
            out.append(f"field {key!r} {bad}")
    return out


def _value_problem(key: str, v: Any) -> str | None:
    if key in ("instance_id", "version_id"):
        return None if 0 <= v < 2**32 else "is out of range"
    if key in ("length", "created"):
        return None if 0 <= v < 2**63 else "is out of range"
    if key == "format":
        return None if v == FORMAT_VERSION else f"is {v}, this version reads {FORMAT_VERSION}"
    if key == "sha256":
        return None if HEX64_RE.match(v) else "is not 64 lowercase hex digits"
    if key in ("mdev_uuid", "domain_uuid"):
        return None if UUID_RE.match(v) else "is not a lowercase UUID"
    if key == "vfio_framing":
        return None if v in VFIO_FRAMINGS else f"must be one of {', '.join(VFIO_FRAMINGS)}"
    if key in ("migration_id", "mdev_type", "source_host", "signer", "driver_version", "parent_model"):
        return None if WORD_RE.match(v) else "has characters outside [A-Za-z0-9._:@+-]"
    if key in ("idstr", "domain_name", "signature"):
        return None if _text_ok(v) else "is empty, too long or not printable"
    return None


def parse_manifest(data: bytes, *, where: str = "manifest",
                   expect_id: str | None = None) -> Manifest:
    """Parse and strictly validate stored manifest bytes.

    With *expect_id*, the bytes must hash to it (the file name).

    Returns:
        The manifest.
    Raises:
        StoreIntegrityError: not JSON, not canonical, unknown/missing/ill-typed
            fields, or a hash that differs from *expect_id*.  Any other exception is a bug.
    """
    if expect_id is not None:
        got = hashlib.sha256(data).hexdigest()
        if got != expect_id:
            raise StoreIntegrityError(f"{where} was modified: its SHA-256 is {got[:16]}..., "
                                      f"its name says {expect_id[:16]}...")
    try:
        obj = json.loads(data.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise StoreIntegrityError(f"{where} is not ASCII JSON") from None
    if not isinstance(obj, dict):
        raise StoreIntegrityError(f"{where} is not a JSON object")
    problems = _problems(obj, _MANIFEST_TYPES)
    if problems:
        raise StoreIntegrityError(f"{where}: {problems[0]}")
    m = Manifest(**obj)
    if m.to_json() != data:
        raise StoreIntegrityError(f"{where} is not in canonical form")
    return m
