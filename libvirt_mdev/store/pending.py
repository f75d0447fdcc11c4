"""Pending records: what the ``migrate begin`` hook armed, for the proxy to serve.

One file per domain, ``<domain uuid>.json`` under the runtime dir (0700 root, files
0600 root), written atomically with the same checked file code as the store
(:mod:`.acl`).  The hook writes it, the proxy reads it, ``release end`` removes it.

A migration that fails after ``migrate begin`` but before libvirt has a domain object
(e.g. "domain already exists") gets no ``release end``: its record would stay for ever.
So records are *stale* once no QEMU of their domain, started after them, runs on this
host and their grace period (:data:`PENDING_GRACE`) is over: the proxy ignores stale
records when choosing which migration a connection serves (so they never block another
domain), and ``store gc`` and ``libvirt-mdev pending clear --stale`` remove them.

A record (:class:`PendingRecord`, its devices :class:`PendingDevice`; all keys required,
nothing else allowed, except that a device's ``driver_version`` and ``parent_model`` may
be missing, as in the records of a hook older than issue 17)::

    {"created": 1764590000,
     "devices": [{"driver_version": null, "idstr": "0000:00:05.0/vfio", "mdev_uuid": "<uuid>",
                  "parent_model": null, "type": "nvidia-63"}],
     "domain_name": "vm1", "domain_uuid": "<uuid>", "migration_id": "<word>"}
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import StoreIntegrityError, UsageError
from .acl import TEMP_PREFIX, SecureDir
from .manifest import WORD_RE, is_uuid

_RECORD_KEYS = {"domain_name", "domain_uuid", "migration_id", "created", "devices"}
_DEVICE_KEYS = {"mdev_uuid", "idstr", "type"}
#: source facts for the compatibility policy (issue 17); optional, so older records stay valid
_DEVICE_OPTIONAL = {"driver_version", "parent_model"}
PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class PendingDevice:
    """One armed mdev: the uuid this host uses, the VFIO section the proxy binds it to,
    and the source facts the proxy re-checks at connection time (``None``: not known)."""

    mdev_uuid: str
    idstr: str                          #: VFIO section idstr, e.g. ``0000:00:05.0/vfio``
    #: the source's mdev type id; ``None``: not annotated (armed only with ``require_annotation = no``)
    type: str | None
    driver_version: str | None = None   #: the source's vendor driver version (issue 17)
    parent_model: str | None = None     #: the source parent's PCI ``vendor:device`` (issue 17)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: all five keys, the optional ones as ``null`` when unknown (what the
        hook writes since issue 17; a record of an older hook has only the first three)."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class PendingRecord:
    """What the ``migrate begin`` hook armed for one incoming domain (see the module docstring)."""

    domain_name: str
    domain_uuid: str
    migration_id: str
    created: int                        #: unix seconds of ``migrate begin``
    devices: tuple[PendingDevice, ...] = ()

    @classmethod
    def from_dict(cls, obj: object) -> PendingRecord:
        """A record from its JSON object (a dict the hook, a test or a bench built).

        Raises:
            UsageError: *obj* is not a valid record (one line: :func:`record_problem`).
        """
        problem = record_problem(obj)
        if problem:
            raise UsageError(f"invalid pending record: {problem}")
        return cls._build(obj)

    @classmethod
    def from_json(cls, data: bytes, where: str) -> PendingRecord:
        """A record from a stored file's bytes; *where* names the file in messages.

        Raises:
            StoreIntegrityError: not JSON, or not a valid record.
        """
        try:
            obj = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise StoreIntegrityError(f"pending record {where} is not JSON") from None
        problem = record_problem(obj)
        if problem:
            raise StoreIntegrityError(f"pending record {where}: {problem}")
        return cls._build(obj)

    @classmethod
    def _build(cls, obj: Any) -> PendingRecord:
        """From an object :func:`record_problem` accepted."""
        devices = tuple(PendingDevice(mdev_uuid=d["mdev_uuid"], idstr=d["idstr"], type=d["type"],
                                      driver_version=d.get("driver_version"), parent_model=d.get("parent_model"))
                        for d in obj["devices"])
        return cls(domain_name=obj["domain_name"], domain_uuid=obj["domain_uuid"],
                   migration_id=obj["migration_id"], created=obj["created"], devices=devices)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object (``pending list --json`` shows it too)."""
        return {"domain_name": self.domain_name, "domain_uuid": self.domain_uuid,
                "migration_id": self.migration_id, "created": self.created,
                "devices": [d.to_dict() for d in self.devices]}

    def to_json(self) -> bytes:
        """The file's bytes: sorted keys, no whitespace (the bytes the hook wrote when the record was a dict)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":")).encode("utf-8")


def _text(v: Any) -> bool:
    return isinstance(v, str) and 0 < len(v) <= 1024 and v.isprintable()


def record_problem(record: Any) -> str | None:
    """Why *record* (a JSON object) is not a valid pending record (None when it is)."""
    if not isinstance(record, dict):
        return "not an object"
    if set(record) != _RECORD_KEYS:
        extra = sorted(set(record) - _RECORD_KEYS)
        missing = sorted(_RECORD_KEYS - set(record))
        return f"unknown key {extra[0]!r}" if extra else f"missing key {missing[0]!r}"
    if not _text(record["domain_name"]):
        return "domain_name must be non-empty printable text"
    if not is_uuid(record["domain_uuid"]):
        return "domain_uuid must be a lowercase UUID"
    if not (isinstance(record["migration_id"], str) and WORD_RE.match(record["migration_id"])):
        return "migration_id must be 1-255 characters of [A-Za-z0-9._:@+-]"
    c = record["created"]
    if isinstance(c, bool) or not isinstance(c, int) or c < 0:
        return "created must be a non-negative integer (unix seconds)"
    devs = record["devices"]
    if not isinstance(devs, list):
        return "devices must be a list"
    for i, d in enumerate(devs):
        problem = _device_problem(d, f"devices[{i}]")
        if problem:
            return problem
    return None


def _device_problem(d: Any, at: str) -> str | None:
    if not isinstance(d, dict) or not _DEVICE_KEYS <= set(d) <= _DEVICE_KEYS | _DEVICE_OPTIONAL:
        return f"{at} must have exactly the keys {', '.join(sorted(_DEVICE_KEYS))}"
    for key in _DEVICE_OPTIONAL & set(d):
        if d[key] is not None and not (isinstance(d[key], str) and WORD_RE.match(d[key])):
            return f"{at}.{key} must be a word or null"
    if not is_uuid(d["mdev_uuid"]):
        return f"{at}.mdev_uuid must be a lowercase UUID"
    if not _text(d["idstr"]):
        return f"{at}.idstr must be non-empty printable text"
    if d["type"] is not None and not (isinstance(d["type"], str) and WORD_RE.match(d["type"])):
        return f"{at}.type must be an mdev type id or null"
    return None


def _open(runtime_dir: PathLike, create: bool, uid: int) -> SecureDir:
    return SecureDir.open(runtime_dir, create=create, uid=uid, what="runtime")


def _name(domain_uuid: str) -> str:
    if not is_uuid(domain_uuid):
        raise UsageError(f"domain uuid {domain_uuid!r} is not a lowercase UUID")
    return f"{domain_uuid}.json"


def write_pending(runtime_dir: PathLike, record: PendingRecord | dict[str, Any], *, uid: int = 0) -> Path:
    """Write (or replace) the pending record of *record*'s domain, atomically.  A dict
    (tests, benches) is the record's JSON object.  Creates *runtime_dir* (0700, owner
    *uid*) when it is missing.

    Returns:
        The record's path (for messages; never reopen it by path).
    Raises:
        UsageError: the record is invalid.
        StoreAccessError: the runtime dir has the wrong owner/mode or is a symlink.
        StoreError: I/O failure.
    """
    rec = PendingRecord.from_dict(record.to_dict() if isinstance(record, PendingRecord) else record)
    name = _name(rec.domain_uuid)
    data = rec.to_json()
    with _open(runtime_dir, True, uid) as d:
        d.write_atomic(name, data, replace=True)
        return d.path / name


def read_pending(runtime_dir: PathLike, domain_uuid: str, *, uid: int = 0) -> PendingRecord | None:
    """The pending record of *domain_uuid*, or None when there is none (or no
    runtime dir yet).

    Raises:
        StoreAccessError: bad owner/mode/symlink/links on the dir or the file.
        StoreIntegrityError: the file is not a valid record for this domain.
    """
    name = _name(domain_uuid)
    if not os.path.lexists(runtime_dir):
        return None
    with _open(runtime_dir, False, uid) as d:
        data = d.read_small(name, missing_ok=True)
        if data is None:
            return None
        return _parse(data, d.describe(name), domain_uuid)


def _parse(data: bytes, where: str, domain_uuid: str | None) -> PendingRecord:
    rec = PendingRecord.from_json(data, where)
    if domain_uuid is not None and rec.domain_uuid != domain_uuid:
        raise StoreIntegrityError(f"pending record {where} names domain {rec.domain_uuid}")
    return rec


def remove_pending(runtime_dir: PathLike, domain_uuid: str, *, uid: int = 0) -> bool:
    """Remove *domain_uuid*'s record.  Returns whether one existed."""
    name = _name(domain_uuid)
    if not os.path.lexists(runtime_dir):
        return False
    with _open(runtime_dir, False, uid) as d:
        removed = d.unlink(name, missing_ok=True)
        if removed:
            d.sync()
        return removed


