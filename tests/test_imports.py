"""The library's imports flow one way: every module imports, and no chain of imports leads back to its start.

Function-level imports count too: a lazy import that closes a cycle is still a cycle, only hidden.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import cxrlib

PACKAGE = Path(cxrlib.__file__).parent
MODULES = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__")


def imported_modules(path: Path) -> set[str]:
    """The cxrlib modules `path` imports, anywhere in the file (`from . import x`, `from .x import y`, `cxrlib.x`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level == 1 or base.split(".")[0] == "cxrlib":
                base = base.removeprefix("cxrlib").lstrip(".")
                found |= {base.split(".")[0]} if base else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("cxrlib.")}
    return found & set(MODULES)


def import_graph() -> dict[str, set[str]]:
    return {m: imported_modules(PACKAGE / f"{m}.py") - {m} for m in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_lazy_imports():
    graph = import_graph()
    assert "chestxray14" in graph["synthetic"] and "train" in graph["runs"]  # module level / inside a function


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("name", [m for m in MODULES if m != "__main__"])  # __main__ runs the CLI
def test_every_module_imports(name):
    importlib.import_module(f"cxrlib.{name}")
