"""The training memory estimate (training/memory.py): its arithmetic by hand, and the dry run's plan
following the run's settings."""

from __future__ import annotations

import pytest

from kalmkg.training.memory import GIB, ModelShape, estimate_memory

SHAPE = ModelShape(parameters=1000, trainable=100, hidden=8, intermediate=16, heads=2, layers=4, vocab=50)


def test_each_part_of_the_estimate_by_hand():
    m = estimate_memory(SHAPE, [3, 5], lm_positions=2, adapted_layers=2, frozen_bf16=True, activation_bytes=2,
                        kl_positions=1, cache_mb=1)
    assert m.weights == 900 * 2 + 100 * 4
    assert m.optimizer == 100 * 12
    per_layer = 8 * (10 * 8 + 4 * 16) * 2 + (9 + 25) * 2 * 4  # tokens x (10 h + 4 I) x 2 B + heads x T^2 x 4 B
    assert m.activations == 2 * per_layer
    assert m.logits == (2 * 2 + 2 * 1) * 50 * 4
    assert m.cache == 2**20
    assert m.total == m.weights + m.optimizer + m.activations + m.logits + m.cache


def test_quantized_weights_take_their_width():
    # 600 of the 900 frozen weights held in 4 or 8 bits, the other 300 (embeddings, norms) in bf16
    four = estimate_memory(SHAPE, [4], lm_positions=0, adapted_layers=1, frozen_bf16=True, activation_bytes=2,
                           quantized=600, quantize="4bit")
    eight = estimate_memory(SHAPE, [4], lm_positions=0, adapted_layers=1, frozen_bf16=True, activation_bytes=2,
                            quantized=600, quantize="8bit")
    assert four.weights == 300 * 2 + 100 * 4 + int(600 * 4.127 / 8)
    assert eight.weights == 300 * 2 + 100 * 4 + 600


def test_checkpointing_keeps_only_each_layers_input_and_fp32_doubles_the_widths():
    full = estimate_memory(SHAPE, [4], lm_positions=0, adapted_layers=4, frozen_bf16=False, activation_bytes=4)
    kept = estimate_memory(SHAPE, [4], lm_positions=0, adapted_layers=4, frozen_bf16=False, activation_bytes=4,
                           grad_checkpointing=True)
    assert kept.activations == 4 * 4 * 8 * 4 < full.activations
    assert full.weights == 1000 * 4


def test_a_7b_plan_in_bf16_is_what_a_kg_engineer_expects():
    """Llama-2-7B, LoRA r 8 on every layer's FFN, batch 256 rows of ~60 tokens in bf16: the frozen weights
    are ~12.6 GiB, and the activations of 15,360 tokens through 32 layers (~2.7 GB a layer, as
    Korthikanti et al.'s 34 sbh bytes put it) are far more than an H200 holds, unless each layer keeps
    only its input (gradient checkpointing: ~4 GB)."""
    llama = ModelShape(parameters=6_738_415_616 + 10_092_544, trainable=10_092_544, hidden=4096,
                       intermediate=11008, heads=32, layers=32, vocab=32000)
    m = estimate_memory(llama, [60] * 256, lm_positions=32 * 10, adapted_layers=32, frozen_bf16=True,
                        activation_bytes=2)
    assert m.weights / GIB == pytest.approx(12.57, abs=0.05)
    assert 70 < m.activations / GIB < 95
    kept = estimate_memory(llama, [60] * 256, lm_positions=32 * 10, adapted_layers=32, frozen_bf16=True,
                           activation_bytes=2, grad_checkpointing=True)
    assert kept.activations / GIB == pytest.approx(3.75, abs=0.01)
    assert "GiB per process" in m.describe() and "framework not counted" in m.describe()


def test_the_dry_run_plans_memory_from_the_runs_settings(sample_ws, tiny_model):
    from test_train import tiny_config

    from kalmkg.training.loop import train

    plans = {}
    for name, overrides in (("plain", {}), ("top layer", {"lora_layers": 1, "frozen_cache_mb": 0}),
                            ("reading", {"reading_weight": 1.0, "reading_examples": 4}),
                            ("reading + kl", {"reading_weight": 1.0, "reading_examples": 4, "base_kl_weight": 1.0})):
        seen = {}
        train(sample_ws, tiny_config(tiny_model, **overrides), run_id="dry", dry_run=seen.update)
        plans[name] = seen["memory"]
    bytes_ = {name: plan["bytes"] for name, plan in plans.items()}
    assert bytes_["top layer"]["activations"] < bytes_["plain"]["activations"]
    assert bytes_["reading"]["activations"] > bytes_["plain"]["activations"]
    assert bytes_["reading + kl"]["logits"] > bytes_["reading"]["logits"] > bytes_["plain"]["logits"] > 0
    assert all(plan["total"] == sum(plan["bytes"].values()) and plan["processes"] == 1 for plan in plans.values())
    assert not (sample_ws.runs_dir / "dry").exists()
