"""Garbage collection of the trusted store (``libvirt-mdev store gc``, hook ``release``).

Why it is safe to run at any time: it holds the store lock exclusively, so no
writer is between "state renamed" and "manifest written", and it only removes a
temp file when it can take that file's flock, i.e. when the writer that created it
is gone (killed, crashed).  Writers hold their temp file's flock from creation
(taken under the shared store lock) until commit or abort.

What it keeps (issue 12, no data loss): *retention* applies to state of live
migrations (and to copies a splice stored) only.  State a stripped save image needs
(stream kind ``image``) is kept until its token is spent — then retention runs from
the spend — or until an admin removes it (``store remove``).  State of a refused
stream is kept *retention* seconds after the refusal, so ``store list`` can show why,
then removed; it can never be loaded meanwhile.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Protocol

from ..errors import StoreError, UsageError
from .acl import TEMP_PREFIX, SecureDir, validate_name
from .entry import Entry
from .layout import HOLD_SUFFIX, LOCK_NAME, MANIFEST_SUFFIX, SPENT_SUFFIX, STATE_SUFFIX, STREAM_SUFFIX
from .manifest import HEX64_RE
from .streams import OPEN, REFUSED, StreamInfo, encode_record, read_stream_info


class Collectable(Protocol):
    """What gc needs of a store (:class:`.store.Store`): its directory and its entries.

    A protocol, so that this module never imports the store module (which calls it).
    """

    @property
    def dir(self) -> SecureDir: ...

    def list(self) -> list[Entry]: ...


@dataclass
class GcReport:
    """What one gc run removed (names / ids) and what it found suspicious.

    With ``dry_run`` the lists say what a real run would remove; nothing changed.
    """

    dry_run: bool = False
    removed_temp: list[str] = field(default_factory=list)
    removed_manifests: list[str] = field(default_factory=list)
    removed_states: list[str] = field(default_factory=list)
    removed_markers: list[str] = field(default_factory=list)
    removed_streams: list[str] = field(default_factory=list)
    #: open streams whose process died: marked refused ("unfinished")
    refused_streams: list[str] = field(default_factory=list)
    #: manifests kept because a stripped save image still needs them
    kept_for_images: list[str] = field(default_factory=list)
    skipped_busy: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self.__dict__.items()}


def expiry(e: Entry, retention: int) -> float | None:
    """When gc may remove the state of *e* (None: never by retention).

    * spent: *retention* after the spend;
    * its stream refused: *retention* after the refusal;
    * its stream still open: never (the filter is running; a dead one is refused first);
    * stripped save image (kind ``image``), unspent: never — an admin removes it;
    * anything else (live migrations, copies, states stored directly): *retention*
      after creation.
    """
    assert e.manifest is not None
    if e.spent_at is not None:
        return e.spent_at + retention
    s = e.stream
    if s is not None:
        if s.state == REFUSED:
            return (s.decided or e.manifest.created) + retention
        if s.state == OPEN:
            return None
        if s.kind == "image":
            return None
    return e.manifest.created + retention


def collect(store: Collectable, retention: int, now: float | None = None, *,
            domain_uuid: str | None = None, dry_run: bool = False) -> GcReport:
    """Remove what is no longer needed (see the module docstring and :func:`expiry`).

    Also: temp files no live writer holds (crashed or killed writers); open streams
    whose process died become refused; spent/hold markers without a manifest, stream
    records no state refers to, and states no manifest references.  With
    *domain_uuid*, only that domain's manifests are considered.  With *dry_run*,
    nothing is changed and the report says what would be removed.

    Entries we cannot read are reported in ``problems`` and left alone (a human
    should look at them), but they do not keep a state alive.

    Raises:
        UsageError: negative retention.
        StoreAccessError / StoreError: the store or its lock cannot be used.
    """
    if retention < 0:
        raise UsageError("retention must not be negative")
    t = time.time() if now is None else now
    rep = GcReport(dry_run=dry_run)
    d = store.dir

    def rm(name: str) -> bool:
        return d.exists(name) if dry_run else d.unlink(name, missing_ok=True)

    with d.locked(LOCK_NAME, exclusive=True):
        _remove_dead_temp(d, rep, dry_run)
        names = set(d.listdir())
        _refuse_dead_streams(d, names, rep, dry_run)
        referenced: set[str] = set()
        streams_in_use: set[str] = set()
        for e in store.list():
            if e.manifest is None:
                rep.problems.append(f"{e.id}: {e.problem}")
                continue
            m = e.manifest
            mine = domain_uuid is None or m.domain_uuid == domain_uuid
            end = expiry(e, retention)
            if mine and end is not None and end <= t:
                # manifest first: a crash in between leaves a harmless marker,
                # never an unspent-looking manifest
                rm(e.id + MANIFEST_SUFFIX)
                rep.removed_manifests.append(e.id)
                if rm(e.id + SPENT_SUFFIX):
                    rep.removed_markers.append(e.id)
                rm(e.id + HOLD_SUFFIX)
                continue
            if mine and end is None and e.stream is not None and e.stream.state != OPEN:
                rep.kept_for_images.append(e.id)
            referenced.add(m.sha256)
            if e.stream is not None:
                streams_in_use.add(e.stream.id)
        for name in sorted(names):
            base, dot, ext = name.rpartition(".")
            if not dot or not HEX64_RE.match(base):
                continue
            suffix = dot + ext
            if suffix == STATE_SUFFIX and base not in referenced:
                if rm(name):
                    rep.removed_states.append(base)
            elif suffix in (SPENT_SUFFIX, HOLD_SUFFIX) and (base + MANIFEST_SUFFIX) not in names:
                if rm(name) and suffix == SPENT_SUFFIX:
                    rep.removed_markers.append(base)
            elif suffix == STREAM_SUFFIX and base not in streams_in_use:
                info = _stream_record(d, base, rep)
                if info is not None and info.state != OPEN and rm(name):
                    rep.removed_streams.append(base)
        if not dry_run:
            d.sync()
    return rep


def _stream_record(d: SecureDir, stream_id: str, rep: GcReport) -> StreamInfo | None:
    """The record of *stream_id*, or None with the reason in ``rep.problems`` (left for a human)."""
    try:
        return read_stream_info(d, stream_id)
    except StoreError as exc:
        rep.problems.append(f"{stream_id}{STREAM_SUFFIX}: {exc.message}")
        return None


def _refuse_dead_streams(d: SecureDir, names: set[str], rep: GcReport, dry_run: bool) -> None:
    """An open stream whose lock file is gone belongs to a process that died: refuse it."""
    for name in sorted(names):
        if not name.endswith(STREAM_SUFFIX) or name.startswith(TEMP_PREFIX):
            continue
        sid = name[: -len(STREAM_SUFFIX)]
        if not HEX64_RE.match(sid):
            continue
        info = _stream_record(d, sid, rep)
        if info is None or info.state != OPEN or (info.lock and info.lock not in rep.removed_temp
                                  and d.exists(info.lock)):
            continue
        rep.refused_streams.append(sid)
        if dry_run:
            continue
        d.write_atomic(name, encode_record(
            REFUSED, info.kind, info.holder, info.created,
            reason="unfinished: the process filtering the stream ended before the stream "
                   "was accepted (killed or crashed)"))


def _remove_dead_temp(d: SecureDir, rep: GcReport, dry_run: bool = False) -> None:
    for name in d.listdir():
        if not name.startswith(TEMP_PREFIX):
            continue
        try:
            validate_name(name)
        except StoreError:
            rep.problems.append(f"unexpected file name {name!r}")
            continue
        fd = d.try_lock_file(name)
        if fd is None:
            if d.exists(name):
                rep.skipped_busy.append(name)
            continue
        try:
            if dry_run or d.unlink(name, missing_ok=True):
                rep.removed_temp.append(name)
        finally:
            if fd >= 0:
                os.close(fd)

