"""One exception hierarchy for the whole package, and the one table of exit codes.

Every error a user can see is an :class:`MdevError`.  Each subclass names *who is at
fault* (the untrusted stream, the trusted store, the operator's configuration, the
hosts' mdev types...) and carries the process exit code that the CLI and the hook
return for it.  The table below is repeated in README.md ("Exit status"); keep them
in step.

====  =====================  ==========================================================
code  class                  meaning
====  =====================  ==========================================================
1     MdevError              any other refusal
2     UsageError             bad command line or option values
3     StreamError            the migration stream or save image is malformed or unsafe
4     StoreError             trusted store: permissions, integrity, tokens
5     ConnectError           libvirt (or a socket peer) could not be reached
6     TypeMismatch           source and destination mdev types differ
7     MdevMissing            an mdev the domain needs does not exist on this host
8     NotAnnotated           the domain carries no source-type annotation
9     ConfigError            the configuration file is unreadable or invalid
10    XMLError               domain / node-device XML is malformed
11    SignatureError         a device-state signature is missing or invalid
12    NotFound               a domain (or other named object) does not exist
13    GuardError             QEMU's incoming endpoint is reachable past the proxy
70    InternalError          a bug in libvirt-mdev (please report it)
====  =====================  ==========================================================

Anything that escapes as a different exception type is a bug; the CLI turns it into
exit code 70 with a one-line message (and a traceback only with ``--debug``).
"""
from __future__ import annotations

#: not ``typing.TYPE_CHECKING``: the hook imports this module on every call, and
#: ``typing`` (like ``re``) costs its quick paths milliseconds (issue 15, bench/bench_hook.py)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, ClassVar


class MdevError(Exception):
    """Base of every error libvirt-mdev reports to a user."""

    exit_code: ClassVar[int] = 1
    #: short machine-readable kind, used in ``--json`` error objects
    kind: ClassVar[str] = "error"

    def __init__(self, message: str, **details: Any) -> None:
        # Keep messages one line: they end up in virsh's error text and in syslog.
        self.message = " ".join(str(message).split())
        self.details = details
        super().__init__(self.message)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "exit_code": self.exit_code,
                               "message": self.message}
        out.update({k: v for k, v in self.details.items() if v is not None})
        return out


class AlreadyExists(MdevError):
    """The operator asked to create something that exists (a key pair, a hook file);
    the message names the option that replaces it.  A plain refusal (exit 1): nothing
    is wrong with the stream, the store or a signature."""

    kind = "exists"


class UsageError(MdevError):
    """The caller used an API or command wrongly (our side, not the stream's)."""

    exit_code = 2
    kind = "usage"


class StreamError(MdevError):
    """The migration stream (or save image) is malformed, truncated or unsafe.

    It always names the absolute byte offset where the problem was seen, and the
    section (idstr / instance id) when one was open.  The stream is untrusted input:
    any StreamError means "fail closed".
    """

    exit_code = 3
    kind = "stream"

    def __init__(self, message: str, offset: int | None = None,
                 section: str | None = None, **details: Any) -> None:
        self.offset = offset
        self.section = section
        text = message
        if section:
            text += f" (section {section})"
        if offset is not None:
            text += f" at byte {offset}"
        super().__init__(text, offset=offset, section=section, **details)


class UnsupportedStream(StreamError):
    """A well-formed stream using a feature we cannot filter safely (multifd device
    state, postcopy, mapped-ram, compressed save images...).  Refused, fail closed."""

    kind = "unsupported-stream"


class StoreError(MdevError):
    """The trusted store refused an operation (see the subclasses)."""

    exit_code = 4
    kind = "store"


class StoreAccessError(StoreError):
    """Wrong owner, mode, file type, symlink or path: the store cannot be trusted."""

    kind = "store-access"


class StoreIntegrityError(StoreError):
    """Bytes read back from the store do not match their manifest (tampering,
    truncation, a half-written file)."""

    kind = "store-integrity"


class TokenError(StoreError):
    """A load token is malformed, unknown, spent (replayed) or for another mdev."""

    kind = "token"


class ConnectError(MdevError):
    """libvirt or a network peer could not be reached."""

    exit_code = 5
    kind = "connect"


class TypeMismatch(MdevError):
    """Source and destination mdev types differ: state must not be loaded."""

    exit_code = 6
    kind = "type-mismatch"


class MdevMissing(MdevError):
    """The domain needs an mdev that does not exist on this host."""

    exit_code = 7
    kind = "mdev-missing"


class NotAnnotated(MdevError):
    """The domain has no libvirt-mdev metadata naming its source mdev types."""

    exit_code = 8
    kind = "not-annotated"


class ConfigError(MdevError):
    """The configuration file (or an option that overrides it) is invalid."""

    exit_code = 9
    kind = "config"


class XMLError(MdevError):
    """Domain or node-device XML could not be parsed or lacks a required part."""

    exit_code = 10
    kind = "xml"


class SignatureError(MdevError):
    """A device-state signature is missing, from an untrusted key, or invalid."""

    exit_code = 11
    kind = "signature"


class NotFound(MdevError):
    """A named object (domain, token, file) does not exist."""

    exit_code = 12
    kind = "not-found"


class GuardError(MdevError):
    """The guard that keeps the destination QEMU's incoming endpoint reachable only
    through the proxy is missing, or the endpoint is one it does not cover."""

    exit_code = 13
    kind = "guard"


class InternalError(MdevError):
    """Programming error inside libvirt-mdev; never raised for bad input."""

    exit_code = 70
    kind = "internal"

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(f"programming error: {message}", **details)


def exit_code_table() -> dict[int, str]:
    """code -> meaning, read from the table in this module's docstring (its one home;
    the man page generator and the tests read it from here)."""
    table: dict[int, str] = {}
    for line in (__doc__ or "").splitlines():
        words = line.split(None, 2)  # code, class, meaning
        if len(words) == 3 and words[0].isdigit() and not line[0].isspace():
            table[int(words[0])] = words[2].strip()
    return table


def exit_code_for(exc: BaseException) -> int:
    """The process exit code for *exc* (70 for anything that is not ours)."""
    if isinstance(exc, MdevError):
        return exc.exit_code
    return InternalError.exit_code


#: how every line libvirt-mdev writes about an error starts (the CLI's stderr, the hook's
#: refusal that virsh shows); :func:`one_line` is the one formatter
PREFIX = "libvirt-mdev: "


def describe(exc: BaseException) -> str:
    """*exc* as one line without :data:`PREFIX`: an :class:`MdevError`'s message, or
    anything else as an internal error naming its type (a bug: exit code 70)."""
    if isinstance(exc, MdevError):
        return exc.message
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"internal error ({type(exc).__name__}): {text}"


def describe_connection(exc: BaseException) -> str:
    """Why a proxy connection failed, as one line: a socket error by its text, anything
    else as :func:`describe` says it."""
    if isinstance(exc, OSError):
        return f"socket error: {exc.strerror or exc}"
    return describe(exc)


def one_line(exc: BaseException) -> str:
    """A one-line, human message for *exc*, prefixed the way our tools print errors."""
    return PREFIX + describe(exc)


def error_json(exc: BaseException) -> dict[str, Any]:
    """*exc* as the ``{"kind", "exit_code", "message", ...}`` object of ``--json`` output
    (anything not an :class:`MdevError` as :class:`InternalError`'s kind and code)."""
    if isinstance(exc, MdevError):
        return exc.to_json()
    return {"kind": InternalError.kind, "exit_code": InternalError.exit_code, "message": describe(exc)}
