"""TrainConfig: every field carries its help, bad values are one clear error when the config is made, and
saved configs read back as they were written."""

from __future__ import annotations

import dataclasses
import json

import pytest

from kalmkg.errors import KalmkgError
from kalmkg.runs import as_dict, config_to_toml, read_config
from kalmkg.training.config import TEMPERATURE_RANGE, TrainConfig, config_problem, saved_train_config


def test_every_field_has_help_and_a_group():
    for field in dataclasses.fields(TrainConfig):
        assert field.metadata.get("help", "").strip(), field.name
        assert field.metadata.get("group") in {"Model", "Objective", "Structure", "Optimisation", "Data", "Run"}, field.name


def test_the_defaults_are_valid():
    assert config_problem(TrainConfig()) is None


@pytest.mark.parametrize("overrides, message", [
    ({"batch_size": 1}, "--batch-size must be at least 2 (in-batch negatives)"),
    ({"temperature": 2.0}, "--temperature must be in [0.001, 1]"),
    ({"temperature": 0.0}, "--temperature must be in [0.001, 1]"),
    ({"lr": 0.0}, "--lr must be positive"),
    ({"grad_accum": 0}, "--grad-accum must be at least 1"),
    ({"epochs": 0.0}, "give --epochs > 0 or --max-steps > 0"),
    ({"lm_examples": 25}, "--lm-examples must be between 0 and --batch-size"),
    ({"lm_examples": -1}, "--lm-examples must be between 0 and --batch-size"),
    ({"max_entity_tokens": 0}, "--max-entity-tokens must be at least 1"),
    ({"log_every": 0}, "--log-every must be at least 1"),
    ({"checkpoint_every": 0}, "--checkpoint-every must be at least 1"),
    ({"frozen_cache_mb": -1}, "--frozen-cache-mb must be 0 (off) or more"),
    ({"precision": "fp16"}, "unknown precision 'fp16'; use auto, fp32 or bf16"),
    ({"base_kl_weight": -0.1, "reading_weight": 1.0}, "--base-kl-weight must be 0 (off) or more"),
    ({"base_kl_weight": 0.5, "reading_weight": 1.0, "full": True},
     "--base-kl-weight needs LoRA: with --full no frozen base is kept"),
    ({"base_kl_weight": 0.5}, "--base-kl-weight guards the chat turns: give --question-weight or --reading-weight too"),
])
def test_a_bad_value_is_one_clear_error_when_the_config_is_made(overrides, message):
    with pytest.raises(KalmkgError) as info:
        TrainConfig(**overrides)
    assert str(info.value) == message


def test_edges_that_train():
    low, high = TEMPERATURE_RANGE
    for cfg in (TrainConfig(temperature=low), TrainConfig(temperature=high), TrainConfig(epochs=0, max_steps=5),
                TrainConfig(batch_size=2, lm_examples=0), TrainConfig(lm_examples=24), TrainConfig(precision="bf16"),
                TrainConfig(base_kl_weight=0.5, question_weight=1.0), TrainConfig(base_kl_weight=0.5, reading_weight=1.0)):
        assert config_problem(cfg) is None


def test_the_temperature_range_is_the_one_the_objective_clamps_to():
    """TrainConfig accepts exactly the initial temperatures the learnable temperature accepts."""
    pytest.importorskip("torch")
    from kalmkg.training.objective import LearnableTemperature

    low, high = TEMPERATURE_RANGE
    for tau in (low, high):
        LearnableTemperature(tau)
        TrainConfig(temperature=tau)
    for tau in (low / 2, high * 2):
        with pytest.raises(ValueError):
            LearnableTemperature(tau)
        with pytest.raises(KalmkgError):
            TrainConfig(temperature=tau)


def test_saved_configs_read_back_as_written(tmp_path):
    # what training writes: every size-chosen field filled in
    cfg = TrainConfig(base="some/model", lora_targets=("q_proj", "v_proj"), batch_size=8, lm_examples=2,
                      bucket=False, epochs=2.5, precision="fp32", lr=1e-3, lora_layers=8, max_entity_tokens=16)
    (tmp_path / "config.toml").write_text(config_to_toml({"train": as_dict(cfg), "graph": {"fingerprint": "f"}}))
    assert saved_train_config(read_config(tmp_path)) == cfg
    # an older run: a key since dropped, fields added since missing (size-chosen ones: the paper's values,
    # which every run took before sizes chose)
    paper = {"lora_layers": 0, "max_entity_tokens": 50}
    assert saved_train_config({"train": {"lr": 3e-4, "old_option": 1}}) == TrainConfig(lr=3e-4, **paper)
    assert saved_train_config({}) == TrainConfig(lr=1e-4, **paper)


