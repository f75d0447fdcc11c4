"""Garbage collection of the trusted store (``libvirt-mdev store gc``, hook ``release``).

Why it is safe to run at any time: it holds the store lock exclusively, so no
writer is between "state renamed" and "manifest written", and it only removes a
temp file when it can take that file's flock, i.e. when the writer that created it
is gone (killed, crashed).  Writers hold their temp file's flock from creation
(taken under the shared store lock) until commit or abort.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from ..errors import StoreError, UsageError
from .acl import TEMP_PREFIX, validate_name
from .manifest import HEX64_RE

if TYPE_CHECKING:
    from .store import Store


@dataclass
class GcReport:
    """What one gc run removed (names / ids) and what it found suspicious."""

    removed_temp: list[str] = field(default_factory=list)
    removed_manifests: list[str] = field(default_factory=list)
    removed_states: list[str] = field(default_factory=list)
    removed_markers: list[str] = field(default_factory=list)
    skipped_busy: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, list[str]]:
        return {k: list(v) for k, v in self.__dict__.items()}


def collect(store: "Store", retention: int, now: Optional[float] = None, *,
            domain_uuid: Optional[str] = None) -> GcReport:
    """Remove what is no longer needed.

    * temp files no live writer holds (crashed or killed writers);
    * manifests whose migration ended more than *retention* seconds ago: spent
      ones counted from the spend, unspent ones from their creation;
      with *domain_uuid*, only that domain's manifests are considered
      (``retention=0`` then drops all of them: the hook's ``release``);
    * spent markers without a manifest, and states no manifest references.

    Entries we cannot read are reported in ``problems`` and left alone (a human
    should look at them), but they do not keep a state alive.

    Raises:
        UsageError: negative retention.
        StoreAccessError / StoreError: the store or its lock cannot be used.
    """
    from .store import LOCK_NAME, MANIFEST_SUFFIX, SPENT_SUFFIX
    if retention < 0:
        raise UsageError("retention must not be negative")
    t = time.time() if now is None else now
    rep = GcReport()
    d = store.dir
    with d.locked(LOCK_NAME, exclusive=True):
        _remove_dead_temp(store, rep)
        names = set(d.listdir())
        referenced: set[str] = set()
        for e in store.list():
            if e.manifest is None:
                rep.problems.append(f"{e.id}: {e.problem}")
                continue
            m = e.manifest
            end = e.spent_at if e.spent_at is not None else m.created
            mine = domain_uuid is None or m.domain_uuid == domain_uuid
            if mine and end + retention <= t:
                # manifest first: a crash in between leaves a harmless marker,
                # never an unspent-looking manifest
                d.unlink(e.id + MANIFEST_SUFFIX, missing_ok=True)
                rep.removed_manifests.append(e.id)
                if d.unlink(e.id + SPENT_SUFFIX, missing_ok=True):
                    rep.removed_markers.append(e.id)
            else:
                referenced.add(m.sha256)
        for name in sorted(names):
            base, dot, ext = name.rpartition(".")
            if not dot or not HEX64_RE.match(base):
                continue
            if ext == "state" and base not in referenced:
                if d.unlink(name, missing_ok=True):
                    rep.removed_states.append(base)
            elif ext == "spent" and (base + MANIFEST_SUFFIX) not in names:
                if d.unlink(name, missing_ok=True):
                    rep.removed_markers.append(base)
        d.sync()
    return rep


def _remove_dead_temp(store: "Store", rep: GcReport) -> None:
    d = store.dir
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
            if d.unlink(name, missing_ok=True):
                rep.removed_temp.append(name)
        finally:
            if fd >= 0:
                os.close(fd)
