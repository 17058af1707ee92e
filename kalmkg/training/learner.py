"""What training updates, built and stepped in one place: the model (base + LoRA), the InfoNCE
temperature, AdamW and its learning-rate schedule (linear warm-up, then cosine decay to zero)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from kalmkg.models import apply_lora, is_quantized
from kalmkg.training.config import TrainConfig
from kalmkg.training.precision import freeze_in_bf16, use_bf16


@dataclass
class Learner:
    """The four things that change at every step and that a checkpoint saves."""

    model: Any
    temperature: Any  # objective.LearnableTemperature
    optimizer: Any
    scheduler: Any

    def parameters(self) -> list:
        return list(self.model.parameters()) + list(self.temperature.parameters())

    def update(self, grad_clip: float) -> None:
        """One optimizer step on the accumulated gradients (averaged over the processes by their
        replicas' backward): clipped (model weights only), then the schedule moves on."""
        import torch

        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], grad_clip)
        self.optimizer.step()
        self.scheduler.step()


def build_learner(model, cfg: TrainConfig, total_steps: int, device: str) -> Learner:
    """LoRA on the loaded base (or every weight trainable with `full`), on `device`, with its
    temperature, optimizer and schedule."""
    import torch

    from kalmkg.training.dropout import use_word_dropout
    from kalmkg.training.objective import LearnableTemperature

    on_cpu = torch.device(device).type == "cpu"
    if on_cpu:
        use_plain_attention(model)
    model = apply_lora(model, cfg)
    if on_cpu:
        use_word_dropout(model)
    if cfg.grad_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    if not is_quantized(model):  # bitsandbytes placed its weights while loading; they do not move
        model.to(device)
    if use_bf16(device, cfg.precision) and not cfg.full:
        freeze_in_bf16(model)
    temperature = LearnableTemperature(cfg.temperature, cfg.learn_temperature).to(device)
    optimizer = make_optimizer(model, temperature, cfg)
    warmup = int(cfg.warmup * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, warmup))
    return Learner(model, temperature, optimizer, scheduler)


def use_plain_attention(model) -> None:
    """Attention as plain matmuls and a softmax instead of SDPA's CPU kernel, whose backward takes
    about seven times its forward on rows of tens of tokens (a step 16 % faster on the embedded model;
    the values are the same)."""
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    else:  # transformers < 4.55
        model.config._attn_implementation = "eager"


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < warmup:
        return (step + 1) / max(1, warmup)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model, temperature, cfg: TrainConfig):
    """AdamW with weight decay on the weight matrices only (not on norms and biases)."""
    import torch

    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    temp_params = [p for p in temperature.parameters() if p.requires_grad]
    if temp_params:  # decay would pull 1/tau towards 0; tau gets its own group, undecayed
        groups.append({"params": temp_params, "weight_decay": 0.0})
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr)
