"""Logging to syslog (the journal picks it up) and optionally to a file.

Why both: admins read decisions in the journal; test hosts and minimal containers
often run no syslog daemon, so ``log_file`` in the config gives a place the tests
(and an admin on such a box) can read.  stderr is *not* a log target for the hook:
libvirt shows the hook's stderr to the virsh user, so only the one-line refusal
goes there.

Every logged message has its control characters escaped (:func:`escape_controls`):
values such as a domain name come from outside (a domain XML, a stream) and a name
with an encoded newline would otherwise write a forged second line into the log.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from .hooklog import escape_controls

LOGGER_NAME = "libvirt-mdev"
_FORMAT = "%(asctime)s libvirt-mdev[%(process)d] %(levelname)s %(name)s: %(message)s"
class SafeFormatter(logging.Formatter):
    """A formatter whose message part is :func:`escape_controls`-ed (tracebacks, which
    only ``--debug`` shows, stay multi-line but every line of them is indented)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        saved = record.message
        record.message = escape_controls(saved)
        try:
            return super().formatMessage(record)
        finally:
            record.message = saved

    def formatException(self, ei: Any) -> str:
        return "\n".join("  | " + escape_controls(line) for line in super().formatException(ei).splitlines())


def get_logger(name: str = "") -> logging.Logger:
    """The package logger, or a child of it (``get_logger("hook")``)."""
    return logging.getLogger(f"{LOGGER_NAME}.{name}" if name else LOGGER_NAME)


def setup_logging(ident: str, log_file: Path | None = None, *,
                  syslog: bool = True, stderr_level: int | None = None,
                  level: int = logging.INFO) -> logging.Logger:
    """Attach handlers once per process.  Safe to call again (handlers are replaced)."""
    root = get_logger()
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    root.setLevel(level)
    root.propagate = False
    if syslog and os.path.exists("/dev/log"):
        from logging.handlers import SysLogHandler  # here, not at the top: ~10 ms the hook's quiet calls need not pay

        try:
            sh = SysLogHandler(address="/dev/log",
                                                facility=SysLogHandler.LOG_DAEMON)
            sh.ident = f"{ident}: "
            sh.setFormatter(SafeFormatter("%(levelname)s %(message)s"))
            root.addHandler(sh)
        except OSError:
            pass  # no syslog socket we can use: the other handlers still work
    if log_file is not None:
        try:
            fh = logging.FileHandler(log_file, encoding="utf-8")
            fh.setFormatter(SafeFormatter(_FORMAT))
            root.addHandler(fh)
        except OSError:
            pass
    if stderr_level is not None:
        eh = logging.StreamHandler()
        eh.setLevel(stderr_level)
        eh.setFormatter(SafeFormatter("libvirt-mdev: %(levelname)s: %(message)s"))
        root.addHandler(eh)
    if not root.handlers:
        root.addHandler(logging.NullHandler())
    return root


class LogBudget:
    """At most *lines* log lines per *window* seconds for one kind of event (a flood of
    refused connections must not flood the journal); what was left out is counted and
    said by the next line that gets through.  Thread-safe."""

    def __init__(self, lines: int = 10, window: float = 60.0) -> None:
        self.lines, self.window = lines, window
        self._lock = threading.Lock()
        self._start = -window
        self._used = 0
        self.skipped = 0

    def take(self) -> tuple[bool, int]:
        """(may this line be logged, how many were left out before it)."""
        now = time.monotonic()
        with self._lock:
            if now - self._start >= self.window:
                self._start, self._used = now, 0
            if self._used >= self.lines:
                self.skipped += 1
                return False, 0
            self._used += 1
            skipped, self.skipped = self.skipped, 0
            return True, skipped
