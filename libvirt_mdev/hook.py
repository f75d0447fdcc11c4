"""The libvirt qemu hook: the mdev type gate at ``migrate begin`` and ``restore begin``.

libvirt runs every executable in ``/etc/libvirt/hooks/qemu.d/`` as
``HOOK DOMAIN OPERATION SUBOP EXTRA`` with the domain XML on stdin (docs/hook.md):

* ``migrate begin`` (destination, before QEMU starts) and ``restore begin`` (save
  image): compare each mdev's annotated source type with this host's sysfs type.
  Refuse — exit 1 with ONE line on stderr naming the mdev and both types, which
  libvirt shows to the virsh user — on mismatch, a missing mdev, or (with
  ``require_annotation``) a missing annotation.  Any doubt (bad XML, unreadable
  sysfs or config) also refuses: fail closed.  On success, ``migrate begin`` arms the
  live path: a pending record for the domain under ``runtime_dir`` (the proxy's cue) —
  only when the no-bypass guard is in place (docs/guard.md); otherwise it refuses with
  the fix (``libvirt-mdev guard install``).
* ``started begin`` of a domain with a pending record (the destination QEMU now
  listens; the source has sent nothing yet): every listening socket of that QEMU must
  be a guarded endpoint (:func:`libvirt_mdev.live.endpoint.check_incoming_endpoint`).
  Refusing here fails libvirt's Prepare: the guest keeps running on the source.
* ``release end``: forget this domain's pending record; let the store expire this
  domain's state (retention-based, see :func:`_release_end`).  libvirt >= 11 passes a
  reason as the 4th argument (``migrated``, ``saved``, ``destroyed``...; 9.0 passes ``-``).
* everything else: exit 0 at once, logged only with ``log_level = debug``.

Rules the hook lives by:

* stdout replaces the domain XML for migrate/restore: we print nothing there (empty
  output means "unchanged").
* libvirt waits, with no timeout, until stdout and stderr close: we start no child.
* libvirt replaces the environment: the config comes only from the path baked into
  the installed hook (``install-hook --config``) or the fixed default, never from a
  variable.
* never call the libvirt API (libvirt waits for us: deadlock).  No libvirt-python,
  no click; lxml only on the gate paths.  The no-op path imports almost nothing.

Every decision is logged to syslog and to ``log_file`` if configured (no-op calls only with
``log_level = debug``: they happen on every domain operation), by :mod:`.hooklog`.
"""
from __future__ import annotations

import sys
import time

from .errors import PREFIX, MdevError, describe
from .hookcall import Call, Refusal

#: not ``typing.TYPE_CHECKING``: importing typing costs the no-op path ~9 ms (mypy
#: treats any constant of this name as true)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import IO, Any

    from .mdev.domain import DomainInfo

__all__ = ["Call", "Refusal", "main", "run"]


# --------------------------------------------------------------------------- handlers
def _gate(call: Call) -> tuple[DomainInfo, Any]:
    """The type check shared by migrate and restore.  Returns the domain and result."""
    from .mdev.gate import gate_check
    from .mdev.policy import MatchPolicy

    info = call.read_domain()
    if info.name != call.domain:  # not fatal: the type check is about the XML's mdevs
        call.log("warning", f"the XML on stdin names domain {info.name}")
    result = gate_check(info, call.config.sysfs_root, require_annotation=call.config.require_annotation,
                        policy=MatchPolicy.from_config(call.config))
    for d in result.devices:
        call.log("info", f"mdev {d.uuid} idstr={d.idstr} source_type={d.source_type} "
                         f"local_type={d.dest_type} verdict={d.verdict.value} source_mdev={d.source_uuid} "
                         f"matched_by={d.matched_by} driver={d.source_driver_version}->{d.dest_driver_version}")
    err = result.error("this host")
    if err is not None:
        raise err
    return info, result


def _has_hostdev(xml: bytes) -> bool:
    """Whether *xml* may hold a ``<hostdev>`` — False only for well-formed XML without
    a DTD in which no element is named ``hostdev`` (in any namespace).  Uses the C expat
    parser: the common mdev-less ``migrate begin`` then skips lxml, sysfs and the type
    gate (~30 ms, issue 15).  Any doubt answers True: the full gate decides."""
    import pyexpat

    found = False

    def start(name: str, attrs: object) -> None:
        nonlocal found
        if name.rpartition(":")[2] == "hostdev":
            found = True

    def doctype(*_: object) -> None:
        raise ValueError("DTD")

    parser = pyexpat.ParserCreate()
    parser.StartElementHandler = start
    parser.StartDoctypeDeclHandler = doctype
    try:
        parser.Parse(xml, True)
    except (pyexpat.ExpatError, ValueError):
        return True
    return found


