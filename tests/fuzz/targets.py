"""One-input fuzz targets, shared by the hypothesis suite (CI) and the atheris harnesses
(long runs outside CI).

Each ``run_*`` function takes arbitrary bytes and either returns normally (the input
was accepted, or refused with *our* error type) or raises something else, which is a
finding: an ``AssertionError`` from a broken invariant, or any exception that is not
the project's (IndexError, struct.error, KeyError, UnicodeDecodeError, RecursionError...).

The invariants checked on every input:

* stream reader: the events' ``raw`` bytes are, in order, exactly the input (a prefix
  of it when the input is refused), each event's ``offset`` is where its bytes start,
  a refusal is a StreamError whose offset lies inside the input, and the same verdict
  and events come out whatever the chunking (whole input vs. the fuzzer-chosen size);
* save-image header: ``decode_header`` accepts or raises StreamError/UnsupportedStream;
* filter: any stream in, MdevError out or a stream whose passthrough bytes are the input;
* token resolver: TokenError (or a store error) for anything that is not a real token;
* domain XML: MdevError subclasses only.
"""
from __future__ import annotations

import hashlib
import os
import tempfile

from libvirt_mdev.errors import MdevError, StreamError
from libvirt_mdev.stream import NEED_DATA, StreamParser
from libvirt_mdev.stream.saveimage import decode_header
from libvirt_mdev.stream.wire import SAVE_HEADER_LEN

#: chunk sizes the first byte of a fuzz input selects (0: whole input at once)
_CHUNKS = (0, 1, 2, 3, 5, 7, 8, 13, 64, 255, 256, 4096)


def chunk_size(selector: int) -> int:
    return _CHUNKS[selector % len(_CHUNKS)]


def parse_checked(data: bytes, chunk: int = 0, container: str = "auto") -> tuple[list[tuple[str, int, int]], StreamError | None]:
    """Parse *data* fed in *chunk*-byte pieces, checking byte identity as events arrive.

    Returns (event summary, the StreamError or None).  The summary is
    (type name, offset, length) per event, to compare verdicts across chunkings.
    """
    p = StreamParser(container)
    pos = 0
    fed = 0
    step = chunk or len(data) or 1
    summary: list[tuple[str, int, int]] = []
    # generous bound on parser steps: a hang shows up as an assertion, not a timeout
    budget = 8 * (len(data) + 16) + 64
    while True:
        budget -= 1
        assert budget > 0, "parser made no progress (hang)"
        try:
            ev = p.next_event()
        except StreamError as exc:
            assert exc.offset is not None and 0 <= exc.offset <= len(data), (exc.offset, len(data))
            # everything before the error was handed out as events, in order
            assert pos <= len(data)
            return summary, exc
        if ev is NEED_DATA:
            if p.done:
                assert pos == fed, "stream ended with bytes that no event covers"
                return summary, None
            piece = data[fed:fed + step]
            fed += len(piece)
            p.feed(piece)
            continue
        raw = bytes(ev.raw)
        assert ev.offset == pos, (type(ev).__name__, ev.offset, pos)
        assert data[pos:pos + len(raw)] == raw, f"{type(ev).__name__} at {pos}: raw bytes differ from the input"
        pos += len(raw)
        summary.append((type(ev).__name__, ev.offset, len(raw)))


def run_stream(data: bytes) -> None:
    """Stream-reader target: first byte selects the chunking, the rest is the stream."""
    if not data:
        return
    chunk = chunk_size(data[0])
    body = data[1:]
    if chunk == 1 and len(body) > 2048:
        chunk = 3  # byte-at-a-time costs ~10 µs a byte: keep long runs fast
    whole, err_whole = parse_checked(body, 0)
    if chunk == 0:
        return
    pieces, err_pieces = parse_checked(body, chunk)
    # same verdict whatever the chunking
    assert (err_whole is None) == (err_pieces is None), (err_whole, err_pieces)
    if err_whole is not None and not (_guard_refusal(err_whole) and _guard_refusal(err_pieces)):
        assert type(err_whole) is type(err_pieces) and err_whole.offset == err_pieces.offset, (err_whole, err_pieces)
    # events may be split differently (data runs follow chunk edges) but records may not
    structural = lambda evs: [e for e in evs if e[0] not in _SPLITTABLE]  # noqa: E731
    assert structural(whole) == structural(pieces)


def _guard_refusal(exc: StreamError | None) -> bool:
    """A BodyGuard refusal (a hidden VFIO record in a scan-delimited body).  When a body
    holds several, which one is seen first can depend on the cut: a hidden header is
    recognised at the end of its idstr (up to 255 bytes on), a hidden PART/END 13 bytes
    on.  Both cuts must refuse; the message may name either record."""
    return exc is not None and "is hidden inside the body of" in str(exc)


