"""The package's layering: no import cycles among kalmkg's modules, counting imports inside functions
(where most of them sit, to keep start-up fast) as well as those at the top."""

from __future__ import annotations

import ast
from pathlib import Path

import kalmkg

PACKAGE = Path(kalmkg.__file__).resolve().parent


def import_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            deps.update(n for n in names if n.startswith("kalmkg"))
        graph[module] = deps
    # `from kalmkg.x import y` names a module only when y is one; `from kalmkg import x` the same
    return {m: {d for d in deps if d in graph and d != m and d != "kalmkg"} for m, deps in graph.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_cycle_check_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_training_sees_ranking_not_evaluation():
    graph = import_graph()
    assert "kalmkg.evaluation.ranking" in graph["kalmkg.training.loop"]
    assert "kalmkg.evaluation.link_prediction" not in graph["kalmkg.training.loop"]
    assert graph["kalmkg.evaluation.ranking"] <= {"kalmkg.evaluation.metrics", "kalmkg.text", "kalmkg.encode"}
