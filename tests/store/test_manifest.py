"""Manifests: canonical bytes, strict parsing, value checks."""
from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from libvirt_mdev.errors import StoreIntegrityError, UsageError
from libvirt_mdev.store.manifest import Manifest, parse_manifest

from .conftest import make_meta

SHA = "ab" * 32


def _manifest(**over: object) -> Manifest:
    m = Manifest.build(make_meta(), length=10, sha256=SHA, created=1_700_000_000)
    return dataclasses.replace(m, **over)


def test_round_trip_and_id_is_hash_of_canonical_bytes() -> None:
    m = _manifest()
    data = m.to_json()
    assert parse_manifest(data, expect_id=m.id) == m
    assert m.id == hashlib.sha256(data).hexdigest()
    assert b" " not in data and data == json.dumps(json.loads(data), sort_keys=True,
                                                     separators=(",", ":")).encode()


def test_optional_fields_may_be_null() -> None:
    m = Manifest.build(make_meta(mdev_uuid=None, mdev_type=None, domain_name=None,
                                 domain_uuid=None, source_host=None),
                       length=0, sha256=SHA, created=0)
    assert parse_manifest(m.to_json()).mdev_uuid is None


def test_distinct_migrations_of_identical_state_get_distinct_ids() -> None:
    a = _manifest(migration_id="m1")
    b = _manifest(migration_id="m2")
    assert a.sha256 == b.sha256 and a.id != b.id


def _mutated(**changes: object) -> bytes:
    d = json.loads(_manifest().to_json())
    for k, v in changes.items():
        if v is KeyError:
            del d[k]
        else:
            d[k] = v
    return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()


@pytest.mark.parametrize("data,why", [
    (_mutated(extra=1), "unknown field 'extra'"),
    (_mutated(sha256=KeyError), "missing field 'sha256'"),
    (_mutated(length=True), "'length' has the wrong type"),
    (_mutated(length=-1), "'length' is out of range"),
    (_mutated(length="10"), "'length' has the wrong type"),
    (_mutated(format=2), "'format' is 2"),
    (_mutated(sha256="AB" * 32), "'sha256' is not 64 lowercase hex"),
    (_mutated(mdev_uuid="not-a-uuid"), "'mdev_uuid' is not a lowercase UUID"),
    (_mutated(vfio_framing="v3"), "'vfio_framing' must be one of"),
    (_mutated(migration_id="a/b"), "'migration_id' has characters"),
    (_mutated(idstr="a\nb"), "'idstr' is empty, too long or not printable"),
    (_mutated(instance_id=2**32), "'instance_id' is out of range"),
    (b"[]", "not a JSON object"),
    (b"\xff", "not ASCII JSON"),
    (b"{", "not ASCII JSON"),
    (_manifest().to_json().replace(b",", b", ", 1), "not in canonical form"),
])
def test_parse_refuses(data: bytes, why: str) -> None:
    with pytest.raises(StoreIntegrityError) as ei:
        parse_manifest(data, where="m")
    assert why in ei.value.message


def test_parse_refuses_wrong_name() -> None:
    with pytest.raises(StoreIntegrityError, match="was modified"):
        parse_manifest(_manifest().to_json(), expect_id="0" * 64)


@pytest.mark.parametrize("over", [{"vfio_framing": "v9"}, {"migration_id": "../x"},
                                  {"mdev_uuid": "ABC"}, {"instance_id": -1},
                                  {"idstr": ""}, {"mdev_type": "a b"}])
def test_state_meta_check_refuses(over: dict) -> None:
    with pytest.raises(UsageError, match="invalid state metadata"):
        make_meta(**over).check()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_parse_arbitrary_bytes_only_raises_integrity_error(data: bytes) -> None:
    try:
        parse_manifest(data)
    except StoreIntegrityError:
        pass


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from([*sorted(json.loads(_manifest().to_json())), "x"]),
                       st.none() | st.booleans() | st.integers() | st.text(max_size=70)
                       | st.lists(st.integers(), max_size=2)))
def test_parse_arbitrary_objects_only_raises_integrity_error(obj: dict) -> None:
    base = json.loads(_manifest().to_json())
    base.update(obj)
    data = json.dumps(base, sort_keys=True, separators=(",", ":")).encode()
    try:
        m = parse_manifest(data)
    except StoreIntegrityError:
        return
    assert m.to_json() == data
