"""The hook's logger: one line per record to syslog and to ``log_file``, without the
:mod:`logging` package.

Why not :mod:`logging`: the hook runs on every libvirt domain operation and libvirt
waits for it; importing ``logging`` (and ``logging.handlers``, ``socket``...) cost the
hook's quiet calls ~10-25 ms (issue 15).  The C :mod:`syslog` module and an
``O_APPEND`` write do the same job.  The line format matches :mod:`.log`'s file format,
and every message goes through :func:`escape_controls` (issue 12: a domain name with an
encoded newline must not forge a second line).
"""
from __future__ import annotations

import os
import time

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}
_SYSLOG_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3}  # LOG_DEBUG .. LOG_ERR


def escape_controls(text: str) -> str:
    """*text* with every non-printable character (newline, CR, ESC, U+2028, ...) and the
    backslash written as an escape, so one log record is always one line."""
    if text.isprintable() and "\\" not in text:
        return text
    out = []
    for c in text:
        if c.isprintable() and c != "\\":
            out.append(c)
        elif c in _ESCAPES:
            out.append(_ESCAPES[c])
        elif ord(c) < 0x100:
            out.append(f"\\x{ord(c):02x}")
        elif ord(c) < 0x10000:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(f"\\U{ord(c):08x}")
    return "".join(out)


class HookLog:
    """``debug/info/warning/error(message)``: syslog (facility daemon) plus ``log_file``."""

    def __init__(self, ident: str, log_file: os.PathLike[str] | str | None, level: int = LEVELS["info"],
                 name: str = "libvirt-mdev") -> None:
        self.ident, self.log_file, self.level, self.name = ident, log_file, level, name
        self._syslog = os.path.exists("/dev/log")

    def _emit(self, level: str, message: str) -> None:
        if LEVELS[level] < self.level:
            return
        text = escape_controls(message)
        if self._syslog:
            import syslog

            try:
                syslog.openlog(f"{self.ident}:", 0, syslog.LOG_DAEMON)
                syslog.syslog(_SYSLOG_PRIORITY[level], f"{level.upper()} {text}")
            except OSError:
                pass
        if self.log_file is not None:
            now = time.time()
            stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + f",{int(now * 1000) % 1000:03d}"
            line = f"{stamp} libvirt-mdev[{os.getpid()}] {level.upper()} {self.name}: {text}\n"
            try:
                fd = os.open(self.log_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
                try:
                    os.write(fd, line.encode("utf-8", "backslashreplace"))
                finally:
                    os.close(fd)
            except OSError:
                pass  # logging must never change the hook's decision

    def debug(self, message: str) -> None:
        self._emit("debug", message)

    def info(self, message: str) -> None:
        self._emit("info", message)

    def warning(self, message: str) -> None:
        self._emit("warning", message)

    def error(self, message: str) -> None:
        self._emit("error", message)
