""".ci/lint, the lint step of .ci/test: run on a tiny tree of its own, it must pass a clean tree, fail on a ruff or
a mypy finding with the verdict line CI shows (docs/ci.md), and fail when a tool is missing instead of passing."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
VENV = Path(sys.executable).parent.parent
CLEAN = "from __future__ import annotations\n\n\ndef double(x: int) -> int:\n    return 2 * x\n"
CONFIG = """[tool.ruff]
line-length = 120
extend-exclude = ["venv"]

[tool.ruff.lint]
select = ["F"]

[tool.mypy]
strict = true
files = ["pkg"]
"""

pytestmark = pytest.mark.skipif(not (VENV / "bin" / "ruff").exists() or not (VENV / "bin" / "mypy").exists(),
                                reason="the lint extra (ruff, mypy) is not installed in this virtualenv")


def lint(tree: Path, venv: Path = VENV) -> tuple[int, str]:
    r = subprocess.run(["bash", str(tree / ".ci" / "lint")], cwd=tree, capture_output=True, text=True, timeout=300,
                       env={"PATH": "/usr/bin:/bin", "LM_VENV": str(venv), "MYPY_CACHE_DIR": str(tree / "cache")})
    lines = (r.stdout + r.stderr).strip().splitlines()
    log = (tree / "build" / "ci" / "lint.log").read_text().splitlines()
    assert lines and log and log[-1] == [ln for ln in lines if ln.startswith(".ci/lint: ")][-1]
    return r.returncode, log[-1]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    (tmp_path / ".ci").mkdir()
    shutil.copy(REPO / ".ci" / "lint", tmp_path / ".ci" / "lint")
    (tmp_path / "pyproject.toml").write_text(CONFIG)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text(CLEAN)
    return tmp_path


def test_clean_tree_passes(tree: Path) -> None:
    assert lint(tree) == (0, ".ci/lint: ruff and mypy clean")


def test_findings_of_both_tools_are_counted_in_one_verdict(tree: Path) -> None:
    (tree / "pkg" / "__init__.py").write_text(CLEAN + "import os\nimport sys\n")
    assert lint(tree) == (1, ".ci/lint: FAILED: ruff found 2 problems")  # F401 twice
    (tree / "pkg" / "__init__.py").write_text(CLEAN + "\n\ndef bad() -> int:\n    return 'x'\n")
    assert lint(tree) == (1, ".ci/lint: FAILED: mypy found 1 error")
    (tree / "pkg" / "__init__.py").write_text(CLEAN + "\n\ndef bad() -> int:\n    return 'x'\nimport os\n")
    assert lint(tree) == (1, ".ci/lint: FAILED: ruff found 1 problem; mypy found 1 error")


def test_missing_tools_fail(tree: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    empty = tmp_path_factory.mktemp("no-venv")
    assert lint(tree, empty) == (1, ".ci/lint: FAILED: ruff could not run (exit 127); mypy could not run (exit 127)")
