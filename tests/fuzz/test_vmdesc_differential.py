"""The bounded vmdesc checker (stream/vmdesc.py) against Python's json module: on ASCII
input it accepts exactly the documents json.loads accepts as an object, except the
non-standard NaN/Infinity literals and nesting beyond MAX_VMDESC_DEPTH."""
from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from libvirt_mdev.errors import StreamError
from libvirt_mdev.stream.vmdesc import check_vmdesc
from libvirt_mdev.stream.wire import MAX_VMDESC_DEPTH

_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6),
                     st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8))
_values = st.recursive(_scalars, lambda kids: st.one_of(st.lists(kids, max_size=4),
                                                         st.dictionaries(st.text(max_size=6), kids, max_size=4)),
                       max_leaves=30)


def _depth(v: Any) -> int:
    stack = [(v, 1)]
    best = 0
    while stack:
        x, d = stack.pop()
        if isinstance(x, (list, dict)):
            best = max(best, d)
            stack.extend((c, d + 1) for c in (x.values() if isinstance(x, dict) else x))
    return best


def _no_constant(name: str) -> None:
    raise ValueError(f"non-standard literal {name}")


def _json_verdict(doc: bytes) -> bool:
    try:
        v = json.loads(doc.decode("ascii"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False
    return isinstance(v, dict) and _depth(v) <= MAX_VMDESC_DEPTH


def _ours(doc: bytes) -> bool:
    try:
        check_vmdesc(doc)
        return True
    except StreamError:
        return False


@settings(max_examples=400, deadline=None)
@given(obj=st.dictionaries(st.text(max_size=6), _values, max_size=5),
       indent=st.sampled_from([None, 0, 2]))
def test_well_formed_documents_agree(obj, indent):
    doc = json.dumps(obj, indent=indent, ensure_ascii=True).encode()
    assert _ours(doc) is True and _json_verdict(doc) is True


@settings(max_examples=1500, deadline=None)
@given(obj=st.dictionaries(st.text(max_size=4), _values, max_size=3), data=st.data())
def test_mutated_documents_agree(obj, data):
    doc = bytearray(json.dumps(obj).encode())
    for _ in range(data.draw(st.integers(1, 3))):
        op = data.draw(st.sampled_from(["flip", "insert", "delete"]))
        pos = data.draw(st.integers(0, len(doc)))
        ch = data.draw(st.sampled_from(list(b'{}[],:"\\ 0-1.eE+tfnula\t\n')))
        if op == "insert" or not doc:
            doc[pos:pos] = bytes([ch])
        elif op == "delete":
            del doc[min(pos, len(doc) - 1)]
        else:
            doc[min(pos, len(doc) - 1)] = ch
    assert _ours(bytes(doc)) == _json_verdict(bytes(doc)), bytes(doc)
