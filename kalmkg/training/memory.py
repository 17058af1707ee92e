"""What one training process holds in memory, estimated before it starts (`kalmkg train --dry-run`).

Pure arithmetic on the model's shape and a batch's token rows, so a 7B plan can be checked on a laptop:

    weights      frozen parameters at their stored width (bf16: 2 bytes, fp32: 4; --quantize: 1 byte for 8
                 bits, about 0.52 for NF4 with its double-quantized constants) + trainable ones (fp32)
    optimizer    per trainable parameter: its gradient (4) and AdamW's two moments (8)
    activations  what backward keeps, in the adapted layers only (below them nothing is kept): per token and
                 layer about 10 hidden-sized and 4 FFN-sized tensors (norms, q/k/v, attention and FFN
                 outputs, LoRA's inputs), plus eager attention's probabilities (heads x T^2 per row);
                 with gradient checkpointing only each layer's input
    logits       the LM head's output at the positions that get an LM loss (fp32, kept for backward,
                 and its softmax), twice for the KL guard's reference
    cache        the frozen layers' kept outputs (`--frozen-cache-mb`, its budget: the most it grows to)

The framework itself (a CUDA context, the Python process and its libraries: about 0.5-1 GB) is not in
it. An estimate: the allocator's fragmentation and the transient tensors of one layer's forward come on
top; bench/train_throughput.py prints the measured peak beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

GIB = 2**30
# bytes a quantized weight takes: LLM.int8 (one byte, a float per row aside); NF4 with double
# quantization (4 bits, an 8-bit constant per 64 weights and a float per 256 constants: 4.127 bits)
QUANTIZED_BYTES = {"8bit": 1.0, "4bit": 4.127 / 8}


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a decoder that memory depends on (from its config and parameter count)."""

    parameters: int  # all of them (embeddings included)
    trainable: int  # LoRA's (or all with full fine-tuning)
    hidden: int
    intermediate: int
    heads: int
    layers: int
    vocab: int


@dataclass(frozen=True)
class MemoryEstimate:
    weights: int  # bytes
    optimizer: int
    activations: int
    logits: int
    cache: int

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + self.activations + self.logits + self.cache

    def describe(self) -> str:
        parts = ", ".join(f"{name} {value / GIB:.2f}" for name, value in
                          (("weights", self.weights), ("optimizer", self.optimizer),
                           ("activations", self.activations), ("logits", self.logits), ("frozen-layer cache", self.cache)))
        return f"about {self.total / GIB:.2f} GiB per process ({parts} GiB), framework not counted"


def estimate_memory(shape: ModelShape, rows: Sequence[int], lm_positions: int, *, adapted_layers: int,
                    frozen_bf16: bool, activation_bytes: int, grad_checkpointing: bool = False,
                    kl_positions: int = 0, cache_mb: float = 0.0, quantized: int = 0,
                    quantize: str = "none") -> MemoryEstimate:
    """`rows`: the token lengths of one process's rows in a step (views, completion and chat rows);
    `lm_positions`: how many of their positions get an LM loss; `kl_positions`: those the KL guard
    compares with the base; `adapted_layers`: the layers that train (backward runs through them only);
    `activation_bytes`: 2 under bf16 autocast, else 4; `quantized`: how many of the frozen weights
    `quantize` ("8bit", "4bit") holds in fewer bits."""
    frozen = shape.parameters - shape.trainable - quantized
    weights = (frozen * (2 if frozen_bf16 else 4) + shape.trainable * 4
               + (int(quantized * QUANTIZED_BYTES[quantize]) if quantized else 0))
    optimizer = shape.trainable * (4 + 8)
    tokens = sum(rows)
    if grad_checkpointing:
        per_layer = tokens * shape.hidden * activation_bytes
    else:
        per_layer = (tokens * (10 * shape.hidden + 4 * shape.intermediate) * activation_bytes
                     + sum(t * t for t in rows) * shape.heads * 4)  # eager attention's probabilities, fp32
    activations = per_layer * adapted_layers
    logits = (2 * lm_positions + 2 * kl_positions) * shape.vocab * 4
    return MemoryEstimate(weights, optimizer, activations, logits, int(cache_mb * 2**20))