def list_pending(runtime_dir: PathLike, *, uid: int = 0) -> list[PendingRecord]:
    """All valid records, oldest first.

    Raises:
        StoreAccessError / StoreIntegrityError: on the first untrustworthy file (fail
            closed: a proxy must not guess which records are real).
    """
    if not os.path.lexists(runtime_dir):
        return []
    out = []
    with _open(runtime_dir, False, uid) as d:
        for name in d.listdir():
            if name.startswith(TEMP_PREFIX) or not name.endswith(".json"):
                continue
            if not is_uuid(name[:-5]):
                continue  # other files (e.g. sockets of the proxy) are not ours to judge
            data = d.read_small(name, missing_ok=True)
            if data is None:
                continue
            out.append(_parse(data, d.describe(name), name[:-5]))
    out.sort(key=lambda r: (r.created, r.domain_uuid))
    return out


# --------------------------------------------------------------------------- staleness
#: seconds after ``migrate begin`` within which a record counts as live even before its
#: QEMU runs.  libvirt execs the incoming QEMU right after the hook (docs/proxy.md,
#: "Pending records": hook → prepare → QEMU exec'd with ``-incoming defer``) and gives
#: up on a QEMU whose monitor does not answer within 30 s; a minute more covers a
#: loaded host.  After that, a record whose QEMU is not running can never be served.
PENDING_GRACE = 90


