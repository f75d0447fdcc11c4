"""The store: streaming writes, checked reads, dedup, gc, concurrency."""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import stat
from pathlib import Path

import pytest

from libvirt_mdev.errors import StoreError, UsageError
from libvirt_mdev.store import Store, issue_token, spend_token

from .conftest import DOMAIN, MDEV, make_meta

OTHER_DOMAIN = "0f3e2b44-91aa-4b8f-8a1c-2a9c1d7e5b11"


def test_streamed_chunks_are_stored_exactly(store: Store) -> None:
    rnd = random.Random(7)
    chunks = [rnd.randbytes(rnd.randrange(0, 200_000)) for _ in range(40)]
    whole = b"".join(chunks)
    with store.begin_state(make_meta()) as w:
        for i, c in enumerate(chunks):
            w.write(memoryview(c) if i % 2 else c)
        m = w.commit()
    assert m.length == len(whole) and m.sha256 == hashlib.sha256(whole).hexdigest()
    assert b"".join(store.iter_verified(m.id)) == whole
    st = os.stat(store.root / m.state_name)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
    assert stat.S_IMODE(os.stat(store.root / f"{m.id}.json").st_mode) == 0o600
    assert store.manifest(m.id) == m


def test_writer_accepts_memoryview_of_other_formats(store: Store) -> None:
    import array
    a = array.array("I", range(1000))
    m = store.put_state(make_meta(), memoryview(a))
    assert m.length == 4000
    assert b"".join(store.iter_verified(m.id)) == a.tobytes()


def test_exception_in_block_aborts_and_leaves_nothing(store: Store) -> None:
    with pytest.raises(RuntimeError):
        with store.begin_state(make_meta()) as w:
            w.write(b"half")
            raise RuntimeError("stream broke")
    assert os.listdir(store.root) == [".lock"]
    assert store.list() == []


def test_leaving_block_without_commit_aborts(store: Store) -> None:
    with store.begin_state(make_meta()) as w:
        w.write(b"never committed")
    assert os.listdir(store.root) == [".lock"]


def test_write_or_commit_after_close_is_usage_error(store: Store) -> None:
    w = store.begin_state(make_meta())
    w.write(b"a")
    w.commit()
    with pytest.raises(UsageError):
        w.write(b"b")
    with pytest.raises(UsageError):
        w.commit()
    w.abort()  # harmless after commit


def test_invalid_meta_is_refused_before_any_file(store: Store) -> None:
    with pytest.raises(UsageError):
        store.begin_state(make_meta(vfio_framing="v7"))
    assert os.listdir(store.root) == []


def test_identical_state_shared_but_tokens_distinct(store: Store) -> None:
    a = store.put_state(make_meta(migration_id="m1"), b"idle device")
    b = store.put_state(make_meta(migration_id="m2"), b"idle device")
    assert a.sha256 == b.sha256 and issue_token(a) != issue_token(b)
    assert len([n for n in os.listdir(store.root) if n.endswith(".state")]) == 1
    spend_token(store, issue_token(a), MDEV)
    assert not store.is_spent(b.id)
    # gc of the spent one keeps the shared state for the other
    rep = store.gc(10**6)
    assert rep.removed_states == []
    store.gc(0, domain_uuid=DOMAIN)
    assert store.list() == []
    assert os.listdir(store.root) == [".lock"]


def test_gc_retention_counts_from_spend_or_creation(store: Store) -> None:
    old = store.begin_state(make_meta(migration_id="old"), created=1000)
    old.write(b"1")
    m_old = old.commit()
    new = store.begin_state(make_meta(migration_id="new"), created=5000)
    new.write(b"2")
    m_new = new.commit()
    spent = store.begin_state(make_meta(migration_id="spent"), created=1000)
    spent.write(b"3")
    m_spent = spent.commit()
    store.mark_spent(m_spent.id, now=4500)
    rep = store.gc(1000, now=5200)
    assert rep.removed_manifests == [m_old.id]
    assert [e.id for e in store.list()] == sorted([m_spent.id, m_new.id],
                                                 key=lambda i: (store.manifest(i).created, i))
    rep = store.gc(1000, now=5600)
    assert rep.removed_manifests == [m_spent.id] and rep.removed_markers == [m_spent.id]
    assert [e.id for e in store.list()] == [m_new.id]


