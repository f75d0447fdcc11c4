"""Which armed migration a proxy connection serves, and whether it may still be served.

The ``migrate begin`` hook arms an incoming migration by writing a *pending record*
(:mod:`libvirt_mdev.store.pending`): the domain, a migration id, and each mdev's
uuid, VFIO section idstr and source type.  The proxy turns that record into the
filter's bindings.  Kept apart from :mod:`libvirt_mdev.live.proxy` (sockets and threads)
because these are the policy decisions, testable without a socket:

* exactly one record, or the one ``--domain`` names; none or several is a refusal;
* a record is served by one connection at a time (multifd opens several: refused)
  and only once (a replayed connection is refused, and the record is removed);
* the armed types are checked against this host's sysfs *at connection time*: the
  mdev may have been removed or re-created with another type since the hook ran.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import Config
from ..errors import MdevError, MdevMissing, NotFound, TypeMismatch
from ..filter import Binding
from ..mdev.gate import recheck_armed
from ..mdev.sysfs import SysfsEnv
from ..store.pending import PENDING_GRACE, PendingRecord, is_stale, list_pending, live_records, qemu_start_times

if TYPE_CHECKING:
    from ..mdev.policy import MatchPolicy


class Claims:
    """Which pending records are being (or were) served by this process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: domain uuid → the peer whose connection serves it
        self.active: dict[str, str] = {}
        self.spent: set[str] = set()

    def claim(self, record: PendingRecord, peer: str = "?") -> None:
        """Bind the connection from *peer* to *record*.  Called only for a connection
        whose QEMU file header has arrived (:mod:`.admission`): idle or slow connections
        never reach this, so they can neither take the migration nor count as the
        "second connection" of the real one."""
        with self._lock:
            uuid, mid = record.domain_uuid, record.migration_id
            if uuid in self.active:
                raise MdevError(f"a second connection for the migration of domain {record.domain_name} "
                                f"(migration {mid}): the one from {self.active[uuid]} is already being served; "
                                "a migration has one main channel (--parallel adds side channels, "
                                "which start 11 22 33 44)")
            if mid in self.spent:
                raise MdevError(f"migration {mid} of domain {record.domain_name} was already served; "
                                f"refusing a replayed connection")
            self.active[uuid] = peer

    def release(self, record: PendingRecord) -> None:
        with self._lock:
            self.active.pop(record.domain_uuid, None)
            self.spent.add(record.migration_id)


def select_pending(config: Config, domain: str | None, proc_root: Path | None = None) -> PendingRecord:
    """The pending record this connection serves (see the module docstring, step 1).

    With several records and *proc_root*, only those whose incoming QEMU runs count: a
    stale record (a migration that failed after ``migrate begin``) never blocks another
    domain's migration (:func:`libvirt_mdev.store.pending.live_records`); a single stale
    record is refused rather than served to whatever stream arrives."""
    records = list_pending(config.runtime_dir)
    if domain is not None:
        records = [r for r in records if domain in (r.domain_uuid, r.domain_name)]
        if not records:
            raise NotFound(f"no incoming migration of domain {domain} is armed in {config.runtime_dir} "
                           f"(the libvirt-mdev hook arms it at 'migrate begin'; is it installed?)")
    qemus: dict[str, float] | None = None
    if len(records) > 1 and proc_root is not None:
        qemus = qemu_start_times(proc_root)
        live = live_records(records, qemus)
        if live:
            records = live
    if len(records) == 1 and proc_root is not None and time.time() - records[0].created >= PENDING_GRACE:
        r = records[0]
        if is_stale(r, qemu_start_times(proc_root)):
            raise MdevError(f"the armed migration of domain {r.domain_name} (migration {r.migration_id}, "
                            f"armed {int(time.time() - r.created)}s ago) is stale: no QEMU of that domain "
                            f"started after it runs on this host, so this connection cannot be for it; refusing "
                            f"(remove it with: libvirt-mdev pending clear {r.domain_uuid})")
    if not records:
        raise NotFound(f"no incoming migration is armed in {config.runtime_dir}: refusing the connection "
                       f"(the libvirt-mdev hook arms one at 'migrate begin'; is it installed?)")
    if len(records) > 1:
        names = ", ".join(f"{r.domain_name} ({r.domain_uuid}{_qemu_note(r, qemus)})" for r in records)
        raise MdevError(f"{len(records)} incoming migrations are armed ({names}); cannot tell which one "
                        f"this connection is for: run one proxy per domain with --domain, or remove stale "
                        f"records with 'libvirt-mdev pending clear'")
    return records[0]


def _qemu_note(record: PendingRecord, qemus: dict[str, float] | None) -> str:
    """For the refusal line: whether the record's incoming QEMU runs."""
    if qemus is None:
        return ""
    started = qemus.get(record.domain_uuid)
    if started is None:
        return ", no QEMU running"
    return f", its QEMU started {started - record.created:+.1f}s after it was armed"


def check_local_types(record: PendingRecord, sysfs_root: str | Path, policy: MatchPolicy | None = None) -> None:
    """Each armed mdev must exist here now, with the armed type.

    Raises:
        MdevMissing / TypeMismatch: one line naming the mdev and both types.
    """
    env = SysfsEnv(sysfs_root)
    name = record.domain_name
    for dev in record.devices:
        local = env.find(dev.mdev_uuid)
        if local is None:
            raise MdevMissing(f"domain {name}: armed mdev {dev.mdev_uuid} ({dev.idstr}) no longer "
                              f"exists on this host; refusing its migration")
        if dev.type is not None and local.type_id != dev.type:
            raise TypeMismatch(f"domain {name}: mdev {dev.mdev_uuid} ({dev.idstr}) was armed for type "
                               f"{dev.type} but this host now has type {local.type_id}; refusing")
        if policy is not None and policy.active:
            recheck_armed(name, dev, sysfs_root, policy)


def bindings_from_pending(record: PendingRecord) -> dict[str, Binding]:
    """The filter's bindings: each armed device by its VFIO section idstr."""
    return {d.idstr: Binding(d.mdev_uuid, d.type, driver_version=d.driver_version, parent_model=d.parent_model)
            for d in record.devices}


__all__ = ["Claims", "bindings_from_pending", "check_local_types", "select_pending"]
