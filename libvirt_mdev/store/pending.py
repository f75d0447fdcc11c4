"""Pending records: what the ``migrate begin`` hook armed, for the proxy to serve.

One file per domain, ``<domain uuid>.json`` under the runtime dir (0700 root, files
0600 root), written atomically with the same checked file code as the store
(:mod:`.acl`).  The hook writes it, the proxy reads it, ``release end`` removes it.

A record (all keys required, nothing else allowed)::

    {"domain_name": "vm1", "domain_uuid": "<uuid>", "migration_id": "<word>",
     "created": 1764590000,
     "devices": [{"mdev_uuid": "<uuid>", "idstr": "0000:00:05.0/vfio", "type": "nvidia-63"}]}
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional, Union

from ..errors import StoreIntegrityError, UsageError
from .acl import TEMP_PREFIX, SecureDir
from .manifest import WORD_RE, is_uuid

_RECORD_KEYS = {"domain_name", "domain_uuid", "migration_id", "created", "devices"}
_DEVICE_KEYS = {"mdev_uuid", "idstr", "type"}
PathLike = Union[str, "os.PathLike[str]"]


def _text(v: Any) -> bool:
    return isinstance(v, str) and 0 < len(v) <= 1024 and v.isprintable()


def record_problem(record: Any) -> Optional[str]:
    """Why *record* is not a valid pending record (None when it is)."""
    if not isinstance(record, dict):
        return "not an object"
    if set(record) != _RECORD_KEYS:
        extra = sorted(set(record) - _RECORD_KEYS)
        missing = sorted(_RECORD_KEYS - set(record))
        return f"unknown key {extra[0]!r}" if extra else f"missing key {missing[0]!r}"
    if not _text(record["domain_name"]):
        return "domain_name must be non-empty printable text"
    if not is_uuid(record["domain_uuid"]):
        return "domain_uuid must be a lowercase UUID"
    if not (isinstance(record["migration_id"], str) and WORD_RE.match(record["migration_id"])):
        return "migration_id must be 1-255 characters of [A-Za-z0-9._:@+-]"
    c = record["created"]
    if isinstance(c, bool) or not isinstance(c, int) or c < 0:
        return "created must be a non-negative integer (unix seconds)"
    devs = record["devices"]
    if not isinstance(devs, list):
        return "devices must be a list"
    for i, d in enumerate(devs):
        if not isinstance(d, dict) or set(d) != _DEVICE_KEYS:
            return f"devices[{i}] must have exactly the keys {', '.join(sorted(_DEVICE_KEYS))}"
        if not is_uuid(d["mdev_uuid"]):
            return f"devices[{i}].mdev_uuid must be a lowercase UUID"
        if not _text(d["idstr"]):
            return f"devices[{i}].idstr must be non-empty printable text"
        if d["type"] is not None and not (isinstance(d["type"], str) and WORD_RE.match(d["type"])):
            return f"devices[{i}].type must be an mdev type id or null"
    return None


def _open(runtime_dir: PathLike, create: bool, uid: int) -> SecureDir:
    return SecureDir.open(runtime_dir, create=create, uid=uid, what="runtime")


def _name(domain_uuid: str) -> str:
    if not is_uuid(domain_uuid):
        raise UsageError(f"domain uuid {domain_uuid!r} is not a lowercase UUID")
    return f"{domain_uuid}.json"


def write_pending(runtime_dir: PathLike, record: dict[str, Any], *, uid: int = 0) -> Path:
    """Write (or replace) the pending record of ``record["domain_uuid"]``, atomically.
    Creates *runtime_dir* (0700, owner *uid*) when it is missing.

    Returns:
        The record's path (for messages; never reopen it by path).
    Raises:
        UsageError: the record is invalid.
        StoreAccessError: the runtime dir has the wrong owner/mode or is a symlink.
        StoreError: I/O failure.
    """
    problem = record_problem(record)
    if problem:
        raise UsageError(f"invalid pending record: {problem}")
    name = _name(record["domain_uuid"])
    data = json.dumps(record, sort_keys=True, separators=(",", ":")).encode("utf-8")
    with _open(runtime_dir, True, uid) as d:
        d.write_atomic(name, data, replace=True)
        return d.path / name


def read_pending(runtime_dir: PathLike, domain_uuid: str, *, uid: int = 0) -> Optional[dict[str, Any]]:
    """The pending record of *domain_uuid*, or None when there is none (or no
    runtime dir yet).

    Raises:
        StoreAccessError: bad owner/mode/symlink/links on the dir or the file.
        StoreIntegrityError: the file is not a valid record for this domain.
    """
    name = _name(domain_uuid)
    if not os.path.lexists(runtime_dir):
        return None
    with _open(runtime_dir, False, uid) as d:
        data = d.read_small(name, missing_ok=True)
        if data is None:
            return None
        return _parse(data, d.describe(name), domain_uuid)


def _parse(data: bytes, where: str, domain_uuid: Optional[str]) -> dict[str, Any]:
    try:
        rec = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise StoreIntegrityError(f"pending record {where} is not JSON") from None
    problem = record_problem(rec)
    if problem:
        raise StoreIntegrityError(f"pending record {where}: {problem}")
    if domain_uuid is not None and rec["domain_uuid"] != domain_uuid:
        raise StoreIntegrityError(f"pending record {where} names domain {rec['domain_uuid']}")
    return rec  # type: ignore[no-any-return]


def remove_pending(runtime_dir: PathLike, domain_uuid: str, *, uid: int = 0) -> bool:
    """Remove *domain_uuid*'s record.  Returns whether one existed."""
    name = _name(domain_uuid)
    if not os.path.lexists(runtime_dir):
        return False
    with _open(runtime_dir, False, uid) as d:
        removed = d.unlink(name, missing_ok=True)
        if removed:
            d.sync()
        return removed


def list_pending(runtime_dir: PathLike, *, uid: int = 0) -> list[dict[str, Any]]:
    """All valid records, oldest first.

    Raises:
        StoreAccessError / StoreIntegrityError: on the first untrustworthy file (fail
            closed: a proxy must not guess which records are real).
    """
    if not os.path.lexists(runtime_dir):
        return []
    out = []
    with _open(runtime_dir, False, uid) as d:
        for name in d.listdir():
            if name.startswith(TEMP_PREFIX) or not name.endswith(".json"):
                continue
            if not is_uuid(name[:-5]):
                continue  # other files (e.g. sockets of the proxy) are not ours to judge
            data = d.read_small(name, missing_ok=True)
            if data is None:
                continue
            out.append(_parse(data, d.describe(name), name[:-5]))
    out.sort(key=lambda r: (r["created"], r["domain_uuid"]))
    return out


__all__ = ["write_pending", "read_pending", "remove_pending", "list_pending",
           "record_problem"]
