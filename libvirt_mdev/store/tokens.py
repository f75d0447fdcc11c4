"""Load tokens: ``mdev-state-v1:<manifest id>``.

A token is a *name*, like a firmware file name: it is resolved only inside the
trusted store, never as a path.  Its 64 hex digits are the SHA-256 of a manifest,
and that manifest records the mdev uuid and migration id the state belongs to, so
a token is bound to both: :func:`resolve_token` refuses it for any other mdev (or
migration, when the caller names one).  Tokens are single use: :func:`spend_token`
records the use durably in the store (an atomic create of ``<id>.spent``), and a
spent token is refused from then on (replay).

Syntax is checked first and strictly (exact prefix, exactly 64 lowercase hex
digits, nothing else: no ``/``, ``..``, NUL, newline or whitespace), before the
store is touched at all.

State stored from a stream is resolved only once that whole stream was accepted
(:meth:`.store.Store.check_loadable`): the token of a refused or unfinished stream is
refused with the stream's reason.
"""
from __future__ import annotations

import re

from ..errors import StoreError, TokenError
from .manifest import Manifest, is_uuid
from .store import Store

TOKEN_PREFIX = "mdev-state-v1:"
TOKEN_RE = re.compile(r"mdev-state-v1:([0-9a-f]{64})\Z")
#: longest token text we echo back in an error message
_SHOW = 80


def issue_token(manifest: Manifest) -> str:
    """The token that names *manifest* (as returned by ``StateWriter.commit``)."""
    return TOKEN_PREFIX + manifest.id


def parse_token(token: object) -> str:
    """Return the manifest id of a syntactically valid token.

    Raises:
        TokenError: anything but ``mdev-state-v1:`` + 64 lowercase hex digits.
    """
    if not isinstance(token, str):
        raise TokenError("a load token must be text")
    m = TOKEN_RE.match(token)
    if m is None:
        shown = repr(token[:_SHOW]) + ("..." if len(token) > _SHOW else "")
        raise TokenError(f"malformed load token {shown}: expected {TOKEN_PREFIX} followed "
                         f"by 64 lowercase hex digits")
    return m.group(1)


def resolve_token(store: Store, token: str, mdev_uuid: str, *,
                  migration_id: str | None = None) -> Manifest:
    """Find the manifest *token* names and check it may be loaded into *mdev_uuid*.

    Checks, in order: syntax; the mdev uuid given; the manifest exists and passes
    the store's checks (ACL, hash, schema); it is bound to *mdev_uuid* (and to
    *migration_id* when given); its stream was accepted; it is not spent.  The state bytes are *not*
    re-hashed here: use ``store.open_verified(manifest.id)`` for that.

    Returns:
        The manifest.
    Raises:
        TokenError: malformed, unknown, spent, or for another mdev / migration.
        StoreAccessError, StoreIntegrityError: the store entry cannot be trusted.
    """
    mid = parse_token(token)
    if not is_uuid(mdev_uuid):
        raise TokenError(f"mdev uuid {mdev_uuid!r} is not a lowercase UUID")
    if not store.has_manifest(mid):
        raise TokenError(f"unknown load token {token}: no such state in store {store.root} "
                         f"(never stored, or removed by gc)")
    m = store.manifest(mid)
    if m.mdev_uuid is None:
        raise TokenError(f"load token {token} names state that is not bound to any mdev; "
                         f"refusing to load it")
    if m.mdev_uuid != mdev_uuid:
        raise TokenError(f"load token {token} is for mdev {m.mdev_uuid}, not {mdev_uuid}")
    if migration_id is not None and m.migration_id != migration_id:
        raise TokenError(f"load token {token} belongs to migration {m.migration_id}, "
                         f"not {migration_id}")
    store.check_loadable(mid, f"load token {token}: state")
    if store.is_spent(mid):
        raise TokenError(f"load token {token} was already used (replay refused); "
                         f"a new migration issues new tokens")
    return m


def spend_token(store: Store, token: str, mdev_uuid: str, *,
                now: int | None = None) -> Manifest:
    """Mark *token* used, atomically: of two concurrent spenders only one succeeds.

    Resolves the token first (all checks of :func:`resolve_token`).

    Raises:
        TokenError: as :func:`resolve_token`, or spent by a concurrent caller.
    """
    m = resolve_token(store, token, mdev_uuid)
    try:
        store.mark_spent(m.id, now=now)
    except StoreError:
        if store.is_spent(m.id):
            raise TokenError(f"load token {token} was already used (replay refused)") from None
        raise
    return m
