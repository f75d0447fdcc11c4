"""The VM description (vmdesc) after EOF: strict JSON, checked in bounded memory.

Theory of operation
-------------------
QEMU's loader never reads the vmdesc; we check it because the footer scan
(sections.next_record_ok) accepts ``00 06 <len> {`` as a well-formed end of the
stream, and a description that could hold arbitrary bytes would let a crafted stream
end "early" for us while QEMU reads on.  So it must be what QEMU writes: one JSON
object, ASCII only.

``json.loads`` is not used: it builds the whole document (a 64 MiB ``{"a":[[],[],…]}``
cost 1.7 GB) and recurses once per nesting level (200,000 levels end in
RecursionError).  :func:`check_vmdesc` instead walks the tokens with an explicit stack
of at most :data:`~.wire.MAX_VMDESC_DEPTH` bytes and keeps nothing else: memory is the
body itself (at most :data:`~.wire.MAX_VMDESC_LEN`) plus a constant, whatever the
shape; time is linear in the length.
"""
from __future__ import annotations

import re

from ..errors import StreamError
from .wire import MAX_VMDESC_DEPTH

#: one JSON token after optional whitespace; groups: 1 open, 2 close, 3 comma, 4 colon, 5 string, 6 scalar.
#: Strings are ASCII without control characters (QEMU escapes nothing else).
_TOKEN = re.compile(
    rb'[ \t\n\r]*(?:([\[{])|([\]}])|(,)|(:)|("(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))*")'
    rb'|(-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?(?![0-9A-Za-z.+-])|true|false|null))')
_WS = re.compile(rb"[ \t\n\r]*")
_W = rb"[ \t\n\r]*"
_STR = rb'"(?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))*"'
_NUM = rb"(?:-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?(?![0-9A-Za-z.+-])|true|false|null)"
#: a value without nested content: string, scalar, [] or {}
_SIMPLE = rb"(?:" + _STR + b"|" + _NUM + rb"|\[" + _W + rb"\]|\{" + _W + rb"\})"
#: fast paths (C speed): a run of simple array elements / simple object members
_ARRAY_RUN = re.compile(_W + _SIMPLE + rb"(?:" + _W + b"," + _W + _SIMPLE + rb")*+")
_MEMBER = _W + _STR + _W + b":" + _W + _SIMPLE
_OBJECT_RUN = re.compile(_MEMBER + rb"(?:" + _W + b"," + _MEMBER + rb")*+")

# parser states: what may come next
_VALUE, _VALUE_OR_CLOSE, _KEY_OR_CLOSE, _KEY, _COLON, _COMMA_OR_CLOSE, _DONE = range(7)
_OPEN, _CLOSE, _COMMA, _COLON_T, _STRING, _SCALAR = range(1, 7)


def check_vmdesc(body: bytes | memoryview, offset: int = 0) -> None:
    """Raise StreamError unless *body* is exactly one JSON object (RFC 8259, ASCII)
    nested at most MAX_VMDESC_DEPTH deep.  *offset* is the body's stream offset."""
    data = body  # re scans any buffer: no copy
    stack = bytearray()
    state = _VALUE
    pos = 0
    n = len(data)
    match = _TOKEN.match
    array_run = _ARRAY_RUN.match
    object_run = _OBJECT_RUN.match
    while True:
        if stack and state in (_VALUE, _VALUE_OR_CLOSE, _KEY, _KEY_OR_CLOSE):
            run = (array_run if stack[-1] == 0x5B else object_run)(data, pos)
            if run is not None:
                pos = run.end()
                state = _COMMA_OR_CLOSE
        m = match(data, pos)
        if m is None:
            end = _WS.match(data, pos)
            if end is not None and end.end() == n and state == _DONE:
                return
            _fail("is not valid JSON", offset + pos)
        assert m is not None
        kind: int | None = m.lastindex
        tok_at = m.start(kind or 0)
        pos = m.end()
        if state == _DONE:
            _fail("has data after its JSON object", offset + tok_at)
        if kind == _OPEN:
            if state not in (_VALUE, _VALUE_OR_CLOSE):
                _fail("is not valid JSON", offset + tok_at)
            if not stack and data[tok_at] != 0x7B:
                _fail("is not a JSON object", offset + tok_at)
            if len(stack) >= MAX_VMDESC_DEPTH:
                _fail(f"nests deeper than {MAX_VMDESC_DEPTH} levels", offset + tok_at)
            opener = data[tok_at]
            stack.append(opener)
            state = _VALUE_OR_CLOSE if opener == 0x5B else _KEY_OR_CLOSE
        elif kind == _CLOSE:
            if not stack or state not in (_COMMA_OR_CLOSE, _VALUE_OR_CLOSE, _KEY_OR_CLOSE):
                _fail("is not valid JSON", offset + tok_at)
            want = 0x5D if stack[-1] == 0x5B else 0x7D
            if data[tok_at] != want or (state == _VALUE_OR_CLOSE and want != 0x5D) or (
                    state == _KEY_OR_CLOSE and want != 0x7D):
                _fail("is not valid JSON (mismatched bracket)", offset + tok_at)
            stack.pop()
            state = _COMMA_OR_CLOSE if stack else _DONE
        elif kind == _COMMA:
            if state != _COMMA_OR_CLOSE:
                _fail("is not valid JSON", offset + tok_at)
            state = _VALUE if stack[-1] == 0x5B else _KEY
        elif kind == _COLON_T:
            if state != _COLON:
                _fail("is not valid JSON", offset + tok_at)
            state = _VALUE
        elif kind == _STRING and state in (_KEY, _KEY_OR_CLOSE):
            state = _COLON
        else:  # a string or scalar value
            if state not in (_VALUE, _VALUE_OR_CLOSE) or not stack:
                _fail("is not valid JSON" if stack else "is not a JSON object", offset + tok_at)
            state = _COMMA_OR_CLOSE


def _fail(what: str, at: int) -> None:
    raise StreamError(f"VM description {what}", offset=at)
