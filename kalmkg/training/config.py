"""The training configuration, declared once: what `kalmkg train` takes (its options are made from these
fields and their help), what a run's config.toml records, and the one reader of that record.

Each field's metadata carries its `help` and the `group` its `kalmkg train --help` panel is titled by.
__post_init__ checks the values, so a bad option is one line before any model is loaded.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from kalmkg.device import PRECISIONS
from kalmkg.errors import KalmkgError
from kalmkg.runs import dataclass_from

# Where tau may lie (the objective clamps it here): below, logits overflow bf16; above, no contrast.
TEMPERATURE_RANGE = (1e-3, 1.0)
PRESETS = ("size", "paper")
STRUCTURES = ("complex", "none")
REPORTERS = ("none", "tensorboard", "mlflow")
QUANTIZATIONS = ("none", "8bit", "4bit")


@dataclass(frozen=True)
class SizeDefaults:
    """What a field left unset trains with, for base models of up to `max_params` parameters."""

    max_params: float
    lr: float
    lora_layers: int  # 0: all layers
    max_entity_tokens: int


# A 135M model needs ~10x the paper's learning rate to move in a few dozen steps (with 1e-4 it learns
# nothing in 40 UMLS steps); adapting its top 8 layers and cutting entity texts to 16 tokens keeps a CPU
# step at a few seconds. Models of a few billion parameters get the paper's settings (KaLM, Llama-2-7B).
SIZE_DEFAULTS = (
    SizeDefaults(1.5e9, lr=1e-3, lora_layers=8, max_entity_tokens=16),
    SizeDefaults(4e9, lr=3e-4, lora_layers=0, max_entity_tokens=50),
    SizeDefaults(math.inf, lr=1e-4, lora_layers=0, max_entity_tokens=50),
)
PAPER = SIZE_DEFAULTS[-1]
SIZED = ("lr", "lora_layers", "max_entity_tokens")  # the fields SIZE_DEFAULTS fills


def _option(default, help: str, group: str):
    return field(default=default, metadata={"help": help, "group": group})


@dataclass
class TrainConfig:
    base: str = _option("smollm2-135m", "Base model: smollm2-135m (embedded), a local HF folder, a .gguf file, "
                        "or a hub id.", "Model")
    preset: str = _option("size", "Where --lr, --lora-layers and --max-entity-tokens come from when not given: "
                          "size (up to 1.5B parameters: 1e-3, top 8 layers, 16 tokens; up to 4B: 3e-4, all, 50; "
                          "larger: the paper's 1e-4, all, 50) or paper (the paper's 7B settings for any base).",
                          "Model")
    # LoRA (the paper: r 8, alpha 16, dropout 0.05 on the FFN projections)
    lora_r: int = _option(8, "LoRA rank r.", "Model")
    lora_alpha: int = _option(16, "LoRA scale alpha (updates are scaled by alpha / r).", "Model")
    lora_dropout: float = _option(0.05, "Dropout on the LoRA branch's input.", "Model")
    lora_targets: tuple[str, ...] = _option(("gate_proj", "up_proj", "down_proj"),
                                            "Comma-separated module names (default: the FFN projections).", "Model")
    lora_layers: int | None = _option(None, "Adapt only the top N layers (0: all; faster on a CPU). "
                                      "Default: by the base's size (see --preset).", "Model")
    full: bool = _option(False, "Full fine-tuning instead of LoRA (small models).", "Model")
    quantize: str = _option("none", "Hold the frozen base's linear layers in 8 bits (LLM.int8) or 4 bits (NF4 with "
                            "double quantization: QLoRA) through bitsandbytes, LoRA training on top in full "
                            "precision: a 7B base in about 7 or 4 GB (pip install 'kalmkg[quantize]'); none: "
                            "the base at --precision.", "Model")
    # objective
    margin: float = _option(0.02, "Additive margin gamma on the positive logit.", "Objective")
    temperature: float = _option(0.05, "InfoNCE temperature tau (initial value if learned).", "Objective")
    learn_temperature: bool = _option(False, "Train tau as a parameter.", "Objective")
    lm_weight: float = _option(0.01, "Weight lambda of the triple-completion LM loss.", "Objective")
    lm_examples: int = _option(4, "Examples per batch that also get the LM loss.", "Objective")
    question_weight: float = _option(0.0, "Weight of the question-answer LM loss: questions written from the train "
                                     "graph's relations in both directions, answered in `ask --no-context`'s "
                                     "chat format (0: off).", "Objective")
    question_examples: int = _option(8, "Question-answer examples per batch (with --question-weight > 0).",
                                     "Objective")
    question_view_weight: float = _option(0.0, "Weight of the question views in L_exp (with --question-weight > 0): "
                                          "each question's embedding (the last token of its chat prompt) "
                                          "contrasted against its answer's tail view and the batch's tails, "
                                          "every other known answer masked (0: off).", "Objective")
    reading_weight: float = _option(0.0, "Weight of the fact-reading LM loss: `ask`'s own prompts written from the "
                                    "train graph (numbered facts, the answer, distractors, 2-hop paths), answered "
                                    "with a sentence that cites its facts (0: off).", "Objective")
    reading_examples: int = _option(8, "Fact-reading examples per batch (with --reading-weight > 0).", "Objective")
    base_kl_weight: float = _option(0.0, "Weight of a guard on the chat turns (--question-weight, --reading-weight): "
                                    "KL from the frozen base's next-token distributions (LoRA switched off) to the "
                                    "run's at every reply position, so the replies move to the graph's answers "
                                    "without drifting from how the base follows instructions (0: off; LoRA only).",
                                    "Objective")
    self_negatives: bool = _option(False, "Use each head as a negative for its own query.", "Objective")
    prebatch: int = _option(0, "Also contrast against the tails of the previous K batches.", "Objective")
    # the structure model fused with the text scores for link prediction (kalmkg/structure)
    structure: str = _option("complex", "A graph-structure model trained after the LLM, fused with its text scores "
                             "for link prediction (the weight fitted on valid): complex (ComplEx-N3, one vector "
                             "per entity: what the text cannot tell about the graph) or none (KaLM alone, the "
                             "paper's method).", "Structure")
    structure_dim: int = _option(200, "ComplEx rank (each entity and relation: 2 x this many floats).", "Structure")
    structure_epochs: int = _option(100, "Most epochs of the structure model (it stops earlier when valid MRR "
                                    "stops rising).", "Structure")
    structure_reg: float = _option(0.05, "Weight of the structure model's N3 penalty.", "Structure")
    structure_minutes: float = _option(10.0, "Time cap of the structure model's training (0: none).", "Structure")
    # optimisation
    batch_size: int = _option(24, "Triples per step (the global batch: in-batch negatives).", "Optimisation")
    epochs: float = _option(1.0, "Passes over the training triples (both directions).", "Optimisation")
    max_steps: int = _option(0, "Stop after this many optimizer steps (overrides --epochs).", "Optimisation")
    max_minutes: float = _option(0.0, "Stop after this many minutes of steps and validations, summed over "
                                 "resumes (0: no limit); the run then ends, validated, as when its steps run out. "
                                 "The schedule still spans --epochs / --max-steps.", "Optimisation")
    lr: float | None = _option(None, "Peak learning rate (AdamW, warm-up then cosine). "
                               "Default: by the base's size (see --preset).", "Optimisation")
    weight_decay: float = _option(0.001, "AdamW weight decay (not on biases, norms or tau).", "Optimisation")
    warmup: float = _option(0.05, "Warm-up as a fraction of the steps.", "Optimisation")
    grad_clip: float = _option(1.0, "Clip the gradient norm (0: off).", "Optimisation")
    grad_accum: int = _option(1, "Batches per optimizer step.", "Optimisation")
    grad_checkpointing: bool = _option(False, "Recompute activations to save memory.", "Optimisation")
    frozen_cache_mb: int = _option(2048, "Memory for the outputs of the frozen layers below --lora-layers, "
                                   "computed once per text and reused by later steps (0: run the whole model "
                                   "every step).", "Optimisation")
    # data
    max_entity_tokens: int | None = _option(None, "Cut entity text (name, description) to this many tokens. "
                                            "Default: by the base's size (see --preset).", "Data")
    max_seq_len: int = _option(256, "Longest token sequence; completion targets are cut to fit.", "Data")
    bucket: bool = _option(True, "Batch examples of similar length together.", "Data")
    # bookkeeping
    seed: int = _option(0, "Seed of the LoRA init, the batch order and the validation sample.", "Optimisation")
    device: str = _option("auto", "auto, cpu, cuda, cuda:1, mps.", "Optimisation")
    # auto: bf16 autocast where the hardware has fast bf16 (CUDA, AVX512-BF16/AMX CPUs)
    precision: str = _option("auto", "auto (bf16 autocast where the hardware is fast at it), fp32, bf16.",
                             "Optimisation")
    log_every: int = _option(10, "Log the loss terms to metrics.jsonl every N steps.", "Run")
    checkpoint_every: int = _option(200, "Write a resumable checkpoint every N steps.", "Run")
    eval_every: int = _option(0, "Validate every N steps (0: every epoch).", "Run")
    eval_limit: int = _option(500, "Valid triples sampled for validation (fixed seed).", "Run")
    patience: int = _option(3, "Stop after N validations without a better MRR (0: never).", "Run")
    report_to: str = _option("none", "Also log losses and validation to tensorboard (runs/<id>/tensorboard/) or "
                             "mlflow (MLFLOW_TRACKING_URI, default ./mlruns); none: metrics.jsonl only.", "Run")

    def __post_init__(self) -> None:
        problem = config_problem(self)
        if problem is not None:
            raise KalmkgError(problem)


def config_problem(cfg: TrainConfig) -> str | None:
    """The first value `cfg` cannot train with, as the one line the command line prints; None if all fit."""
    low, high = TEMPERATURE_RANGE
    checks = [
        (cfg.batch_size >= 2, "--batch-size must be at least 2 (in-batch negatives)"),
        (low <= cfg.temperature <= high, f"--temperature must be in [{low:g}, {high:g}]"),
        (cfg.preset in PRESETS, f"unknown preset '{cfg.preset}'; use size or paper"),
        (cfg.lr is None or cfg.lr > 0, "--lr must be positive"),
        (cfg.lora_layers is None or cfg.lora_layers >= 0, "--lora-layers must be 0 (all) or more"),
        (cfg.grad_accum >= 1, "--grad-accum must be at least 1"),
        (cfg.epochs > 0 or cfg.max_steps > 0, "give --epochs > 0 or --max-steps > 0"),
        (cfg.max_minutes >= 0, "--max-minutes must be 0 (no limit) or more"),
        (0 <= cfg.lm_examples <= cfg.batch_size, "--lm-examples must be between 0 and --batch-size"),
        (cfg.question_weight >= 0, "--question-weight must be 0 (off) or more"),
        (cfg.question_examples >= 0, "--question-examples must be 0 or more"),
        (cfg.reading_weight >= 0, "--reading-weight must be 0 (off) or more"),
        (cfg.question_view_weight >= 0, "--question-view-weight must be 0 (off) or more"),
        (cfg.reading_examples >= 0, "--reading-examples must be 0 or more"),
        (cfg.base_kl_weight >= 0, "--base-kl-weight must be 0 (off) or more"),
        (cfg.base_kl_weight == 0 or not cfg.full, "--base-kl-weight needs LoRA: with --full no frozen base is kept"),
        (0 <= cfg.lora_dropout < 1, "--lora-dropout must be in [0, 1)"),
        (cfg.quantize in QUANTIZATIONS, f"unknown --quantize '{cfg.quantize}'; use none, 8bit or 4bit"),
        (cfg.quantize == "none" or not cfg.full, "--quantize needs LoRA: quantized weights cannot train (--full)"),
        (cfg.base_kl_weight == 0 or (cfg.question_weight > 0 and cfg.question_examples > 0)
         or (cfg.reading_weight > 0 and cfg.reading_examples > 0),
         "--base-kl-weight guards the chat turns: give --question-weight or --reading-weight too"),
        (cfg.max_entity_tokens is None or cfg.max_entity_tokens >= 1, "--max-entity-tokens must be at least 1"),
        (cfg.log_every >= 1, "--log-every must be at least 1"),
        (cfg.frozen_cache_mb >= 0, "--frozen-cache-mb must be 0 (off) or more"),
        (cfg.checkpoint_every >= 1, "--checkpoint-every must be at least 1"),
        (cfg.structure in STRUCTURES, f"unknown structure '{cfg.structure}'; use complex or none"),
        (cfg.structure_dim >= 1, "--structure-dim must be at least 1"),
        (cfg.structure_epochs >= 1, "--structure-epochs must be at least 1"),
        (cfg.structure_reg >= 0, "--structure-reg must be 0 or more"),
        (cfg.structure_minutes >= 0, "--structure-minutes must be 0 (no cap) or more"),
        (cfg.precision in PRECISIONS, f"unknown precision '{cfg.precision}'; use auto, fp32 or bf16"),
        (cfg.report_to in REPORTERS, f"unknown --report-to '{cfg.report_to}'; use {', '.join(REPORTERS)}"),
    ]
    return next((message for ok, message in checks if not ok), None)


def size_defaults(n_params: int, preset: str = "size") -> SizeDefaults:
    """The defaults for a base of `n_params` parameters (`preset` "paper": the paper's, whatever the size)."""
    if preset == "paper":
        return PAPER
    return next(d for d in SIZE_DEFAULTS if n_params <= d.max_params)


def with_size_defaults(cfg: TrainConfig, n_params: int, n_layers: int) -> TrainConfig:
    """`cfg` with every unset SIZED field filled for its base; a model of no more layers than the default
    adapts all of them."""
    chosen = size_defaults(n_params, cfg.preset)
    values = {name: getattr(chosen, name) for name in SIZED if getattr(cfg, name) is None}
    if "lora_layers" in values and values["lora_layers"] >= n_layers:
        values["lora_layers"] = 0
    return replace(cfg, **values)


def saved_train_config(config: dict) -> TrainConfig:
    """The [train] table of a run's config.toml as a TrainConfig (unknown keys ignored, missing ones at
    their defaults): how export, prediction and resume read what a run was trained with. Runs record
    the values they trained with; a SIZED field missing from an older run is the paper's value, which
    every run took before sizes chose."""
    cfg = dataclass_from(TrainConfig, config.get("train", {}))
    return replace(cfg, **{name: getattr(PAPER, name) for name in SIZED if getattr(cfg, name) is None})
