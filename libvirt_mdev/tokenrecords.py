"""Token records: the data blocks that stand for stripped VFIO state in a ``token`` stream.

A token record is a VFIO data block whose payload is :data:`TOKEN_MAGIC` followed by
JSON naming the migration, the device (idstr, instance) and either the byte range of
the state it replaced or, in the device's final record, the load token of the whole
state (see :mod:`libvirt_mdev.filter`).  ``splice`` resolves them in the store.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from .errors import StoreIntegrityError, TokenError
from .io.sizes import CHUNK
from .store.manifest import Manifest
from .store.store import Store
from .store.tokens import parse_token
from .stream.context import Emit
from .stream.writer import encode_vfio_block, encode_vfio_block_header

#: first bytes of a token record's payload (a data block that stands for stripped state)
TOKEN_MAGIC = b"\x00libvirt-mdev-token-v1\x00"
#: token records are tiny; a larger block is device state, whatever its first bytes
MAX_TOKEN_RECORD = 4096


@dataclass(frozen=True)
class TokenRecord:
    """One token record: a range of a device's state, or (``token`` set) the final one."""

    #: the migration id as the record names it (any JSON value in a record read back)
    migration: object
    idstr: str
    instance: int
    offset: int = 0
    length: int = 0
    #: the load token of the whole state: the final record, which stands for no block
    token: str | None = None

    @property
    def final(self) -> bool:
        return self.token is not None


def encode_token_record(rec: TokenRecord) -> bytes:
    """The data block (header included) that carries *rec*."""
    body: dict[str, Any] = {"v": 1, "migration": rec.migration, "idstr": rec.idstr, "instance": rec.instance}
    if rec.token is None:
        body.update(offset=rec.offset, length=rec.length)
    else:
        body["token"] = rec.token
    return encode_vfio_block(TOKEN_MAGIC + json.dumps(body, sort_keys=True).encode())


def parse_token_record(payload: bytes, idstr: str, instance_id: int) -> TokenRecord:
    """The record in *payload* (a data block starting with :data:`TOKEN_MAGIC`) found in the
    section of device *idstr*/*instance_id*; :class:`TokenError` if malformed or misplaced."""
    try:
        rec = json.loads(payload[len(TOKEN_MAGIC):])
        final = "token" in rec
        offset, length = (0, 0) if final else (int(rec["offset"]), int(rec["length"]))
        if rec["idstr"] != idstr or int(rec["instance"]) != instance_id:
            raise TokenError(f"token record for device {rec['idstr']!r} found in the section of "
                             f"{idstr!r} (swapped devices?)")
        token = rec["token"] if final else None
        if final and not isinstance(token, str):
            raise TypeError(f"token {token!r} is not a string")
    except (ValueError, KeyError, TypeError) as exc:
        raise TokenError(f"VFIO device {idstr}: malformed token record ({exc})") from None
    return TokenRecord(rec.get("migration"), idstr, instance_id, offset, length, token)


def find_manifest(store: Store, rec: TokenRecord) -> Manifest:
    """The stored state *rec* names: by its token (final record), else by identity."""
    if rec.token is not None:
        mid = parse_token(rec.token)
        m = store.manifest(mid)
        store.check_loadable(mid)  # a refused or unfinished stream's state never returns
        return m
    # a PART record: its token comes later in the stream; find the state by identity
    found = [e.manifest for e in store.list()
             if e.manifest is not None and e.manifest.migration_id == rec.migration
             and e.manifest.idstr == rec.idstr and e.manifest.instance_id == rec.instance
             and e.status in ("ready", "spent")]
    if len(found) != 1:
        raise TokenError(f"token record of migration {rec.migration!r} device {rec.idstr!r}: "
                         f"{'no' if not found else 'several'} matching states in the store")
    return found[0]


class VerifiedStates:
    """The stored states a splice writes back: each re-hashed from disk once (before any
    of it is written back) and kept open until :meth:`close`."""

    def __init__(self, store: Store) -> None:
        self._store = store
        #: manifest id -> fd of its verified state
        self._fds: dict[str, int] = {}

    def fd(self, m: Manifest) -> int:
        if m.id not in self._fds:
            _m, fd = self._store.open_verified(m.id)
            self._fds[m.id] = fd
        return self._fds[m.id]

    def range_fd(self, m: Manifest, offset: int, length: int) -> int:
        """:meth:`fd`, once *offset* + *length* is known to lie inside the state."""
        if offset < 0 or length < 0 or offset + length > m.length:
            raise TokenError(f"token record range {offset}+{length} outside the stored state "
                             f"({m.length} bytes)")
        return self.fd(m)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def write_block(fd: int, m: Manifest, offset: int, length: int, emit: Emit) -> None:
    """Emit the data block a range record stood for: its header, then the state's bytes."""
    emit(encode_vfio_block_header(length))
    pos = offset
    while pos < offset + length:
        chunk = os.pread(fd, min(CHUNK, offset + length - pos), pos)
        if not chunk:
            raise StoreIntegrityError(f"state {m.sha256} shorter than its manifest")
        emit(chunk)
        pos += len(chunk)
