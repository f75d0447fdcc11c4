"""The libvirt qemu hook: the mdev type gate at ``migrate begin`` and ``restore begin``.

libvirt runs every executable in ``/etc/libvirt/hooks/qemu.d/`` as
``HOOK DOMAIN OPERATION SUBOP EXTRA`` with the domain XML on stdin (LIBVIRT.md §1):

* ``migrate begin`` (destination, before QEMU starts) and ``restore begin`` (save
  image): compare each mdev's annotated source type with this host's sysfs type.
  Refuse — exit 1 with ONE line on stderr naming the mdev and both types, which
  libvirt shows to the virsh user — on mismatch, a missing mdev, or (with
  ``require_annotation``) a missing annotation.  Any doubt (bad XML, unreadable
  sysfs or config) also refuses: fail closed.  On success, ``migrate begin`` arms the
  live path: a pending record for the domain under ``runtime_dir`` (the proxy's cue).
* ``release end``: forget this domain's pending record; let the store expire this
  domain's state (retention-based, see :func:`_release`).
* everything else: exit 0 at once.

Rules the hook lives by:

* stdout replaces the domain XML for migrate/restore: we print nothing there (empty
  output means "unchanged").
* libvirt waits, with no timeout, until stdout and stderr close: we start no child.
* libvirt replaces the environment: the config comes only from the path baked into
  the installed hook (``install-hook --config``) or the fixed default, never from a
  variable.
* never call the libvirt API (libvirt waits for us: deadlock).  No libvirt-python,
  no click; lxml only on the gate paths.  The no-op path imports almost nothing.

Every call and its decision is logged to syslog and to ``log_file`` if configured.
"""
from __future__ import annotations

import sys
import time
from typing import IO, TYPE_CHECKING, Any, Callable, Optional

if TYPE_CHECKING:
    from .config import Config
    from .mdev.domain import DomainInfo

DEFAULT_CONFIG = "/etc/libvirt/libvirt-mdev.conf"
LOG_IDENT = "libvirt-mdev-hook"
#: refuse domain XML larger than this (libvirt's own limit for XML is 10 MiB)
MAX_XML = 10 * 1024 * 1024


class Refusal(Exception):
    """The gate says no; ``str()`` is the one line for stderr."""


class Call:
    """One hook invocation: its arguments, streams, config and logger (lazily set up)."""

    def __init__(self, argv: list[str], stdin: IO[bytes], stderr: IO[str], config_path: Optional[str]) -> None:
        self.domain, self.op, self.sub_op = argv[0], argv[1], argv[2]
        self.stdin, self.stderr = stdin, stderr
        self.config_path = config_path or DEFAULT_CONFIG
        self._config: Optional["Config"] = None
        self._log: Any = None

    @property
    def config(self) -> "Config":
        if self._config is None:
            from .config import load_config

            self._config = load_config(self.config_path)  # explicit path: never $LIBVIRT_MDEV_CONFIG
        return self._config

    def log(self, level: str, message: str) -> None:
        if self._log is None:
            from .log import setup_logging

            try:
                log_file = self.config.log_file
            except Exception:  # noqa: BLE001 - a broken config must not stop the log line about it
                log_file = None
            self._log = setup_logging(LOG_IDENT, log_file)
        getattr(self._log, level)(f"{self.op} {self.sub_op} domain={self.domain}: {message}")

    def read_domain(self) -> "DomainInfo":
        from .mdev.domain import parse_domain

        data = self.stdin.read(MAX_XML + 1)
        if not data or not data.strip():
            raise Refusal(f"domain {self.domain}: libvirt passed no domain XML on stdin")
        if len(data) > MAX_XML:
            raise Refusal(f"domain {self.domain}: domain XML larger than {MAX_XML} bytes")
        return parse_domain(data)


# --------------------------------------------------------------------------- handlers
def _gate(call: Call) -> "tuple[DomainInfo, Any]":
    """The type check shared by migrate and restore.  Returns the domain and result."""
    from .mdev.sysfs import SysfsEnv
    from .mdev.types import DestMdev, compare

    info = call.read_domain()
    if info.name != call.domain:  # not fatal: the type check is about the XML's mdevs
        call.log("warning", f"the XML on stdin names domain {info.name}")
    env = SysfsEnv(call.config.sysfs_root)

    def lookup(uuid: str) -> "Optional[DestMdev]":
        m = env.find(uuid)
        return DestMdev(m.type_id, m.parent) if m else None

    result = compare(info, lookup, require_annotation=call.config.require_annotation)
    for d in result.devices:
        call.log("info", f"mdev {d.uuid} idstr={d.idstr} source_type={d.source_type} "
                         f"local_type={d.dest_type} verdict={d.verdict.value}")
    err = result.error("this host")
    if err is not None:
        raise err
    return info, result


