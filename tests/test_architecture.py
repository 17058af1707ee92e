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
    assert graph["kalmkg.evaluation.ranking"] <= {"kalmkg.evaluation.metrics", "kalmkg.text", "kalmkg.encode", "kalmkg.npy"}


# Layers, lowest first: a module imports modules of its own layer or below, never above. Each module is
# placed by its longest matching prefix; a new module without a place fails the test until it gets one.
LAYERS = [
    # foundation: no knowledge of graphs or models
    ["kalmkg.errors", "kalmkg.workspace", "kalmkg.files", "kalmkg.npy", "kalmkg.cache", "kalmkg.formatting", "kalmkg.system", "kalmkg.device",
     "kalmkg.text", "kalmkg.prompts", "kalmkg.llamacpp.environment", "kalmkg.llamacpp.build"],
    # storage, configuration and the raw model: the graph store, runs on disk, base models, llama.cpp
    ["kalmkg.store", "kalmkg.split", "kalmkg.names", "kalmkg.ingestion", "kalmkg.dump", "kalmkg.runs", "kalmkg.models",
     "kalmkg.llamacpp", "kalmkg.training.config", "kalmkg.evaluation.metrics"],
    # model-free pieces the stages share: encoders, training data and losses, ranking, export files
    ["kalmkg.encode", "kalmkg.training.data", "kalmkg.training.permutation", "kalmkg.training.objective", "kalmkg.evaluation.ranking",
     "kalmkg.evaluation.calibration", "kalmkg.training.questions", "kalmkg.training.reading", "kalmkg.structure",
     "kalmkg.export.registry", "kalmkg.export.gguf_meta"],
    # a run's model and its entity index
    ["kalmkg.loaded", "kalmkg.index"],
    # the stages a user runs
    ["kalmkg.training", "kalmkg.evaluation", "kalmkg.export", "kalmkg.prediction", "kalmkg.qa", "kalmkg.doctor",
     "kalmkg.llamacpp.selftest"],
    # the stages behind HTTP
    ["kalmkg.serve"],
    # the public API, then the command line on top of it
    ["kalmkg"],
    ["kalmkg.cli", "kalmkg.__main__"],
]


def layer_of(module: str) -> int | None:
    best, layer = -1, None
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, layer = len(p), i
    return layer


def test_every_module_has_a_layer():
    assert [m for m in import_graph() if layer_of(m) is None] == []


def test_imports_go_down_the_layers():
    graph = import_graph()
    upward = sorted(f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
                    for m, deps in graph.items() for d in deps if layer_of(d) > layer_of(m))
    assert upward == []


def test_the_layer_check_sees_an_upward_import():
    assert layer_of("kalmkg.cli.app") > layer_of("kalmkg.training.loop") > layer_of("kalmkg.training.config")
    assert layer_of("kalmkg.export.ollama") == layer_of("kalmkg.qa.ask")
