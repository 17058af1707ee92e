"""KaLM training on the tiny model: learning, resume, distributed equivalence, run folder, errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
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
    assert np.mean(losses[-20:]) < np.mean(losses[:20]) - 0.25  # drops of 0.34-0.57 over seeds 0-6


def test_a_bf16_run_loads_its_frozen_base_in_bf16_and_trains_fp32_adapters(sample_ws, tiny_model, monkeypatch):
    """The frozen weights of a bf16 run are read from the files in bf16 (no float32 copy of a 7B base on
    the host first); LoRA's weights, which the optimizer steps, stay float32."""
    import torch
    from safetensors.torch import load_file

    import kalmkg.training.loop as loop

    loaded_as = []

    def spy(resolved, *, dtype=None, device="cpu", quantize="none"):
        model, tokenizer = load_base(resolved, dtype=dtype, device=device, quantize=quantize)
        loaded_as.append(next(model.parameters()).dtype)
        return model, tokenizer

    load_base = loop.load_base
    monkeypatch.setattr(loop, "load_base", spy)
    result = train(sample_ws, tiny_config(tiny_model, precision="bf16", max_steps=12, eval_every=12,
                                          checkpoint_every=12), run_id="bf16")
    assert loaded_as == [torch.bfloat16]
    saved = load_file(result.run_dir / "adapter" / "adapter_model.safetensors")
    assert saved and {t.dtype for t in saved.values()} == {torch.float32}
    assert all(t.abs().max() > 0 for n, t in saved.items() if "lora_B" in n)  # stepped from LoRA's zero start
    assert all(np.isfinite(m["loss"]) for m in metrics(result.run_dir) if "loss" in m)


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
        runs = store.con.execute("SELECT id, status, steps FROM runs ORDER BY created_at").fetchall()
    assert runs == [("r1", "finished", 6)]
    assert not [p for p in result.run_dir.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_resume_continues_exactly_where_a_killed_run_stopped(sample_ws, tiny_model):
    import torch

    cfg = tiny_config(tiny_model, lora_dropout=0.1, self_negatives=True, prebatch=1, learn_temperature=True,
                      question_weight=0.5, question_examples=3)
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
    steps_a = [(m["step"], m["loss"], m["l_qa"]) for m in metrics(straight.run_dir) if "loss" in m]
    steps_b = [(m["step"], m["loss"], m["l_qa"]) for m in metrics(resumed.run_dir) if "loss" in m]
    assert steps_a == steps_b and all(qa > 0 for _, _, qa in steps_a)


class _MinutePerStep:
    """The training loop's clock, moved on a minute by every step the progress hears of."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now

    def hook(self, progress_cls):
        clock = self

        class Progress(progress_cls):
            def step(self, state, terms, triples_per_s):
                clock.now += 60.0

        return Progress()


def test_max_minutes_ends_the_run_validated_and_counts_the_time_of_resumed_processes(sample_ws, tiny_model,
                                                                                     monkeypatch):
    import types

    import torch

    from kalmkg.training import loop

    clock = _MinutePerStep()
    monkeypatch.setattr(loop, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    cfg = tiny_config(tiny_model, max_steps=20, eval_every=100, checkpoint_every=100, max_minutes=2.5)
    timed = train(sample_ws, cfg, run_id="timed", progress=clock.hook(loop.TrainProgress))
    # steps end at 0, 1, 2, 3 minutes: the fourth passes 2.5 and is the run's last, validated and kept
    assert (timed.steps, timed.out_of_time, timed.stopped_early) == (4, True, False)
    assert [m["step"] for m in metrics(timed.run_dir) if "valid" in m] == [4]
    assert (timed.run_dir / "adapter").is_dir()
    saved = torch.load(timed.run_dir / "checkpoint" / "state.pt", weights_only=False)["state"]
    assert saved["step"] == 4 and saved["seconds"] == 240.0  # the clock after the fourth step's minute

    # killed after 2 steps (1 minute on the clock at its last checkpoint), resumed: it stops at 2.5 minutes
    # of the two processes together, not 2.5 minutes of the second
    killed = train(sample_ws, replace(cfg, checkpoint_every=1), run_id="split", stop_after=2,
                   progress=clock.hook(loop.TrainProgress))
    assert not killed.out_of_time
    resumed = train(sample_ws, TrainConfig(), resume="split", progress=clock.hook(loop.TrainProgress))
    assert (resumed.steps, resumed.out_of_time) == (5, True)

    with pytest.raises(KalmkgError, match="--max-minutes must be 0"):
        tiny_config(tiny_model, max_minutes=-1)


def test_a_graph_changed_while_a_run_trains_is_said_and_recorded(sample_ws, tiny_model, tmp_path):
    from kalmkg.ingestion import ingest, resolve_sources
    from kalmkg.store import Store
    from kalmkg.training import loop

    extra = tmp_path / "extra.tsv"
    extra.write_text("newcomer\tknows\tParis\n")
    said = []

    class IngestMidway(loop.TrainProgress):
        def step(self, state, terms, triples_per_s):
            if state.step == 2:  # as a process that takes no writer lock would
                with Store.open(sample_ws, write=True) as store:
                    ingest(store, resolve_sources([extra]))

        def message(self, text):
            said.append(text)

    run = train(sample_ws, tiny_config(tiny_model, max_steps=4), run_id="moved", progress=IngestMidway())
    events = [m for m in metrics(run.run_dir) if m.get("event") == "graph_changed"]
    assert len(events) == 1 and events[0]["trained_on"] != events[0]["store_now"]
    assert any("the graph changed while this run trained" in line for line in said)
    quiet = train(sample_ws, tiny_config(tiny_model, max_steps=2), run_id="still")
    assert not [m for m in metrics(quiet.run_dir) if m.get("event")]


def test_keeping_the_frozen_layers_outputs_trains_the_same_run(sample_ws, tiny_model, monkeypatch):
    """With only the top layer adapted, the bottom layer's outputs are kept and reused from step to
    step (dropout on): the losses and the trained weights are those of running the whole model."""
    import torch

    from kalmkg.training.prefix import FrozenPrefix

    seen = []
    hidden = FrozenPrefix.hidden

    def spy(self, *args, **kwargs):
        out = hidden(self, *args, **kwargs)
        seen.append(self.stats())
        return out

    monkeypatch.setattr(FrozenPrefix, "hidden", spy)
    kept = train(sample_ws, tiny_config(tiny_model, lora_layers=1, lora_dropout=0.1), run_id="kept")
    calls_in_kept = len(seen)
    whole = train(sample_ws, tiny_config(tiny_model, lora_layers=1, lora_dropout=0.1, frozen_cache_mb=0),
                  run_id="whole")
    assert calls_in_kept == len(seen) > 0 and seen[-1]["hits"] > 0 and not seen[-1]["off"]  # only the first used it
    losses = [[m["loss"] for m in metrics(r.run_dir) if "loss" in m] for r in (kept, whole)]
    assert len(losses[0]) == 6 and losses[0] == pytest.approx(losses[1], rel=1e-4)
    a = torch.load(kept.run_dir / "checkpoint" / "state.pt", weights_only=False)["trainable"]
    b = torch.load(whole.run_dir / "checkpoint" / "state.pt", weights_only=False)["trainable"]
    a.pop("__temperature__"), b.pop("__temperature__")
    assert a.keys() == b.keys() and all(".layers.1." in name for name in a)
    for name, value in a.items():
        torch.testing.assert_close(value, b[name], rtol=1e-3, atol=1e-5, msg=name)


def test_dry_run_shows_config_and_first_batch_without_writing(sample_ws, tiny_model):
    seen = {}
    assert train(sample_ws, tiny_config(tiny_model), run_id="dry", dry_run=seen.update) is None
    assert seen["config"]["batch_size"] == 8
    first = seen["first_batch"][0]
    assert first["hr_view"].startswith("Complete the triple: [") and first["tail_view"].startswith("{ ")
    assert seen["questions"] is None  # no question-answer loss by default
    assert not (sample_ws.runs_dir / "dry").exists()
    train(sample_ws, tiny_config(tiny_model, question_weight=1.0), run_id="dry", dry_run=seen.update)
    assert seen["questions"]["queries"] > 100 and len(seen["questions"]["first_batch"]) == 8
    assert all(q.endswith("?") and a.endswith(".") for q, a in seen["questions"]["first_batch"])
    assert seen["reading"] is None
    train(sample_ws, tiny_config(tiny_model, reading_weight=1.0, reading_examples=4), run_id="dry",
          dry_run=seen.update)
    assert len(seen["reading"]) == 4 and all(t["prompt"].startswith("Facts:\n[1] ") for t in seen["reading"])
    assert all(re.search(r"\[\d\]\.$", t["reply"]) for t in seen["reading"])


def test_errors_are_clear(tmp_path, sample_ws, tiny_model):
    from kalmkg.ingestion import ingest, resolve_sources
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
from kalmkg.training.loop import TrainConfig
from kalmkg.training.distributed import init_world, replicate
from kalmkg.training.step import KaLMStep, StepContext
from kalmkg.text import graph_texts
from kalmkg.training.data import tokenize_examples, with_inverses
from kalmkg.evaluation.metrics import known_answers
from kalmkg.models import apply_lora, load_base, resolve_base
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
tokens = tokenize_examples(texts, with_inverses(train, texts.num_relations), tok)
model = apply_lora(model, TrainConfig(lora_dropout=0.0))
torch.manual_seed(1)
with torch.no_grad():  # non-zero LoRA B so every LoRA weight gets a gradient
    for n, p in model.named_parameters():
        if "lora_B" in n:
            p.normal_(0, 0.5)
cfg = TrainConfig(batch_size=8, lm_examples=2, lm_weight=0.5, self_negatives=True, question_weight=0.7,
                  question_view_weight=0.6, reading_weight=0.4, base_kl_weight=0.3)
temp = LearnableTemperature(0.05, True)
known = {k: frozenset(v) for k, v in known_answers(train, texts.num_relations).items()}
batch = tokens.examples[np.arange(8) * 7]
from kalmkg.prompts import no_context_messages
from kalmkg.training.data import chat_example
asked = [chat_example(tok, no_context_messages(q), a) for q, a in
         (("What is the capital of France?", "Paris."), ("Who founded Apple?", "Steve Jobs and Steve Wozniak."))]
chats = {"l_qa": asked, "l_read": asked[::-1]}
views = np.stack([tokens.examples[0], batch[3]])  # the questions' (entity, relation, answer)
stepper = replicate(KaLMStep(StepContext(model, temp, tokens, known, cfg, world)), world, "cpu")
assert (type(stepper).__name__ == "DistributedDataParallel") == (world.size > 1)
loss, terms, _ = stepper(batch, chats=chats, question_views=views)
loss.backward()  # the replicas average the gradients here
if world.size > 1:
    import torch.distributed as dist
    t = torch.tensor([loss.item()]); dist.all_reduce(t); mean_loss = t.item() / world.size
else:
    mean_loss = loss.item()
grads = {n: p.grad.tolist() for n, p in model.named_parameters() if p.requires_grad}
grads["tau"] = [p.grad.item() for p in temp.parameters()]
if world.rank == 0:
    out.write_text(json.dumps({"loss": mean_loss, "l_exp": terms["l_exp"], "l_qv": terms["l_qv"], "grads": grads}))
"""


def test_each_cuda_process_takes_its_local_gpu_before_the_group_starts(monkeypatch):
    import torch
    import torch.distributed as dist

    from kalmkg.training.distributed import World, init_world

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "set_device", lambda i: calls.append(("set_device", i)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend: calls.append(("init", backend)))
    monkeypatch.setattr(dist, "get_rank", lambda: 3)
    monkeypatch.setattr(dist, "get_world_size", lambda: 4)
    assert init_world("cuda") == World(3, 4, "cuda")
    assert calls == [("set_device", 3), ("init", "nccl")]
    calls.clear()
    init_world("cpu")
    assert calls == [("init", "gloo")]


def one_and_two_processes(script: str, sample_ws, tiny_model, tmp_path, port: int) -> tuple[dict, dict]:
    """What a worker script writes (its last argument: a JSON file) run as one process, and as two under
    torchrun with gloo (the main process writes)."""
    worker = tmp_path / "worker.py"
    worker.write_text(script)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    single, double = tmp_path / "single.json", tmp_path / "double.json"
    subprocess.run([sys.executable, str(worker), str(sample_ws.root), str(tiny_model), str(single)],
                   check=True, env=env, capture_output=True)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--master-port", str(port), str(worker), str(sample_ws.root), str(tiny_model), str(double)],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(single.read_text()), json.loads(double.read_text())


def test_two_process_gloo_training_step_equals_single_process(sample_ws, tiny_model, tmp_path):
    """Every process contrasts against the global batch (all-gather with gradients); the averaged
    loss and gradients equal the single-process ones on the same global batch, the chat terms and the
    question views included."""
    a, b = one_and_two_processes(DDP_WORKER, sample_ws, tiny_model, tmp_path, port=29517)
    assert a["l_exp"] == pytest.approx(b["l_exp"], abs=1e-5)
    assert a["l_qv"] == pytest.approx(b["l_qv"], abs=1e-5)  # question views contrast the global batch too
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-5)
    assert a["grads"].keys() == b["grads"].keys()
    for name in a["grads"]:
        np.testing.assert_allclose(np.array(a["grads"][name]), np.array(b["grads"][name]), atol=1e-5, rtol=1e-4,
                                   err_msg=name)