#: events whose extent follows the chunking (piecewise spans of large bodies)
_SPLITTABLE = {"RamRecords", "VfioBlockData", "VfioConfigData", "Opaque"}


def run_save_image_header(data: bytes) -> None:
    """The 92-byte libvirt save-image header on its own, then as a whole image."""
    head = data[:SAVE_HEADER_LEN].ljust(SAVE_HEADER_LEN, b"\0")
    try:
        decode_header(head)
    except StreamError:
        pass
    parse_checked(data, 0, "save-image")


def run_domain_xml(data: bytes) -> None:
    from libvirt_mdev.mdev.domain import parse_domain
    try:
        parse_domain(data)
    except MdevError:
        pass


class FilterTarget:
    """The filter (strip, then splice of the result) on one input, against a scratch store.

    A store is created once; states accumulate (content-addressed) and are dropped by
    :meth:`reset` every few hundred inputs to keep the directory small.
    """

    def __init__(self, root: str | None = None) -> None:
        from libvirt_mdev.store import Store
        self._tmp = tempfile.TemporaryDirectory(prefix="lm-fuzz-filter-") if root is None else None
        self.root = root or os.path.join(self._tmp.name, "store")  # type: ignore[union-attr]
        self.store = Store.open(self.root, create=True)
        self.runs = 0

    def reset(self) -> None:
        self.store.gc(0, now=2**40)

    def run(self, data: bytes) -> None:
        from libvirt_mdev.filter import FilterOptions
        self.runs += 1
        if self.runs % 500 == 0:
            self.reset()
        out = bytearray()
        stripped = self._one(data, FilterOptions(mode="token", verify=False), out.extend)
        if stripped is None:
            return
        # whatever strip accepted, splice must accept and restore byte for byte
        back = bytearray()
        res = self._one(bytes(out), FilterOptions(mode="splice", accept_tokens=True, verify=False), back.extend)
        assert res is not None, "splice refused what strip produced"
        assert hashlib.sha256(back).digest() == hashlib.sha256(data).digest(), "strip+splice is not the identity"
        # and splice of the original input is a pure pass-through
        same = bytearray()
        assert self._one(data, FilterOptions(mode="splice", verify=False), same.extend) is not None
        assert bytes(same) == data

    def _one(self, data: bytes, opts: object, emit) -> list | None:
        from libvirt_mdev.filter import StreamFilter
        parser = StreamParser()
        flt = StreamFilter(self.store, parser, opts, emit)  # type: ignore[arg-type]
        try:
            parser.feed(data)
            parser.feed(b"")
            for ev in parser.events():
                flt.process(ev)
            assert parser.done
            return flt.results
        except MdevError:
            return None
        finally:
            flt.close()

    def close(self) -> None:
        self.store.close()
        if self._tmp is not None:
            self._tmp.cleanup()


class TokenTarget:
    """The token resolver: arbitrary text as a token, against a store holding one real state."""

    MDEV = "5b1c1f36-2d0b-4c8e-9a43-7d2f3c0e9a01"

    def __init__(self) -> None:
        from libvirt_mdev.store import StateMeta, Store, issue_token
        self._tmp = tempfile.TemporaryDirectory(prefix="lm-fuzz-token-")
        self.store = Store.open(os.path.join(self._tmp.name, "store"), create=True)
        meta = StateMeta(idstr="0000:00:05.0/vfio", instance_id=0, version_id=1, vfio_framing="v1",
                         migration_id="fuzz", mdev_uuid=self.MDEV, mdev_type="nvidia-63",
                         domain_name="g", domain_uuid=None, source_host="h")
        self.manifest = self.store.put_state(meta, b"state")
        self.token = issue_token(self.manifest)

    def run(self, data: bytes) -> None:
        from libvirt_mdev.errors import TokenError
        from libvirt_mdev.store.tokens import parse_token, resolve_token
        text = data.decode("utf-8", "surrogateescape")
        mdev = self.MDEV if not data[:1] or data[0] & 1 else text[:36]
        try:
            m = resolve_token(self.store, text, mdev)
        except MdevError as exc:
            assert isinstance(exc, TokenError), (type(exc), text)
            return
        # only the one real token, for its own mdev, resolves
        assert text == self.token and mdev == self.MDEV and m.id == self.manifest.id
        assert parse_token(text) == self.manifest.id

    def close(self) -> None:
        self.store.close()
        self._tmp.cleanup()
