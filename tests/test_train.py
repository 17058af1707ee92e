"""KaLM training on the tiny model: learning, resume, distributed equivalence, run folder, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from kalmkg.errors import KalmkgError
from kalmkg.training.loop import TrainConfig, train


def tiny_config(tiny_model: Path, **overrides) -> TrainConfig:
    base = dict(base=str(tiny_model), batch_size=8, max_steps=6, lr=5e-3, warmup=0.0, precision="fp32",
                checkpoint_every=3, eval_every=3, eval_limit=20, log_every=1, patience=0, lm_examples=2,
                lm_weight=0.1, max_entity_tokens=24)
    base.update(overrides)
    return TrainConfig(**base)


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_loss_decreases_on_the_sample_graph(sample_ws, tiny_model):
    cfg = tiny_config(tiny_model, max_steps=80, batch_size=16, full=True, lr=3e-3, eval_every=80,
                      checkpoint_every=80, lm_weight=0.0, max_entity_tokens=8)
    result = train(sample_ws, cfg, run_id="learn")
    losses = [m["l_exp"] for m in metrics(result.run_dir) if "l_exp" in m]
    assert len(losses) == 80
    assert np.mean(losses[-20:]) < np.mean(losses[:20]) - 0.4


def test_run_folder_has_everything_to_reproduce_and_use_the_run(sample_ws, tiny_model):
    from kalmkg.runs import read_config
    from kalmkg.store import Store

    result = train(sample_ws, tiny_config(tiny_model), run_id="r1")
    files = {p.name for p in result.run_dir.iterdir()}
    assert {"config.toml", "adapter", "tokenizer", "metrics.jsonl", "training.png", "checkpoint"} <= files
    assert (result.run_dir / "adapter" / "adapter_config.json").exists()
    config = read_config(result.run_dir)
    assert config["train"]["batch_size"] == 8 and config["train"]["base"] == str(tiny_model)
    assert len(config["graph"]["fingerprint"]) == 16
    evals = [m for m in metrics(result.run_dir) if "valid" in m]
    assert [e["step"] for e in evals] == [3, 6]
    assert 0 < evals[-1]["valid"]["mrr"] <= 1
    with Store.open(sample_ws) as store:
        runs = store.runs()
    assert [(r["id"], r["status"], r["steps"]) for r in runs] == [("r1", "finished", 6)]
    assert not [p for p in result.run_dir.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_resume_continues_exactly_where_a_killed_run_stopped(sample_ws, tiny_model):
    import torch

    cfg = tiny_config(tiny_model, lora_dropout=0.1, self_negatives=True, prebatch=1, learn_temperature=True)
    straight = train(sample_ws, cfg, run_id="straight")
    killed = train(sample_ws, cfg, run_id="killed", stop_after=3)
    assert killed.steps == 3
    resumed = train(sample_ws, TrainConfig(), resume="killed")  # the saved config wins
    assert resumed.steps == 6

    a = torch.load(straight.run_dir / "checkpoint" / "state.pt", weights_only=False)
    b = torch.load(resumed.run_dir / "checkpoint" / "state.pt", weights_only=False)
    assert a["state"]["step"] == b["state"]["step"] == 6
    assert torch.equal(a["trainable"].pop("__temperature__")["log_inv_tau"],
                       b["trainable"].pop("__temperature__")["log_inv_tau"])
    assert a["trainable"].keys() == b["trainable"].keys()
    for name, value in a["trainable"].items():
        assert torch.equal(value, b["trainable"][name]), name
    steps_a = [(m["step"], m["loss"]) for m in metrics(straight.run_dir) if "loss" in m]
    steps_b = [(m["step"], m["loss"]) for m in metrics(resumed.run_dir) if "loss" in m]
    assert steps_a == steps_b


def test_dry_run_shows_config_and_first_batch_without_writing(sample_ws, tiny_model):
    seen = {}
    assert train(sample_ws, tiny_config(tiny_model), run_id="dry", dry_run=seen.update) is None
    assert seen["config"]["batch_size"] == 8
    first = seen["first_batch"][0]
    assert first["hr_view"].startswith("Complete the triple: [") and first["tail_view"].startswith("{ ")
    assert not (sample_ws.runs_dir / "dry").exists()


def test_errors_are_clear(tmp_path, sample_ws, tiny_model):
    from kalmkg.ingest import ingest, resolve_sources
    from kalmkg.store import Store
    from kalmkg.workspace import Workspace

    train(sample_ws, tiny_config(tiny_model, max_steps=1), run_id="taken")
    with pytest.raises(KalmkgError, match="already exists"):
        train(sample_ws, tiny_config(tiny_model, max_steps=1), run_id="taken")
    with pytest.raises(KalmkgError, match="smollm2-135m|accepted|--base"):
        train(sample_ws, tiny_config(tiny_model, base="no/such-model-here-xyz"), run_id="x")
    empty = Workspace(tmp_path / "empty")
    tsv = tmp_path / "t.tsv"
    tsv.write_text("a\tr\tb\n")
    with Store.open(empty, create=True) as store:
        ingest(store, resolve_sources([tsv], split="test"))
    with pytest.raises(KalmkgError, match="train split is empty"):
        train(empty, tiny_config(tiny_model), run_id="y")
    with pytest.raises(KalmkgError, match="batch-size"):
        train(sample_ws, tiny_config(tiny_model, batch_size=1), run_id="z")


DDP_WORKER = r"""
import json, os, sys
import numpy as np, torch
from pathlib import Path
from kalmkg.training.loop import TrainConfig, World, init_world, kalm_step, _Tokens, _average_gradients
from kalmkg.text import graph_texts
from kalmkg.training.data import tokenize_examples, with_inverses
from kalmkg.evaluation.metrics import known_answers
from kalmkg.models import LoraSettings, apply_lora, load_base, resolve_base
from kalmkg.training.objective import LearnableTemperature
from kalmkg.store import Store
from kalmkg.workspace import Workspace