SHARD_WORKER = r"""
import json, sys
from pathlib import Path
import numpy as np
from kalmkg.evaluation.ranking import rank_queries
from kalmkg.models import load_base, resolve_base
from kalmkg.store import Store
from kalmkg.text import graph_texts
from kalmkg.training.distributed import init_world, shard
from kalmkg.workspace import Workspace

ws, tiny, out = Workspace(Path(sys.argv[1])), sys.argv[2], Path(sys.argv[3])
world = init_world("cpu")
with Store.open(ws) as store:
    every = store.triples_array(); ents, rels = store.entity_table(), store.relation_table()
model, tok = load_base(resolve_base(tiny))
texts = graph_texts(ents, rels, tok, 24)
got = rank_queries(model, tok, texts, every[:12], every, shard=shard(len(texts.entities), world))
if world.rank == 0:
    out.write_text(json.dumps({"ranks": got["ranks"].tolist(), "mrr": got["both"]["mrr"]}))
"""


def test_validation_shares_the_entities_between_processes_and_ranks_as_one(sample_ws, tiny_model, tmp_path):
    """Each process encodes its share of the entities; joined, every process ranks with all of them,
    and the ranks are one process's."""
    a, b = one_and_two_processes(SHARD_WORKER, sample_ws, tiny_model, tmp_path, port=29519)
    assert len(a["ranks"]) == len(b["ranks"]) == 24
    assert a["ranks"] == b["ranks"] and a["mrr"] == pytest.approx(b["mrr"], abs=1e-9)