def test_unset_settings_take_the_defaults_for_the_base_size():
    from kalmkg.training.config import PAPER, size_defaults, with_size_defaults

    small = with_size_defaults(TrainConfig(), n_params=135_000_000, n_layers=30)
    assert (small.lr, small.lora_layers, small.max_entity_tokens) == (1e-3, 8, 16)
    seven_b = with_size_defaults(TrainConfig(), n_params=6_700_000_000, n_layers=32)
    assert (seven_b.lr, seven_b.lora_layers, seven_b.max_entity_tokens) == (PAPER.lr, 0, 50) == (1e-4, 0, 50)
    # given values win; the paper's settings are one flag away; a model of few layers adapts all of them
    given = with_size_defaults(TrainConfig(lr=5e-4, max_entity_tokens=32), n_params=135_000_000, n_layers=30)
    assert (given.lr, given.lora_layers, given.max_entity_tokens) == (5e-4, 8, 32)
    paper = with_size_defaults(TrainConfig(preset="paper"), n_params=135_000_000, n_layers=30)
    assert (paper.lr, paper.lora_layers, paper.max_entity_tokens) == (1e-4, 0, 50)
    assert with_size_defaults(TrainConfig(), n_params=1_000_000, n_layers=2).lora_layers == 0
    assert size_defaults(3_000_000_000).lr == 3e-4
    with pytest.raises(KalmkgError, match="unknown preset 'huge'"):
        TrainConfig(preset="huge")


def test_a_saved_config_with_a_bad_value_says_which():
    with pytest.raises(KalmkgError, match="--temperature"):
        saved_train_config({"train": {"temperature": 5.0}})


# ------------------------------------------------------------------ --precision auto on a CPU: measured
def test_auto_precision_on_a_cpu_follows_a_measurement_remembered_per_machine(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    import torch

    from kalmkg.training import precision

    monkeypatch.setenv("KALMKG_CACHE", str(tmp_path))
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    timings = {torch.float32: 2.0, torch.bfloat16: 3.1}  # the Xeon whose VM grants no AMX
    monkeypatch.setattr(precision, "_matmul_ms", lambda dtype: timings[dtype])
    precision.cpu_bf16_is_faster.cache_clear()
    try:
        assert precision.use_bf16("cpu", "auto") is False
        assert precision.use_bf16("cpu", "bf16") is True and precision.use_bf16("cpu", "fp32") is False
        memo = json.loads((tmp_path / "cpu-bf16.json").read_text())
        (entry,) = memo.values()
        assert entry == {"fp32_ms": 2.0, "bf16_ms": 3.1, "bf16": False}

        # another process on the same machine reads the verdict instead of measuring again
        precision.cpu_bf16_is_faster.cache_clear()
        monkeypatch.setattr(precision, "_matmul_ms", lambda dtype: pytest.fail("measured twice"))
        assert precision.use_bf16("cpu", "auto") is False

        # a CPU that is fast at bf16 (a Zen 4 EPYC): at least 1.25x the fp32 speed picks it
        (tmp_path / "cpu-bf16.json").unlink()
        precision.cpu_bf16_is_faster.cache_clear()
        timings = {torch.float32: 2.0, torch.bfloat16: 1.0}
        monkeypatch.setattr(precision, "_matmul_ms", lambda dtype: timings[dtype])
        assert precision.use_bf16("cpu", "auto") is True

        # no bf16 instructions at all: not measured
        precision.cpu_bf16_is_faster.cache_clear()
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
        monkeypatch.setattr(precision, "_matmul_ms", lambda dtype: pytest.fail("measured without bf16"))
        assert precision.use_bf16("cpu", "auto") is False
    finally:
        precision.cpu_bf16_is_faster.cache_clear()
