"""Log lines cannot be forged (issue 12): a domain name with an encoded newline (legal in
libvirt XML as ``&#10;``) must not start a second line in ``log_file``."""
from __future__ import annotations

import logging

from libvirt_mdev.log import SafeFormatter, escape_controls

from .conftest import DOM_UUID, HookEnv

FORGED = "2026-12-02 10:00:00,000 libvirt-mdev[1] INFO libvirt-mdev: migrate begin domain=vm1: allowed: 1 mdev(s) match"


def test_escape_controls() -> None:
    assert escape_controls("plain text") == "plain text"
    assert escape_controls("a\nb\rc\td\x1b[1m\u2028\x85\\") == "a\\nb\\rc\\td\\x1b[1m\\u2028\\x85\\\\"


def test_formatter_keeps_one_record_on_one_line() -> None:
    rec = logging.LogRecord("x", logging.INFO, __file__, 1, "name=%s", ("vm\n" + FORGED,), None)
    out = SafeFormatter("%(levelname)s %(message)s").format(rec)
    assert "\n" not in out and out.startswith("INFO name=vm\\n2026")


def test_domain_name_with_encoded_newline_cannot_forge_a_log_line(hook_env: HookEnv) -> None:
    name_xml = "vm1&#10;" + FORGED.replace("'", "&apos;")
    xml = (f"<domain type='kvm'><name>{name_xml}</name><uuid>{DOM_UUID}</uuid>"
           f"<memory unit='KiB'>262144</memory><devices></devices></domain>").encode()
    hook_env.write_config(log_level="debug")
    for op, sub in (("restore", "begin"), ("migrate", "begin"), ("prepare", "begin"), ("release", "end")):
        hook_env.call(op, sub, xml, domain="vm1\n" + FORGED)
    lines = hook_env.log_lines()
    assert len(lines) >= 4
    for line in lines:
        assert " libvirt-mdev[" in line.split(" INFO ")[0].split(" DEBUG ")[0].split(" WARNING ")[0]
        assert not line.startswith("2026-12-02 10:00:00")  # no record starts with the forged text
    assert any("domain=vm1\\n2026-12-02 10:00:00" in line for line in lines)
