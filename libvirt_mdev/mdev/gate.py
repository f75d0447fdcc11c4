"""The destination's decision, in one call: what the hook, the proxy and ``load`` run.

* :func:`gate_check` — ``migrate begin`` / ``restore begin``: the incoming XML (after
  every earlier qemu.d hook rewrote it) against this host's sysfs, under the policy.
* :func:`armed_device` — the pending-record entry for one allowed device (what the
  proxy binds to the VFIO section, and what it re-checks).
* :func:`recheck_armed` — the proxy, at connection time: the mdev the pending record
  names must still exist here and still satisfy the recorded source facts.
* :func:`recheck` — the same for any recorded source facts: ``load`` passes the ones
  the state's manifest carries (:func:`recorded_source`).

No lxml, no libvirt: the hook imports this on its gate path.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from .model import AnnotatedMdev
from .policy import MatchPolicy
from .sysfs import SysfsEnv
from .types import CheckResult, DestMdev, DeviceCheck, check_device, compare

if TYPE_CHECKING:
    from ..store.pending import PendingDevice
    from .model import DomainInfo

Root = str | Path | SysfsEnv


def _env(root: Root) -> SysfsEnv:
    return root if isinstance(root, SysfsEnv) else SysfsEnv(root)


def sysfs_lookup(root: Root) -> Callable[[str], DestMdev | None]:
    """A :func:`compare` lookup reading this host's sysfs (type, parent, driver, model)."""
    env = _env(root)

    def lookup(uuid: str) -> DestMdev | None:
        m = env.find(uuid)
        if m is None:
            return None
        return DestMdev(m.type_id, m.parent, m.driver, m.driver_version, m.parent_model)
    return lookup


def gate_check(info: DomainInfo, root: Root, *, require_annotation: bool = True,
               policy: MatchPolicy | None = None) -> CheckResult:
    """Judge the incoming XML against this host.  The caller raises ``result.error()``."""
    return compare(info, sysfs_lookup(root), require_annotation=require_annotation, policy=policy)


def armed_device(d: DeviceCheck) -> PendingDevice:
    """The pending-record entry for an allowed device: the uuid this host uses, the
    stream idstr, the source type, and the source facts the policy re-checks."""
    from ..store.pending import PendingDevice  # the hook's migrate-begin path writes it anyway

    return PendingDevice(mdev_uuid=d.uuid, idstr=d.idstr or "", type=d.source_type,
                         driver_version=d.source_driver_version, parent_model=d.source_parent_model)


def recheck_armed(domain: str, device: PendingDevice, root: Root,
                  policy: MatchPolicy | None = None) -> DeviceCheck:
    """Re-judge one armed device (a pending-record entry, :func:`armed_device`) against
    this host *now*: it may have been removed or re-created since ``migrate begin``.
    A record without a source type is refused: the gate never arms one.

    Raises:
        MdevMissing, TypeMismatch, NotAnnotated: one line, when it no longer holds.
    """
    uuid = device.mdev_uuid
    src = recorded_source(uuid, device.type, device.driver_version, device.parent_model)
    return recheck(domain, uuid, src, root, policy, idstr=device.idstr)


def recorded_source(uuid: str, type_id: str | None, driver_version: str | None = None,
                    parent_model: str | None = None) -> AnnotatedMdev | None:
    """The source facts a pending record or a state manifest carries (``None``: no source type)."""
    if not type_id:
        return None
    return AnnotatedMdev(uuid, str(type_id), driver_version=driver_version, parent_model=parent_model)


def recheck(domain: str, uuid: str, src: AnnotatedMdev | None, root: Root,
            policy: MatchPolicy | None = None, *, idstr: str | None = None,
            where: str = "this host") -> DeviceCheck:
    """Judge the mdev *uuid* that will really receive the state, as this host's sysfs
    shows it now, against the recorded source facts *src* under *policy*: the proxy
    at connection time and ``load`` before it spends a token.

    Raises:
        MdevMissing, TypeMismatch, NotAnnotated: one line (:meth:`CheckResult.error`).
        MdevError: the mdev's sysfs node cannot be read (doubt is never a match).
    """
    policy = policy or MatchPolicy()
    check = check_device(uuid, src, sysfs_lookup(root)(uuid), policy, idstr=idstr)
    err = CheckResult(domain, None, src is not None, [check], policy=policy).error(where)
    if err is not None:
        raise err
    return check
