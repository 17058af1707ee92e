"""The benchmark scripts that must work before the hardware they are for is there."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def test_flops_of_a_step_are_counted_from_its_rows():
    from train_mfu import Shape, step_flops

    shape = Shape(layers=4, width=8, vocab=100, layer_weights=1000, mlp_weights=600, trained_from=2,
                  attention_adapted=False)
    t = 3
    forward = 4 * (2 * 1000 * t + 4 * t * t * 8)
    top = 2 * 1000 * t + 8 * t * t * 8  # the layer above the lowest adapted one: all of it
    lowest = 2 * 600 * t  # the lowest adapted layer: its FFN only (no attention projection adapted)
    head = 2 * 2 * 100 * 8 * 5
    assert step_flops(shape, [t], 5) == forward + top + lowest + head
    assert step_flops(shape, [t, t], 0) == 2 * step_flops(shape, [t], 0)
    nothing_trained = Shape(4, 8, 100, 1000, 600, trained_from=4, attention_adapted=False)
    assert step_flops(nothing_trained, [t], 0) == forward


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