def test_gc_by_domain_only_touches_that_domain(store: Store) -> None:
    mine = store.put_state(make_meta(migration_id="a"), b"a")
    other = store.put_state(make_meta(migration_id="b", domain_uuid=OTHER_DOMAIN), b"b")
    rep = store.gc(0, domain_uuid=DOMAIN)
    assert rep.removed_manifests == [mine.id]
    assert [e.id for e in store.list()] == [other.id]
    assert store.verify(other.id)


def test_gc_reports_untrusted_entries_and_leaves_them(store: Store) -> None:
    m = store.put_state(make_meta(), b"data")
    p = store.root / f"{m.id}.json"
    os.chmod(p, 0o644)
    entries = store.list()
    assert len(entries) == 1 and entries[0].manifest is None
    assert "mode 0644" in (entries[0].problem or "")
    rep = store.gc(0)
    assert rep.problems and p.exists()


def test_gc_removes_orphan_markers(store: Store) -> None:
    store.mark_spent("cd" * 32)
    rep = store.gc(10**6)
    assert rep.removed_markers == ["cd" * 32]


def test_mark_spent_is_test_and_set(store: Store) -> None:
    store.mark_spent("ef" * 32)
    with pytest.raises(StoreError, match="already exists"):
        store.mark_spent("ef" * 32)


def test_ids_are_checked(store: Store) -> None:
    for bad in ("../x", "AB" * 32, ".tmp-" + "a" * 59, "a" * 63):
        with pytest.raises(UsageError):
            store.manifest(bad)


def test_missing_manifest(store: Store) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        store.manifest("12" * 32)


def _writer_proc(root: str, seed: int, n: int, q: multiprocessing.Queue[list[tuple[str, str]]]) -> None:
    rnd = random.Random(seed)
    out = []
    with Store.open(root) as st:
        for i in range(n):
            data = rnd.randbytes(rnd.randrange(1, 300_000))
            with st.begin_state(make_meta(migration_id=f"p{seed}-{i}")) as w:
                for off in range(0, len(data), 65536):
                    w.write(data[off:off + 65536])
                m = w.commit()
            out.append((m.id, hashlib.sha256(data).hexdigest()))
    q.put(out)


def _gc_proc(root: str, stop: multiprocessing.synchronize.Event) -> None:
    with Store.open(root) as st:
        while not stop.is_set():
            st.gc(10**6)


def test_concurrent_writers_and_gc_lose_nothing(store: Store) -> None:
    ctx = multiprocessing.get_context("fork")
    q: multiprocessing.Queue = ctx.Queue()
    stop = ctx.Event()
    gc = ctx.Process(target=_gc_proc, args=(str(store.root), stop))
    gc.start()
    procs = [ctx.Process(target=_writer_proc, args=(str(store.root), s, 15, q)) for s in range(6)]
    for p in procs:
        p.start()
    results = [q.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    stop.set()
    gc.join(60)
    assert gc.exitcode == 0
    want = dict(r for res in results for r in res)
    assert len(want) == 90
    assert {e.id for e in store.list()} == set(want)
    for mid, sha in want.items():
        assert store.verify(mid).sha256 == sha
    assert not [n for n in os.listdir(store.root) if n.startswith(".tmp-")]


def test_store_root_created_0700(tmp_path: Path) -> None:
    with Store.open(tmp_path / "new", create=True) as st:
        assert stat.S_IMODE(os.stat(st.root).st_mode) == 0o700
    with Store.open(tmp_path / "new", create=True):
        pass  # reopening an existing good store is fine
