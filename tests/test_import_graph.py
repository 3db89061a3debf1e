"""Import arrows point down: no cycle between the project's modules or its packages.

Every import counts, at module level or inside a function (a lazy import is still an arrow).
The layers, bottom up: ``harness`` (core, backends, drivers, reports, the public task API) <-
``models`` (the built-in models, tasks written with that API) <-
``launchers`` (launch lines, comparisons that launch runs) and ``bench``. The command-line
program (``harness.cli``, ``harness.__main__``) wires every layer together; nothing imports it,
so it cannot close a cycle, and it is left out of the package-level graph (and checked to be
imported by nobody).
"""

from __future__ import annotations

import ast
import collections
from pathlib import Path

from conftest import REPO

PACKAGES = ("harness", "launchers", "models", "bench")
ENTRY_POINTS = {"harness.cli", "harness.__main__", "launchers.__main__", "bench.__main__"}


def project_modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    """module -> project modules it imports (``from a.b import c`` counts a.b.c when that is a
    module, else a.b; importing a submodule does not count its package's __init__)."""
    mods = project_modules()
    graph: dict[str, set[str]] = collections.defaultdict(set)
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parts + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            else:
                continue
            for target in targets:
                while target and target not in mods:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
                    break
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_another_that_imports_it_back():
    graph = import_graph()
    assert cycles(graph) == []


def test_packages_import_downwards_only():
    graph = import_graph()
    packages: dict[str, set[str]] = collections.defaultdict(set)
    why: dict[tuple[str, str], str] = {}
    for a, targets in graph.items():
        if a in ENTRY_POINTS:
            continue
        for b in targets:
            pa, pb = a.split(".")[0], b.split(".")[0]
            if pa != pb:
                packages[pa].add(pb)
                why.setdefault((pa, pb), f"{a} -> {b}")
    loops = cycles(packages)
    assert loops == [], [why.get((x, y)) for loop in loops for x in loop for y in loop
                         if (x, y) in why]


def test_nothing_imports_the_command_line_program():
    graph = import_graph()
    for module, targets in graph.items():
        assert not (targets & ENTRY_POINTS) or module in ENTRY_POINTS, (module, targets)


def test_the_checker_sees_cycles():
    """The checks above can fail: a lazy import back is a cycle."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
