"""Logging to syslog (the journal picks it up) and optionally to a file.

Why both: admins read decisions in the journal; test hosts and minimal containers
often run no syslog daemon, so ``log_file`` in the config gives a place the tests
(and an admin on such a box) can read.  stderr is *not* a log target for the hook:
libvirt shows the hook's stderr to the virsh user, so only the one-line refusal
goes there.
"""
from __future__ import annotations

import logging
import logging.handlers
import os
from pathlib import Path
from typing import Optional

LOGGER_NAME = "libvirt-mdev"
_FORMAT = "%(asctime)s libvirt-mdev[%(process)d] %(levelname)s %(name)s: %(message)s"


def get_logger(name: str = "") -> logging.Logger:
    """The package logger, or a child of it (``get_logger("hook")``)."""
    return logging.getLogger(f"{LOGGER_NAME}.{name}" if name else LOGGER_NAME)


def setup_logging(ident: str, log_file: Optional[Path] = None, *,
                  syslog: bool = True, stderr_level: Optional[int] = None,
                  level: int = logging.INFO) -> logging.Logger:
    """Attach handlers once per process.  Safe to call again (handlers are replaced)."""
    root = get_logger()
    for h in list(root.handlers):
        root.removeHandler(h)
        h.close()
    root.setLevel(level)
    root.propagate = False
    if syslog and os.path.exists("/dev/log"):
        try:
            sh = logging.handlers.SysLogHandler(address="/dev/log",
                                                facility=logging.handlers.SysLogHandler.LOG_DAEMON)
            sh.ident = f"{ident}: "
            sh.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
            root.addHandler(sh)
        except OSError:
            pass  # no syslog socket we can use: the other handlers still work
    if log_file is not None:
        try:
            fh = logging.FileHandler(log_file, encoding="utf-8")
            fh.setFormatter(logging.Formatter(_FORMAT))
            root.addHandler(fh)
        except OSError:
            pass
    if stderr_level is not None:
        eh = logging.StreamHandler()
        eh.setLevel(stderr_level)
        eh.setFormatter(logging.Formatter("libvirt-mdev: %(levelname)s: %(message)s"))
        root.addHandler(eh)
    if not root.handlers:
        root.addHandler(logging.NullHandler())
    return root