ws, tiny, out = Workspace(Path(sys.argv[1])), sys.argv[2], Path(sys.argv[3])
world = init_world("cpu")
with Store.open(ws) as store:
    train = store.triples_array(("train",)); ents, rels = store.entity_table(), store.relation_table()
torch.manual_seed(0)
model, tok = load_base(resolve_base(tiny))
texts = graph_texts(ents, rels, tok, 24)
tokens = _Tokens(tokenize_examples(texts, with_inverses(train, texts.num_relations), tok))
model = apply_lora(model, LoraSettings(dropout=0.0))
torch.manual_seed(1)
with torch.no_grad():  # non-zero LoRA B so every LoRA weight gets a gradient
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.normal_(0, 0.5)
cfg = TrainConfig(batch_size=8, lm_examples=2, lm_weight=0.5, self_negatives=True)
temp = LearnableTemperature(0.05, True)
known = {k: frozenset(v) for k, v in known_answers(train, texts.num_relations).items()}
batch = tokens.examples[np.arange(8) * 7]
loss, terms, _ = kalm_step(model, tokens, batch, cfg, temp, known, world)
loss.backward()
_average_gradients(model, temp, world)
if world.size > 1:
    import torch.distributed as dist
    t = torch.tensor([loss.item()]); dist.all_reduce(t); mean_loss = t.item() / world.size
else:
    mean_loss = loss.item()
grads = {n: p.grad.tolist() for n, p in model.named_parameters() if p.requires_grad}
grads["tau"] = [p.grad.item() for p in temp.parameters()]
if world.rank == 0:
    out.write_text(json.dumps({"loss": mean_loss, "l_exp": terms["l_exp"], "grads": grads}))
"""


def test_two_process_gloo_training_step_equals_single_process(sample_ws, tiny_model, tmp_path):
    """Every process contrasts against the global batch (all-gather with gradients); the averaged
    loss and gradients equal the single-process ones on the same global batch."""
    worker = tmp_path / "worker.py"
    worker.write_text(DDP_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    single, double = tmp_path / "single.json", tmp_path / "double.json"
    subprocess.run([sys.executable, str(worker), str(sample_ws.root), str(tiny_model), str(single)],
                   check=True, env=env, capture_output=True)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", "29517", str(worker), str(sample_ws.root), str(tiny_model), str(double)],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = json.loads(single.read_text()), json.loads(double.read_text())
    assert a["l_exp"] == pytest.approx(b["l_exp"], abs=1e-5)
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    assert a["grads"].keys() == b["grads"].keys()
    for name in a["grads"]:
        np.testing.assert_allclose(np.array(a["grads"][name]), np.array(b["grads"][name]), atol=1e-5, rtol=1e-4,
                                   err_msg=name)


def test_torchrun_trains_a_run_with_two_processes(sample_ws, tiny_model):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29518",
         "-m", "kalmkg", "-w", str(sample_ws.root), "train", "--base", str(tiny_model), "--max-steps", "4",
         "--batch-size", "8", "--eval-every", "2", "--eval-limit", "10", "--patience", "1", "--run-name", "ddp",
         "--precision", "fp32"],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = sample_ws.runs_dir / "ddp"
    assert (run / "adapter" / "adapter_config.json").exists()
    from kalmkg.runs import read_config

    assert read_config(run)["environment"]["world_size"] == 2


@pytest.mark.slow
def test_a_few_steps_on_the_embedded_model(sample_ws):
    cfg = TrainConfig(max_steps=3, batch_size=4, lm_examples=1, max_entity_tokens=12, eval_limit=5, eval_every=3,
                      lora_layers=2, checkpoint_every=3)
    result = train(sample_ws, cfg, run_id="smol")
    assert result.steps == 3
    losses = [m["loss"] for m in metrics(result.run_dir) if "loss" in m]
    assert losses and all(np.isfinite(losses))
    assert (result.run_dir / "adapter" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("overrides, message", [
    ({"temperature": 2.0}, r"--temperature must be in \[0.001, 1\]"),
    ({"temperature": 0.0}, r"--temperature must be in \[0.001, 1\]"),
    ({"max_seq_len": 4}, r"--max-seq-len 4 is too small: a head-relation view has \d+ tokens"),
])
def test_bad_settings_are_one_clear_error_not_a_traceback(sample_ws, tiny_model, overrides, message):
    with pytest.raises(KalmkgError, match=message):
        train(sample_ws, tiny_config(tiny_model, **overrides), run_id="bad")
    assert not (sample_ws.runs_dir / "bad" / "adapter").exists()
