"""kalmkg: make a language model know a knowledge graph.

The public API, the same functions the command line calls::

    import kalmkg

    ws = kalmkg.Workspace.resolve("./.kalmkg")
    with kalmkg.Store.edit(ws, create=True) as store:  # readers see the old graph until it ends
        kalmkg.ingest(store, kalmkg.resolve_sources(["graph.ttl"]))
        kalmkg.split_store(store, 0.1, 0.1, seed=0)
    result = kalmkg.train(ws, kalmkg.TrainConfig(max_steps=40, lr=1e-3))
    kalmkg.embed(ws, kalmkg.load_model(ws, run=result.run_id))  # the entity index predict searches
    print(kalmkg.predict(ws, "Paris", "capital_of", "?", k=5).candidates)

Names resolve on first use (PEP 562), so `import kalmkg` and `kalmkg --help` load neither torch nor the
store's libraries.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# name -> the module that defines it
_EXPORTS = {
    "KalmkgError": "kalmkg.errors",
    "Workspace": "kalmkg.workspace",
    "Store": "kalmkg.store",
    "resolve_sources": "kalmkg.ingestion",
    "ingest": "kalmkg.ingestion",
    "split_store": "kalmkg.split",
    "TrainConfig": "kalmkg.training.config",
    "train": "kalmkg.training.loop",
    "load_model": "kalmkg.loaded",
    "embed": "kalmkg.index",
    "EntityIndex": "kalmkg.index",
    "Predictor": "kalmkg.prediction",
    "predict": "kalmkg.prediction",
    "evaluate_run": "kalmkg.evaluation.link_prediction",
    "export_run": "kalmkg.export.pipeline",
    "AskConfig": "kalmkg.qa.ask",
    "Asker": "kalmkg.qa.ask",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kalmkg' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # resolved once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