#: clock-tick rounding of a process's start time (seconds)
_START_SLACK = 0.05


def _boot_time(proc: Path) -> float | None:
    """Unix time of the boot, to 10 ms (``/proc/uptime``; ``btime`` in ``/proc/stat`` is
    whole seconds, too coarse to tell a QEMU started just before a record from one
    started just after it)."""
    try:
        return time.time() - float((proc / "uptime").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        pass
    try:
        for line in (proc / "stat").read_text().splitlines():
            if line.startswith("btime "):
                return float(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def qemu_start_times(proc: str | Path = "/proc") -> dict[str, float]:
    """Domain uuid → unix start time of each running process with ``-uuid <uuid>`` in
    its command line (libvirt starts every QEMU with ``-uuid``).  Cheap: one small read
    per process, no libvirt connection (the proxy is not a libvirt client)."""
    proc = Path(proc)
    btime = _boot_time(proc)
    hz = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    try:
        pids = [n for n in os.listdir(proc) if n.isdigit()]
    except OSError:
        return out
    for pid in pids:
        try:
            args = (proc / pid / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for i, a in enumerate(args[:-1]):
            if a != b"-uuid":
                continue
            uuid = args[i + 1].decode("ascii", "replace").lower()
            started = 0.0
            try:  # field 22 of stat (after the ')' that ends the command name): start time in ticks
                fields = (proc / pid / "stat").read_text().rsplit(")", 1)[1].split()
                if btime is not None:
                    started = btime + int(fields[19]) / hz
            except (OSError, IndexError, ValueError):
                pass
            out[uuid] = max(out.get(uuid, 0.0), started)
            break
    return out


def is_stale(record: PendingRecord, qemus: dict[str, float], now: float | None = None,
             grace: float = PENDING_GRACE) -> bool:
    """A record is *stale* — it can never be served — when its grace period is over and
    no QEMU for its domain runs that was started after the record was written.

    Why "started after": the incoming QEMU is exec'd after ``migrate begin``.  A QEMU
    of the same uuid that was already running (e.g. the migration failed with "domain
    already exists") is not the one this record armed."""
    now = time.time() if now is None else now
    if now - record.created < grace:
        return False
    started = qemus.get(record.domain_uuid)
    return started is None or started + _START_SLACK < record.created


def live_records(records: list[PendingRecord], qemus: dict[str, float]) -> list[PendingRecord]:
    """The records whose incoming QEMU runs *now* (started after the record was written).
    A connection that carries a QEMU stream comes from a source whose Prepare step on
    this host has returned, so its QEMU is already listening: no grace period here."""
    return [r for r in records
            if r.domain_uuid in qemus and qemus[r.domain_uuid] + _START_SLACK >= r.created]


def expire_pending(runtime_dir: PathLike, *, now: float | None = None, proc: str | Path = "/proc",
                   grace: float = PENDING_GRACE, dry_run: bool = False, uid: int = 0) -> list[PendingRecord]:
    """Remove the stale records (see :func:`is_stale`); returns them.  For ``store gc``
    and ``libvirt-mdev pending clear --stale``.

    Raises:
        StoreAccessError / StoreIntegrityError: as :func:`list_pending`.
    """
    qemus = qemu_start_times(proc)
    stale = [r for r in list_pending(runtime_dir, uid=uid) if is_stale(r, qemus, now, grace)]
    if not dry_run:
        for r in stale:
            remove_pending(runtime_dir, r.domain_uuid, uid=uid)
    return stale


__all__ = [
    "PENDING_GRACE",
    "PendingDevice",
    "PendingRecord",
    "expire_pending",
    "is_stale",
    "list_pending",
    "live_records",
    "qemu_start_times",
    "read_pending",
    "record_problem",
    "remove_pending",
    "write_pending",
]
