"""`kalmkg train --quantize 8bit|4bit` (issue 16): the frozen base held by bitsandbytes (its CPU backend
here), LoRA trained on top, and the run used afterwards with the base it trained on."""

from __future__ import annotations

import numpy as np
import pytest
from test_train import metrics, tiny_config

from kalmkg.errors import KalmkgError
from kalmkg.training.config import TrainConfig
from kalmkg.training.loop import train

bnb = pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def wide_tiny(tmp_path_factory):
    """The tiny Llama 64 wide: bitsandbytes' CPU 4-bit kernel quantizes rows in blocks of 64."""
    from tiny_model import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-64"), hidden_size=64)


def _linear_kinds(model) -> set[str]:
    return {type(m).__name__ for m in model.modules() if type(m).__name__ in ("Linear4bit", "Linear8bitLt")}


def test_a_4bit_run_trains_lora_on_the_quantized_base_and_predicts_with_it(sample_ws, wide_tiny, monkeypatch):
    import torch
    from safetensors.torch import load_file

    import kalmkg.training.learner as learner_module
    from kalmkg.index import embed
    from kalmkg.loaded import load_model
    from kalmkg.prediction import predict

    trained = []
    build = learner_module.build_learner

    def spy(model, cfg, total_steps, device):
        trained.append(_linear_kinds(model))
        return build(model, cfg, total_steps, device)

    monkeypatch.setattr("kalmkg.training.loop.build_learner", spy)
    result = train(sample_ws, tiny_config(wide_tiny, quantize="4bit", max_steps=6, eval_every=6,
                                          checkpoint_every=6), run_id="q4")
    assert trained == [{"Linear4bit"}]
    losses = [m["loss"] for m in metrics(result.run_dir) if "loss" in m]
    assert losses and all(np.isfinite(losses))
    saved = load_file(result.run_dir / "adapter" / "adapter_model.safetensors")
    assert all(t.abs().max() > 0 for n, t in saved.items() if "lora_B" in n)  # stepped from LoRA's zero start
    assert {t.dtype for t in saved.values()} == {torch.float32}

    # afterwards: the base quantized as it trained, the adapter beside it (not merged into 4 bits)
    loaded = load_model(sample_ws, run="q4")
    assert _linear_kinds(loaded.model) == {"Linear4bit"}
    assert hasattr(loaded.model, "peft_config")
    embed(sample_ws, loaded)
    top = predict(sample_ws, "Paris", "capital_of", "?", k=3, run="q4")
    assert len(top.candidates) == 3

    # export merges into the full-precision base (what a GGUF can hold)
    from kalmkg.models import merged_model, resolve_base

    merged = merged_model(resolve_base(str(wide_tiny)), result.run_dir / "adapter")
    assert not _linear_kinds(merged) and not hasattr(merged, "peft_config")


def test_an_8bit_run_trains(sample_ws, wide_tiny):
    result = train(sample_ws, tiny_config(wide_tiny, quantize="8bit", max_steps=3, eval_every=3,
                                          checkpoint_every=3), run_id="q8")
    assert result.steps == 3
    assert all(np.isfinite(m["loss"]) for m in metrics(result.run_dir) if "loss" in m)


def test_the_dry_run_plans_the_quantized_weights_smaller(sample_ws, wide_tiny):
    plans = {}
    for quantize in ("none", "8bit", "4bit"):
        seen = {}
        train(sample_ws, tiny_config(wide_tiny, quantize=quantize), run_id="dry", dry_run=seen.update)
        plans[quantize] = seen
    weights = {q: plan["memory"]["bytes"]["weights"] for q, plan in plans.items()}
    assert weights["4bit"] < weights["8bit"] < weights["none"]
    # the base's size is its weights' count, not the packed bytes bitsandbytes stores them in
    assert plans["4bit"]["parameters"] == plans["none"]["parameters"]
    assert plans["4bit"]["config"]["quantize"] == "4bit"


@pytest.mark.parametrize("overrides, message", [
    ({"quantize": "3bit"}, r"unknown --quantize '3bit'; use none, 8bit or 4bit"),
    ({"quantize": "4bit", "full": True}, r"--quantize needs LoRA"),
])
def test_bad_quantize_settings_are_one_line(overrides, message):
    with pytest.raises(KalmkgError, match=message):
        TrainConfig(**overrides)


def test_without_bitsandbytes_the_error_says_what_to_install(sample_ws, wide_tiny, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else find_spec(name, *a))
    with pytest.raises(KalmkgError, match=r"--quantize 4bit needs the bitsandbytes package: "
                                          r"pip install 'kalmkg\[quantize\]'"):
        train(sample_ws, tiny_config(wide_tiny, quantize="4bit"), run_id="nobnb")


def test_a_killed_4bit_run_resumes_on_its_quantized_base(sample_ws, wide_tiny):
    from kalmkg.runs import read_config

    cfg = tiny_config(wide_tiny, quantize="4bit", max_steps=6, eval_every=6, checkpoint_every=3)
    train(sample_ws, cfg, run_id="q4r", stop_after=3)
    result = train(sample_ws, TrainConfig(), resume="q4r")  # the saved config wins
    assert result.steps == 6
    assert read_config(result.run_dir)["train"]["quantize"] == "4bit"
    steps = [m["step"] for m in metrics(result.run_dir) if "loss" in m]
    assert steps == sorted(set(steps)) and steps[-1] == 6  # each step once, across the two processes