def test_shares_cover_the_rows_once():
    from kalmkg.training.distributed import World, shard

    assert shard(10, World()) is None
    slices = [shard(10, World(rank=r, size=3))[0] for r in range(3)]
    assert [list(range(10))[s] for s in slices] == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    with pytest.raises(ValueError, match="2 rows cannot be shared by 3 processes"):
        shard(2, World(rank=0, size=3))


def test_a_collective_refuses_a_tensor_off_the_training_device():
    """NCCL moves only CUDA tensors; the CPU tests run gloo, which would take a CPU tensor in a CUDA run
    silently: the check makes that mistake fail here."""
    import torch

    from kalmkg.training.distributed import World, check_device, gather

    cuda_run = World(rank=0, size=2, device_type="cuda")
    with pytest.raises(RuntimeError, match="gather: a cpu tensor in a collective of a cuda run"):
        gather(torch.ones(2, 3), cuda_run)
    check_device(torch.ones(1), World(rank=0, size=2), "agree")  # a CPU run's CPU tensor is fine


def test_torchrun_trains_a_run_with_two_processes(sample_ws, tiny_model):
    """Through the CLI: replicas, accumulated batches (no_sync), validation and early stopping on every
    process, and the time limit's agreement."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", "29518",
         "-m", "kalmkg", "-w", str(sample_ws.root), "train", "--base", str(tiny_model), "--max-steps", "4",
         "--batch-size", "8", "--grad-accum", "2", "--eval-every", "2", "--eval-limit", "10", "--patience", "1",
         "--max-minutes", "30", "--run-name", "ddp", "--precision", "fp32"],
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
    ({"max_seq_len": 4}, r"--max-seq-len 4 is too small: a head-relation view can have \d+ tokens"),
    ({"batch_size": 16, "grad_accum": 1000}, r"--batch-size 16 x --grad-accum 1000 is larger than the \d+ training"),
])
def test_bad_settings_are_one_clear_error_not_a_traceback(sample_ws, tiny_model, overrides, message):
    with pytest.raises(KalmkgError, match=message):
        train(sample_ws, tiny_config(tiny_model, **overrides), run_id="bad")
    assert not (sample_ws.runs_dir / "bad" / "adapter").exists()


# ------------------------------------------------------------------ the fast step against a plain computation
def tiny_lora(sample_ws, tiny_model, cfg: TrainConfig):
    """The tiny model with LoRA adapters that matter (B non-zero), the run's token ids, the known answers."""
    import torch

    from kalmkg.evaluation.metrics import known_answers
    from kalmkg.models import apply_lora, load_base, resolve_base
    from kalmkg.store import Store
    from kalmkg.text import graph_texts
    from kalmkg.training.data import tokenize_examples, with_inverses

    with Store.open(sample_ws) as store:
        triples = store.triples_array(("train",))
        entities, relations = store.entity_table(), store.relation_table()
    model, tokenizer = load_base(resolve_base(str(tiny_model)))
    texts = graph_texts(entities, relations, tokenizer, cfg.max_entity_tokens)
    tokens = tokenize_examples(texts, with_inverses(triples, texts.num_relations), tokenizer, cfg.max_seq_len)
    torch.manual_seed(0)
    model = apply_lora(model, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    known = {k: frozenset(v) for k, v in known_answers(triples, texts.num_relations).items()}
    return model, tokens, known


def batch_for_the_step(tokens, cfg: TrainConfig) -> np.ndarray:
    """A global batch that exercises the fast step: LM examples whose targets differ in length, and
    among the other examples two that share their answer and two that share their query (rows the
    fast step encodes once)."""
    from kalmkg.training.data import lm_positions

    ex = tokens.examples
    by_answer, by_query, by_target_length = {}, {}, {}
    for i, (q, r, a) in enumerate(ex.tolist()):
        by_answer.setdefault(a, []).append(i)
        by_query.setdefault((q, r), []).append(i)
        by_target_length.setdefault(len(tokens.target_ids[a]), i)
    lengths = sorted(by_target_length)  # the shortest and the longest targets, then others
    lm = [by_target_length[n] for n in (lengths[:1] + lengths[-1:] + lengths[1:-1])[: cfg.lm_examples]]
    same_answer = next(v[:2] for v in by_answer.values() if len(v) >= 2 and not set(v[:2]) & set(lm))
    same_query = next(v[:2] for v in by_query.values() if len(v) >= 2 and not set(v[:2]) & set(lm + same_answer))
    others = iter(same_answer + same_query + [i for i in range(0, len(ex), 5)
                                              if i not in lm + same_answer + same_query])
    lm_at = lm_positions(cfg.batch_size, cfg.lm_examples).tolist()
    assert len(lm) == len(lm_at) == cfg.lm_examples
    return ex[[lm[lm_at.index(p)] if p in lm_at else next(others) for p in range(cfg.batch_size)]]


def plain_base_kl(model, pairs):
    """L_kl the obvious way: each whole chat row through the model with and without its adapters, the
    summed KL(base || run) of the reply positions' distributions over their count, mean over rows."""
    import torch

    def reply_logits(prompt, reply):
        logits = model(input_ids=torch.tensor([prompt + reply])).logits[0]
        return logits[len(prompt) - 1: len(prompt) + len(reply) - 1].float()

    per_row = []
    for prompt, reply in pairs:
        with torch.no_grad(), model.disable_adapter():
            base = reply_logits(prompt, reply).log_softmax(-1)
        run = reply_logits(prompt, reply).log_softmax(-1)
        per_row.append((base.exp() * (base - run)).sum() / len(reply))
    return torch.stack(per_row).mean()


def plain_step(model, tokens, batch: np.ndarray, cfg: TrainConfig, temperature, known) -> dict:
    """The KaLM loss the slow, obvious way: every view through the whole causal LM on its own,
    last-token pooling, objective's InfoNCE, and the LM loss of a plain forward of hr + target with
    the labels masked to the target (transformers shifts them)."""
    import torch
    import torch.nn.functional as F

    from kalmkg.training import objective
    from kalmkg.training.data import lm_positions

    def embed(ids: list[int]):
        x = torch.tensor([ids])
        mask = torch.ones_like(x)
        hidden = model(input_ids=x, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        return F.normalize(objective.last_token_pool(hidden, mask)[0], dim=-1)

    hr_views = [tokens.hr_ids[i] for i in tokens.hr_index_of(batch)]
    hr = torch.stack([embed(v) for v in hr_views])
    tails = torch.stack([embed(tokens.tail_ids[a]) for a in batch[:, 2].tolist()])
    ex = torch.as_tensor(batch)
    negatives = {}
    if cfg.self_negatives:
        negatives = {"self_negatives": torch.stack([embed(tokens.tail_ids[q]) for q in batch[:, 0].tolist()]),
                     "self_negative_mask": torch.tensor([q == a or q in known.get((q, r), ())
                                                         for q, r, a in batch.tolist()])}
    l_exp = objective.info_nce(hr, tails, margin=cfg.margin, temperature=temperature(),
                               mask=objective.false_negative_mask(ex[:, :2], ex[:, 2], ex[:, 2], known),
                               **negatives)["loss"]
    per_example = []
    for i in lm_positions(len(batch), cfg.lm_examples).tolist():
        target = tokens.target_ids[batch[i, 2]]
        ids = torch.tensor([hr_views[i] + target])
        labels = torch.tensor([[-100] * len(hr_views[i]) + target])
        per_example.append(model(input_ids=ids, labels=labels).loss)
    l_imp = torch.stack(per_example).mean()
    return {"loss": l_exp + cfg.lm_weight * l_imp, "l_exp": l_exp, "l_imp": l_imp}


def plain_question_views(model, tokens, batch, views, prompts, cfg, temperature, known):
    """L_qv the obvious way: each question prompt and every tail view through the whole model alone."""
    import torch
    import torch.nn.functional as F

    from kalmkg.training import objective

    def embed(ids: list[int]):
        x = torch.tensor([ids])
        hidden = model(input_ids=x, attention_mask=torch.ones_like(x), output_hidden_states=True).hidden_states[-1]
        return F.normalize(hidden[0, -1], dim=-1)

    questions = torch.stack([embed(p) for p in prompts])
    answers = np.concatenate([batch[:, 2], views[:, 2]])
    candidates = torch.stack([embed(tokens.tail_ids[a]) for a in answers.tolist()])
    positive = torch.arange(len(views)) + len(batch)
    v = torch.as_tensor(views)
    mask = objective.false_negative_mask(v[:, :2], v[:, 2], torch.as_tensor(answers), known, positive_index=positive)
    return objective.info_nce(questions, candidates, margin=cfg.margin, temperature=temperature(), mask=mask,
                              positive_index=positive)["loss"]


def grads(model, temperature) -> dict:
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    out["tau"] = temperature.log_inv_tau.grad.detach().clone()
    model.zero_grad(set_to_none=True)
    temperature.zero_grad(set_to_none=True)
    return out


@pytest.mark.parametrize("self_negatives, questions, kept", [(False, False, False), (True, False, False),
                                                             (False, True, False), (False, True, True)])
def test_fast_step_loss_and_gradients_equal_a_plain_computation(sample_ws, tiny_model, self_negatives, questions,
                                                                kept):
    """The fast step shares the hr view with the completion row, encodes identical rows once, runs
    length-grouped padded chunks and the LM head only on the target positions; none of that may
    change the loss terms or a single gradient. Question-answer rows (L_qa) ride in the same pass.
    `kept`: only the top layer is adapted, and the bottom layer's outputs come from the frozen-layer
    cache (the second step finds every row kept)."""
    import torch

    from kalmkg.models import load_tokenizer
    from kalmkg.prompts import build_messages, no_context_messages
    from kalmkg.training.data import chat_example
    from kalmkg.training.objective import LearnableTemperature
    from kalmkg.training.reading import Said
    from kalmkg.training.prefix import prefix_for
    from kalmkg.training.step import StepContext, kalm_step

    cfg = TrainConfig(batch_size=12, lm_examples=3, lm_weight=0.5, lora_dropout=0.0, max_entity_tokens=24,
                      self_negatives=self_negatives, question_weight=0.7 if questions else 0.0,
                      reading_weight=0.4 if questions else 0.0, question_view_weight=0.6 if questions else 0.0,
                      base_kl_weight=0.3 if questions else 0.0, lora_layers=1 if kept else 0)
    model, tokens, known = tiny_lora(sample_ws, tiny_model, cfg)
    temperature = LearnableTemperature(0.05, learnable=True)
    batch = batch_for_the_step(tokens, cfg)
    tokenizer = load_tokenizer(str(tiny_model), "tiny")
    asked = [chat_example(tokenizer, no_context_messages("What is the capital of France?"), "Paris."),
             chat_example(tokenizer, no_context_messages("Which country is Berlin located in?"),
                          "Germany and Europe.")] if questions else None
    read = [chat_example(tokenizer, build_messages("Where is Paris?", [Said("Paris", "capital of", "France")],
                                                   answer="France"), "Paris is capital of France [1].")]
    # the questions' (entity, relation, answer): any two queries of the graph, the second sharing its answer
    # with an example of the batch (a known answer there is masked)
    views = np.stack([tokens.examples[0], batch[3]]) if questions else None
    model.train()
    prefix = prefix_for(model, 64) if kept else None
    assert (prefix is not None) == kept

    steps = []
    for repeat in range(2 if kept else 1):
        fast = kalm_step(StepContext(model, temperature, tokens, known, cfg, prefix=prefix), batch,
                         chats={"l_qa": asked, "l_read": read if questions else None}, question_views=views)
        assert len(fast.tails[0]) == cfg.batch_size
        fast.loss.backward()
        steps.append((fast, grads(model, temperature)))
        if kept:
            stats = prefix.stats()
            assert not stats["off"] and stats["layers"] == 1
            # the first step's L_kl pass finds its chat rows' bottom states kept by the main pass
            base_pass = len(asked) + len(read) if cfg.base_kl_weight else 0
            assert (stats["hits"] > base_pass) == (repeat == 1) and stats["hits"] >= base_pass
            assert stats["rows"] == stats["misses"] > 10
    plain = plain_step(model, tokens, batch, cfg, temperature, known)
    if questions:
        for term, pairs, weight in (("l_qa", asked, cfg.question_weight), ("l_read", read, cfg.reading_weight)):
            plain[term] = torch.stack([model(input_ids=torch.tensor([p + r]),
                                             labels=torch.tensor([[-100] * len(p) + r])).loss for p, r in pairs]).mean()
            plain["loss"] = plain["loss"] + weight * plain[term]
        plain["l_qv"] = plain_question_views(model, tokens, batch, views, [p for p, _ in asked], cfg, temperature, known)
        plain["loss"] = plain["loss"] + cfg.question_view_weight * plain["l_qv"]
        plain["l_kl"] = plain_base_kl(model, asked + read)
        plain["loss"] = plain["loss"] + cfg.base_kl_weight * plain["l_kl"]
    plain["loss"].backward()
    plain_grads = grads(model, temperature)

    for fast, fast_grads in steps:
        assert ("l_qa" in fast.terms) == ("l_read" in fast.terms) == ("l_qv" in fast.terms) == questions
        assert ("l_kl" in fast.terms) == questions and (not questions or fast.terms["l_kl"] > 1e-3)
        for term in ("loss", "l_exp", "l_imp") + (("l_qa", "l_read", "l_qv", "l_kl") if questions else ()):
            assert fast.terms[term] == pytest.approx(plain[term].item(), rel=1e-5, abs=1e-6), term
        assert fast.terms["l_imp"] > 0.1 and cfg.lm_weight * fast.terms["l_imp"] > 1e-3  # the LM part counts
        assert fast_grads.keys() == plain_grads.keys()
        assert sum(".lora_A" in n for n in fast_grads) == sum(".lora_B" in n for n in fast_grads) > 0
        for name, g in plain_grads.items():
            assert g.abs().max() > 0, name  # every LoRA weight takes part
            torch.testing.assert_close(fast_grads[name], g, rtol=1e-4, atol=1e-6 * float(g.abs().max()), msg=name)


def test_the_base_guard_is_zero_until_the_adapters_move_and_then_pulls_the_replies_back(sample_ws, tiny_model):
    """L_kl compares the run with the model its adapters came from: at LoRA's start (B = 0) the two are
    one model and the term is 0; once B has moved it is positive, and a gradient step on L_kl alone
    brings the run's replies back toward the base's."""
    import torch

    from kalmkg.models import load_tokenizer
    from kalmkg.prompts import no_context_messages
    from kalmkg.training.data import chat_example
    from kalmkg.training.objective import LearnableTemperature
    from kalmkg.training.step import StepContext, kalm_step

    cfg = TrainConfig(batch_size=12, lm_examples=3, lora_dropout=0.0, max_entity_tokens=24, question_weight=0.5,
                      base_kl_weight=1.0)
    model, tokens, known = tiny_lora(sample_ws, tiny_model, cfg)
    tokenizer = load_tokenizer(str(tiny_model), "tiny")
    asked = [chat_example(tokenizer, no_context_messages("Where is Paris?"), "In France.")]
    ctx = StepContext(model, LearnableTemperature(0.05), tokens, known, cfg)
    batch = batch_for_the_step(tokens, cfg)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    saved = [p.detach().clone() for p in lora_b]
    with torch.no_grad():
        for p in lora_b:
            p.zero_()
    assert kalm_step(ctx, batch, chats={"l_qa": asked}).terms["l_kl"] == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        for p, v in zip(lora_b, saved):
            p.copy_(v)
    moved = kalm_step(ctx, batch, chats={"l_qa": asked}).terms["l_kl"]
    assert moved > 1e-3
    model.zero_grad()
    cfg_kl_only = TrainConfig(batch_size=12, lm_examples=0, lora_dropout=0.0, max_entity_tokens=24,
                              question_weight=1e-9, base_kl_weight=1e6)  # the loss is L_kl, in effect
    out = kalm_step(StepContext(model, LearnableTemperature(0.05), tokens, known, cfg_kl_only), batch,
                    chats={"l_qa": asked})
    out.loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 1e-2 / cfg_kl_only.base_kl_weight * p.grad
    assert kalm_step(ctx, batch, chats={"l_qa": asked}).terms["l_kl"] < moved


# ------------------------------------------------------------------ early stopping
def test_a_split_batch_must_divide_evenly_between_processes():
    from kalmkg.training.distributed import World
    from kalmkg.training.loop import _check_batch_size

    two = World(rank=0, size=2)
    _check_batch_size(TrainConfig(batch_size=8, question_weight=1.0, question_examples=4), 100, two)
    with pytest.raises(KalmkgError, match="--batch-size 9 must be divisible by the 2 processes"):
        _check_batch_size(TrainConfig(batch_size=9), 100, two)
    with pytest.raises(KalmkgError, match="--question-examples 3 must be divisible by the 2 processes"):
        _check_batch_size(TrainConfig(batch_size=8, question_weight=1.0, question_examples=3), 100, two)
    with pytest.raises(KalmkgError, match="--reading-examples 5 must be divisible by the 2 processes"):
        _check_batch_size(TrainConfig(batch_size=8, reading_weight=1.0, reading_examples=5), 100, two)
    _check_batch_size(TrainConfig(batch_size=8, question_examples=3), 100, two)  # no questions: no matter


def test_early_stopper_keeps_the_best_and_stops_when_patience_runs_out():
    from kalmkg.training.loop import TrainState
    from kalmkg.training.stopping import EarlyStopper

    mrrs = iter([0.1, 0.3, 0.2, 0.3, 0.25])
    kept, logged, said = [], [], []
    state = TrainState()
    stopper = EarlyStopper(validate=lambda: {"mrr": next(mrrs), "hits@1": 0.0, "hits@10": 0.5, "count": 4},
                           keep_best=lambda: kept.append(state.step), log=logged.append, say=said.append,
                           patience=2)
    decisions = []
    for step in (3, 6, 9, 12):
        state.step = step
        decisions.append(stopper.should_stop(state))
    assert decisions == [False, False, False, True]  # 0.2 and an equal 0.3 are no improvement
    assert kept == [3, 6] and (state.best_metric, state.best_step) == (0.3, 6)
    assert state.evals_without_improvement == 2
    assert [r["step"] for r in logged] == [3, 6, 9, 12] and state.history == logged
    assert said[1].startswith("step 6: valid MRR 0.3000")

    never = EarlyStopper(validate=lambda: {"mrr": 0.0, "hits@1": 0.0, "hits@10": 0.0, "count": 1},
                         keep_best=lambda: None, log=lambda r: None, say=lambda s: None, patience=0)
    assert not any(never.should_stop(TrainState(step=s)) for s in range(5))


def test_unset_settings_are_chosen_for_the_base_size_and_recorded(sample_ws, tiny_model):
    seen = []
    train(sample_ws, TrainConfig(base=str(tiny_model), batch_size=8, max_steps=1), run_id="d", dry_run=seen.append)
    info = seen[0]
    assert info["by_size"] == ["lr", "lora_layers", "max_entity_tokens"] and info["parameters"] < 1e7
    # the tiny model: a small base's lr and entity texts; all of its 2 layers adapted
    assert (info["config"]["lr"], info["config"]["lora_layers"], info["config"]["max_entity_tokens"]) == (1e-3, 0, 16)
    given = []
    train(sample_ws, TrainConfig(base=str(tiny_model), batch_size=8, max_steps=1, lr=2e-4, preset="paper"),
          run_id="d", dry_run=given.append)
    assert given[0]["by_size"] == ["lora_layers", "max_entity_tokens"]
    assert (given[0]["config"]["lr"], given[0]["config"]["max_entity_tokens"]) == (2e-4, 50)


def test_auto_precision_is_decided_once_and_recorded_so_a_resume_keeps_it(sample_ws, tiny_model):
    from kalmkg.runs import read_config
    from kalmkg.training.precision import use_bf16

    cfg = tiny_config(tiny_model, precision="auto", max_steps=4, eval_every=4, checkpoint_every=2)
    train(sample_ws, cfg, run_id="auto", stop_after=2)
    recorded = read_config(sample_ws.runs_dir / "auto")["train"]["precision"]
    assert recorded == ("bf16" if use_bf16("cpu", "auto") else "fp32")
    result = train(sample_ws, TrainConfig(), resume="auto")
    assert result.steps == 4 and read_config(result.run_dir)["train"]["precision"] == recorded