def _migrate_begin(call: Call) -> str:
    if not call.settings.arm_all and not _has_hostdev(call.read_xml()):
        return "allowed: no mdev hostdevs (not armed)"
    from .mdev.gate import armed_device

    info, result = _gate(call)
    if not info.hostdevs and not call.config.arm_all:
        return "allowed: no mdev hostdevs (not armed)"
    if info.uuid is None:
        raise Refusal(f"domain {info.name} has no <uuid> in its XML")
    devices = []
    for d in result.devices:
        if not d.idstr:
            raise Refusal(f"domain {info.name}: cannot tell the VFIO "
                          f"section of mdev {d.uuid} (no guest PCI address in the XML)")
        devices.append(armed_device(d))
    from .live.guard import guard_problem
    from .store.pending import PendingRecord, write_pending

    problem = guard_problem(call.config)
    if problem is not None:
        raise Refusal(problem)
    if not call.config.require_guard:
        call.log("warning", "require_guard = no: arming without the no-bypass guard; the proxy can be bypassed")
    now = int(time.time())
    record = PendingRecord(domain_name=info.name, domain_uuid=info.uuid,
                           migration_id=f"{now}-{_random_word()}", created=now, devices=tuple(devices))
    path = write_pending(call.config.runtime_dir, record)
    what = f"{len(devices)} mdev(s) match" if devices else "no mdev hostdevs (arm_all)"
    return f"allowed: {what}; armed {path} migration_id={record.migration_id}"


def _restore_begin(call: Call) -> str:
    info, result = _gate(call)
    if not info.hostdevs:
        return "allowed: no mdev hostdevs"
    if info.uuid is None:
        raise Refusal(f"domain {info.name} has no <uuid> in its XML")
    # the image's author controls its XML: admit only the file a verifying splice wrote
    # (docs/saveimages.md); libvirtd (our parent) holds it open while this hook runs
    import os

    from .store.permit import admit_restore

    admit_restore(call.config, info.uuid, os.getppid())
    return f"allowed: {len(result.devices)} mdev(s) match; image verified by libvirt-mdev splice"


def _domain_uuid(xml: bytes) -> str | None:
    """The domain's ``<uuid>`` from libvirt's own live XML, without an XML parser (the
    common ``started begin`` call must stay cheap).  libvirt formats the domain's uuid
    element before ``<devices>``; device uuids are attributes, never ``<uuid>`` elements."""
    start = xml.find(b"<uuid>")
    end = xml.find(b"</uuid>", start)
    if start < 0 or end < 0 or end - start > 64:
        return None
    text = xml[start + 6:end].strip().decode("ascii", "replace").lower()
    return text if len(text) == 36 and text.count("-") == 4 else None


def _started_begin(call: Call) -> str:
    """The endpoint check of an armed incoming migration (see the module docstring).

    A domain without a pending record is a plain start: nothing to check, and no
    config problem may block it (``migrate begin`` refuses on a broken config, so no
    migration is armed under one)."""
    import os

    try:
        uuid = _domain_uuid(call.read_xml())
    except Refusal:
        uuid = None
    if uuid is None:
        return "no-op (no domain uuid in the XML)"
    try:
        runtime_dir = call.settings.runtime_dir
    except MdevError as exc:  # a plain start must not fail on a config problem
        return f"no-op (config: {describe(exc)})"
    if not os.path.lexists(os.path.join(runtime_dir, f"{uuid}.json")):
        return _started_unarmed(call)
    from .live.endpoint import check_incoming_endpoint
    from .store.pending import read_pending

    record = read_pending(call.config.runtime_dir, uuid)
    if record is None:
        return "no-op"
    call.gate = True
    return check_incoming_endpoint(call.config, call.domain, call.stdin_data) + \
        f" (migration_id={record.migration_id})"


def _started_unarmed(call: Call) -> str:
    """A domain without a pending record: a plain start (nothing to check), or an
    unarmed incoming migration (see :func:`libvirt_mdev.live.endpoint.check_unarmed_incoming`)."""
    import os

    try:
        pid_file = os.path.join(call.settings.qemu_run_dir, f"{call.domain}.pid")
        with open(pid_file, "rb") as fh:
            pid = int(fh.read(32).split()[0])
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            incoming = b"\0-incoming\0" in fh.read()
    except (OSError, ValueError, IndexError, MdevError):
        return "no-op (no QEMU pid to look at)"
    if not incoming:
        return "no-op"
    from .live.endpoint import check_unarmed_incoming

    call.gate = True
    return check_unarmed_incoming(call.config, call.domain, call.stdin_data, pid)


