"""The store's and mdev's module structure (issue 16): small modules, no import cycles.

Read from the source with :mod:`ast`, so a cycle hidden behind ``TYPE_CHECKING`` or a
function-level import counts too (store.store <-> store.gc was one).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "libvirt_mdev"
MAX_LINES = 400


def _modules(sub: str) -> dict[str, Path]:
    return {p.stem: p for p in sorted((PKG / sub).glob("*.py")) if p.stem != "__init__"}


def _sibling_imports(path: Path, siblings: set[str]) -> set[str]:
    """Sibling modules *path* imports (``from .x import``, ``from . import x``), anywhere in the file."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out.update(a.name for a in node.names)
    return out & siblings


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of *graph*, or None."""
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> list[str] | None:
        state[n] = 1
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                return [*path[path.index(d):], d]
            if d not in state:
                found = visit(d, [*path, d])
                if found:
                    return found
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n, [n])
            if found:
                return found
    return None


@pytest.mark.parametrize("sub", ["store", "mdev"])
def test_no_import_cycle_inside_the_package(sub: str) -> None:
    mods = _modules(sub)
    graph = {name: _sibling_imports(path, set(mods)) - {name} for name, path in mods.items()}
    assert _cycle(graph) is None, f"import cycle in libvirt_mdev/{sub}: {' -> '.join(_cycle(graph) or [])}"
    if sub == "store":
        assert "store" not in graph["gc"], "gc must reach the store through its protocol, not import it"


def test_the_cycle_finder_finds_one() -> None:
    """The check above can fail: a two-module cycle is reported."""
    assert _cycle({"store": {"gc"}, "gc": {"store"}, "acl": set()}) in (["gc", "store", "gc"],
                                                                         ["store", "gc", "store"])
    assert _cycle({"store": {"gc", "acl"}, "gc": {"acl"}, "acl": set()}) is None


@pytest.mark.parametrize("sub", ["store", "mdev"])
def test_modules_stay_small(sub: str) -> None:
    big = {name: n for name, p in _modules(sub).items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"libvirt_mdev/{sub} modules over {MAX_LINES} lines (split them by concern): {big}"
