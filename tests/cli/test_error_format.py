"""One formatter for every error line (issue 16): the CLI's stderr line, its ``--json``
error object and the hook's refusal all come from :mod:`libvirt_mdev.errors`."""
from __future__ import annotations

import io

from libvirt_mdev.errors import PREFIX, ConfigError, InternalError, MdevError, describe, error_json, one_line
from libvirt_mdev.hook import Refusal, main


def test_an_mdev_error_is_its_message_on_one_line() -> None:
    exc = ConfigError("bad\nvalue  here")
    assert describe(exc) == "bad value here"
    assert one_line(exc) == f"{PREFIX}bad value here" == "libvirt-mdev: bad value here"
    assert error_json(exc) == {"kind": "config", "exit_code": 9, "message": "bad value here"}


def test_anything_else_is_an_internal_error_naming_its_type() -> None:
    exc = KeyError("k")
    assert describe(exc) == "internal error (KeyError): 'k'"
    assert describe(ValueError()) == "internal error (ValueError): ValueError"
    assert error_json(exc) == {"kind": InternalError.kind, "exit_code": InternalError.exit_code,
                               "message": "internal error (KeyError): 'k'"}
    assert (InternalError.kind, InternalError.exit_code) == ("internal", 70)


def test_the_hooks_refusal_is_an_mdev_error_and_its_line_uses_the_prefix() -> None:
    assert issubclass(Refusal, MdevError)
    err = io.StringIO()
    rc = main(["vm1", "migrate", "begin", "-"], io.BytesIO(b""), io.BytesIO(), err,
              config_path="/dev/null")
    assert rc == 1
    assert err.getvalue() == f"{PREFIX}incoming migration refused: domain vm1: libvirt passed no domain XML on stdin\n"