#: release reasons (libvirt >= 11) after which the domain's stored state may still be
#: needed: a save image (token mode) is restored from it later
_KEEP_STATE_REASONS = ("saved",)


def _release_end(call: Call) -> str:
    """Forget the pending record; expire this domain's stored state by the retention.

    Not ``retention=0``: ``release`` also follows ``virsh save``, and a save image
    made in token mode still needs its states for the later restore.  Where libvirt
    names the reason (>= 11), ``saved`` skips the store gc altogether.
    """
    import os

    try:  # libvirt's own live XML, as at started begin: no XML parser needed for the uuid
        uuid = _domain_uuid(call.read_xml())
    except Refusal as exc:
        return f"nothing done: {describe(exc)}"
    if uuid is None:
        return "nothing done: no domain uuid in the XML"
    removed = False
    if os.path.lexists(os.path.join(call.settings.runtime_dir, f"{uuid}.json")):
        from .store.pending import remove_pending

        removed = remove_pending(call.config.runtime_dir, uuid)
    note = f"pending record {'removed' if removed else 'absent'}"
    if call.reason is not None:
        note += f"; reason {call.reason}"
    if call.reason in _KEEP_STATE_REASONS:
        note += "; store gc skipped (a save image may need the state)"
    elif os.path.isdir(call.settings.store):
        from .store.store import Store

        with Store.open(call.config.store) as store:
            rep = store.gc(call.config.retention, domain_uuid=uuid)
        note += f"; store gc removed {len(rep.removed_manifests)} manifest(s)"
    return note


def _random_word() -> str:
    import os

    return os.urandom(6).hex()


#: (operation, sub-operation) -> handler; anything else is a no-op
HANDLERS: dict[tuple[str, str], Callable[[Call], str]] = {
    ("migrate", "begin"): _migrate_begin,
    ("started", "begin"): _started_begin,
    ("restore", "begin"): _restore_begin,
    ("release", "end"): _release_end,
}
#: operations whose failure aborts the operation in libvirt (errors there refuse), and
#: how the refusal line names them
GATES = {("migrate", "begin"): "incoming migration", ("restore", "begin"): "restore",
         ("started", "begin"): "incoming migration"}
#: gates that refuse only once the handler says the call matters (``call.gate``)
_CONDITIONAL_GATES = {("started", "begin")}


def main(argv: list[str], stdin: IO[bytes], stdout: IO[bytes], stderr: IO[str],
         config_path: str | None = None) -> int:
    """Run one hook call.  *argv* is ``[DOMAIN, OPERATION, SUBOP, EXTRA...]``.

    Returns the exit status: 0 allow / nothing to do, 1 refuse (gates only), 2 bad argv.
    *stdout* is never written (it would replace the domain XML).
    """
    if len(argv) < 3:
        stderr.write("libvirt-mdev hook: expected arguments DOMAIN OPERATION SUBOP [EXTRA]\n")
        return 2
    call = Call(argv, stdin, stderr, config_path)
    handler = HANDLERS.get((call.op, call.sub_op))
    if handler is None:
        if call.may_debug():
            _log_quietly(call, "debug", "no-op")
        return 0
    key = (call.op, call.sub_op)
    try:
        decision = handler(call)
    except Exception as exc:  # fail closed: any doubt is a refusal, in one line
        gate = key in GATES and (key not in _CONDITIONAL_GATES or call.gate)
        line = describe(exc)
        _log_quietly(call, "warning" if gate else "error", ("REFUSED: " if gate else "failed: ") + line)
        if not gate:
            return 0  # release/other results are ignored by libvirt; the log has it
        stderr.write(f"{PREFIX}{GATES[(call.op, call.sub_op)]} refused: {line}\n")
        stderr.flush()
        return 1
    _log_quietly(call, "debug" if decision.startswith("no-op") else "info", decision)
    return 0


def _log_quietly(call: Call, level: str, message: str) -> None:
    try:
        call.log(level, message)
    except Exception:  # logging must never change the decision
        pass


def run() -> None:
    """Entry point for ``python -m libvirt_mdev.hook`` (the installed hook calls :func:`main`)."""
    sys.exit(main(sys.argv[1:], sys.stdin.buffer, sys.stdout.buffer, sys.stderr))


if __name__ == "__main__":
    run()