def _migrate_begin(call: Call) -> str:
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
        devices.append({"mdev_uuid": d.uuid, "idstr": d.idstr, "type": d.source_type})
    from .store.pending import write_pending

    now = int(time.time())
    record = {"domain_name": info.name, "domain_uuid": info.uuid,
              "migration_id": f"{now}-{_random_word()}", "created": now, "devices": devices}
    path = write_pending(call.config.runtime_dir, record)
    what = f"{len(devices)} mdev(s) match" if devices else "no mdev hostdevs (arm_all)"
    return f"allowed: {what}; armed {path} migration_id={record['migration_id']}"


def _restore_begin(call: Call) -> str:
    info, result = _gate(call)
    if not info.hostdevs:
        return "allowed: no mdev hostdevs"
    return f"allowed: {len(result.devices)} mdev(s) match"


def _release_end(call: Call) -> str:
    """Forget the pending record; expire this domain's stored state by the retention.

    Not ``retention=0``: ``release`` also follows ``virsh save``, and a save image
    made in token mode still needs its states for the later restore.
    """
    import os

    from .store.pending import remove_pending

    try:
        info = call.read_domain()
    except Exception as exc:  # noqa: BLE001 - release's result is ignored by libvirt; say why and stop
        return f"nothing done: {_one_line(exc)}"
    if info.uuid is None:
        return "nothing done: no domain uuid in the XML"
    removed = remove_pending(call.config.runtime_dir, info.uuid)
    note = f"pending record {'removed' if removed else 'absent'}"
    if os.path.isdir(call.config.store):
        from .store.store import Store

        with Store.open(call.config.store) as store:
            rep = store.gc(call.config.retention, domain_uuid=info.uuid)
        note += f"; store gc removed {len(rep.removed_manifests)} manifest(s)"
    return note


def _random_word() -> str:
    import os

    return os.urandom(6).hex()


#: (operation, sub-operation) -> handler; anything else is a no-op
HANDLERS: dict[tuple[str, str], Callable[[Call], str]] = {
    ("migrate", "begin"): _migrate_begin,
    ("restore", "begin"): _restore_begin,
    ("release", "end"): _release_end,
}
#: operations whose failure aborts the operation in libvirt (errors there refuse), and
#: how the refusal line names them
GATES = {("migrate", "begin"): "incoming migration", ("restore", "begin"): "restore"}


def _one_line(exc: BaseException) -> str:
    from .errors import MdevError

    if isinstance(exc, (Refusal, MdevError)):
        return " ".join(str(exc).split())
    return f"internal error ({type(exc).__name__}): {' '.join(str(exc).split())}"


def main(argv: list[str], stdin: IO[bytes], stdout: IO[bytes], stderr: IO[str],
         config_path: Optional[str] = None) -> int:
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
        _log_quietly(call, "info", "no-op")
        return 0
    gate = (call.op, call.sub_op) in GATES
    try:
        decision = handler(call)
    except Exception as exc:  # noqa: BLE001 - fail closed: any doubt is a refusal, in one line
        line = _one_line(exc)
        _log_quietly(call, "warning" if gate else "error", ("REFUSED: " if gate else "failed: ") + line)
        if not gate:
            return 0  # release/other results are ignored by libvirt; the log has it
        stderr.write(f"libvirt-mdev: {GATES[(call.op, call.sub_op)]} refused: {line}\n")
        stderr.flush()
        return 1
    _log_quietly(call, "info", decision)
    return 0


def _log_quietly(call: Call, level: str, message: str) -> None:
    try:
        call.log(level, message)
    except Exception:  # noqa: BLE001 - logging must never change the decision
        pass


def run() -> None:
    """Entry point for ``python -m libvirt_mdev.hook`` (the installed hook calls :func:`main`)."""
    sys.exit(main(sys.argv[1:], sys.stdin.buffer, sys.stdout.buffer, sys.stderr))


if __name__ == "__main__":
    run()
