"""The training configuration, declared once: what `kalmkg train` takes, what a run's config.toml
records, and the one reader of that record."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TrainConfig:
    base: str = "smollm2-135m"
    # LoRA (the paper: r 8, alpha 16, dropout 0.05 on the FFN projections)
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    lora_layers: int = 0  # adapt only the top N layers (0: all)
    full: bool = False
    # objective
    margin: float = 0.02
    temperature: float = 0.05
    learn_temperature: bool = False
    lm_weight: float = 0.01
    lm_examples: int = 4
    self_negatives: bool = False
    prebatch: int = 0
    # optimisation
    batch_size: int = 24
    epochs: float = 1.0
    max_steps: int = 0
    lr: float = 1e-4
    weight_decay: float = 0.001
    warmup: float = 0.05
    grad_clip: float = 1.0
    grad_accum: int = 1
    grad_checkpointing: bool = False
    # data
    max_entity_tokens: int = 50
    max_seq_len: int = 256
    bucket: bool = True
    # bookkeeping
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 autocast where the hardware has fast bf16 (CUDA, AVX512-BF16/AMX CPUs)
    log_every: int = 10
    checkpoint_every: int = 200
    eval_every: int = 0  # steps; 0 = at the end of every epoch
    eval_limit: int = 500
    patience: int = 3


def saved_train_config(config: dict) -> TrainConfig:
    """The [train] table of a run's config.toml as a TrainConfig (unknown keys ignored, missing ones at
    their defaults): how export, prediction and resume read what a run was trained with."""
    from kalmkg.runs import dataclass_from

    return dataclass_from(TrainConfig, config.get("train", {}))
