"""Golden output of ``libvirt-mdev check``: text and ``--json``, against libvirt's test driver.

The hosts are the committed test-driver files in examples/hosts/ (``test://$REPO/examples/hosts/source.xml``
and ``dest.xml``, made by examples/hosts/generate.py), one domain per verdict.  The expected outputs are
tests/golden/data/check-*; tests/golden/golden.py says how to rewrite them.  tests/cli/golden/ holds the
not-annotated cases (tests/cli/test_place.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from .golden import REPO, check_golden, cli

HOSTS = REPO / "examples" / "hosts"
SRC = f"test://{HOSTS / 'source.xml'}"
DST = f"test://{HOSTS / 'dest.xml'}"

#: (golden file, domain, options, exit code)
CHECK_CASES = [
    ("check-match.txt", "demo-ok", (), 0),
    ("check-match.json", "demo-ok", ("--json",), 0),
    ("check-mismatch.txt", "demo", (), 6),
    ("check-mismatch.json", "demo", ("--json",), 6),
    ("check-missing-free.txt", "demo-missing", (), 7),
    ("check-missing-free.json", "demo-missing", ("--json",), 7),
    ("check-impossible.txt", "demo-impossible", (), 7),
    ("check-impossible.json", "demo-impossible", ("--json",), 7),
    ("check-no-domain.json", "no-such-domain", ("--json",), 12),
]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    conf = tmp_path / "libvirt-mdev.conf"
    conf.write_text("[libvirt-mdev]\nrequire_annotation = yes\n")
    return conf


@pytest.mark.parametrize("golden,domain,options,code", CHECK_CASES, ids=[c[0] for c in CHECK_CASES])
def test_check_output(tmp_path: Path, config: Path, golden: str, domain: str, options: tuple[str, ...],
                      code: int) -> None:
    r = cli("check", domain, "--connect", SRC, "--dest", DST, *options, home=tmp_path, config=config)
    assert r.code == code, r.stderr
    if "--json" in options:
        out = json.loads(r.stdout)
        assert (out["exit_code"] if "exit_code" in out else out["error"]["exit_code"]) == code
    check_golden(golden, r.stdout, tmp_path)
