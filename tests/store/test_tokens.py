"""Tokens: strict syntax, binding to mdev and migration, single use."""
from __future__ import annotations

import multiprocessing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from libvirt_mdev.errors import TokenError
from libvirt_mdev.store import Store, issue_token, parse_token, resolve_token, spend_token

from .conftest import MDEV, OTHER_MDEV, Stored


def test_issue_and_parse() -> None:
    tok = "mdev-state-v1:" + "0123456789abcdef" * 4
    assert parse_token(tok) == "0123456789abcdef" * 4


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=90))
def test_parse_accepts_nothing_but_the_exact_form(text: str) -> None:
    try:
        mid = parse_token(text)
    except TokenError as exc:
        assert "\n" not in exc.message
        return
    assert text == "mdev-state-v1:" + mid and len(mid) == 64 and set(mid) <= set("0123456789abcdef")


@pytest.mark.parametrize("tok", [None, 5, b"mdev-state-v1:" + b"a" * 64])
def test_parse_refuses_non_text(tok: object) -> None:
    with pytest.raises(TokenError):
        parse_token(tok)


def test_resolve_binds_mdev_and_migration(stored: Stored) -> None:
    assert resolve_token(stored.store, stored.token, MDEV) == stored.manifest
    assert resolve_token(stored.store, stored.token, MDEV, migration_id="mig-test-1")
    with pytest.raises(TokenError, match="belongs to migration mig-test-1"):
        resolve_token(stored.store, stored.token, MDEV, migration_id="mig-other")
    with pytest.raises(TokenError, match="is for mdev"):
        resolve_token(stored.store, stored.token, OTHER_MDEV)
    with pytest.raises(TokenError, match="not a lowercase UUID"):
        resolve_token(stored.store, stored.token, "../" + MDEV)


def test_spend_once(stored: Stored) -> None:
    assert spend_token(stored.store, stored.token, MDEV) == stored.manifest
    with pytest.raises(TokenError, match="already used"):
        spend_token(stored.store, stored.token, MDEV)
    with pytest.raises(TokenError, match="already used"):
        resolve_token(stored.store, stored.token, MDEV)


def test_spent_survives_reopen(stored: Stored) -> None:
    spend_token(stored.store, stored.token, MDEV)
    with Store.open(stored.root) as again:
        with pytest.raises(TokenError, match="already used"):
            resolve_token(again, stored.token, MDEV)


def _spender(root: str, token: str, q: multiprocessing.Queue[str]) -> None:
    with Store.open(root) as st:
        try:
            spend_token(st, token, MDEV)
            q.put("won")
        except TokenError:
            q.put("refused")


def test_concurrent_spenders_exactly_one_wins(stored: Stored) -> None:
    ctx = multiprocessing.get_context("fork")
    q: multiprocessing.Queue = ctx.Queue()
    procs = [ctx.Process(target=_spender, args=(str(stored.root), stored.token, q))
             for _ in range(8)]
    for p in procs:
        p.start()
    outcomes = sorted(q.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(30)
    assert outcomes == ["refused"] * 7 + ["won"]


def test_token_of_commit_names_manifest(stored: Stored) -> None:
    assert issue_token(stored.manifest) == stored.token
    assert parse_token(stored.token) == stored.manifest.id
