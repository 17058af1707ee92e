"""Shared fixtures: a tiny random Llama (built once per session) and a workspace with the sample graph."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
sys.path.insert(0, str(TESTS))

SAMPLE_TTL = TESTS.parent / "sample_graphs" / "world.ttl"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from tiny_model import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture()
def sample_ws(tmp_path):
    """A workspace holding the sample graph with a seeded 10 % valid / 10 % test split."""
    from kalmkg.ingest import ingest, resolve_sources
    from kalmkg.split import split_store
    from kalmkg.store import Store
    from kalmkg.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    with Store.open(ws, create=True) as store:
        ingest(store, resolve_sources([SAMPLE_TTL]))
        split_store(store, 0.1, 0.1, seed=0)
    return ws


def make_tiny_run(root: Path, tiny_model: Path) -> Path:
    """A workspace at `root`: the sample graph, split, and a 2-step run `r` of the tiny model."""
    from kalmkg.ingest import ingest, resolve_sources
    from kalmkg.split import split_store
    from kalmkg.store import Store
    from kalmkg.train import TrainConfig, train
    from kalmkg.workspace import Workspace

    ws = Workspace(root)
    with Store.open(ws, create=True) as store:
        ingest(store, resolve_sources([SAMPLE_TTL]))
        split_store(store, 0.1, 0.1, seed=0)
    train(ws, TrainConfig(base=str(tiny_model), batch_size=8, max_steps=2, precision="fp32", eval_limit=10,
                          checkpoint_every=2, eval_every=2, patience=0), run_id="r")
    return root
