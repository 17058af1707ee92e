"""Mixed precision for training: whether to use bf16, the autocast context, and the frozen weights
stored in bf16. Weights that train and the optimizer stay fp32; the loss is fp32."""

from __future__ import annotations

import functools
import json
import time

from kalmkg.cache import cache_root
from kalmkg.device import cuda_runs_bf16
from kalmkg.files import atomic_write_text
from kalmkg.llamacpp.environment import cpu_model, simd_flags
from kalmkg.errors import KalmkgError


def use_bf16(device: str, precision: str) -> bool:
    import torch

    if precision in ("fp32", "bf16"):
        return precision == "bf16"
    if precision != "auto":
        raise KalmkgError(f"unknown precision '{precision}'; use auto, fp32 or bf16")
    kind = torch.device(device).type
    if kind == "cuda":
        return cuda_runs_bf16(device)
    if kind == "cpu":
        return cpu_bf16_is_faster(torch.get_num_threads())
    return False


# bf16 must beat fp32 by this much on the matmul alone: autocast adds a cast of every activation
_BF16_MARGIN = 0.8


@functools.lru_cache(maxsize=None)
def cpu_bf16_is_faster(threads: int) -> bool:
    """Whether bf16 matmuls run faster than fp32 ones on this CPU, measured, not read off its flags: a
    CPU that reports AVX512-BF16 may still be slower at it (an Intel Xeon whose VM does not grant AMX:
    bf16 1.7x slower than MKL's fp32; a Zen 4 EPYC: faster). About 0.1 s once, remembered per CPU
    model, torch version and thread count in the user cache (and for the process: every caller of a run
    must agree)."""
    import torch

    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    key = f"{_cpu_model()} | torch {torch.__version__} | {threads} threads"
    memo = cache_root() / "cpu-bf16.json"
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known.get(key), dict) and isinstance(known[key].get("bf16"), bool):
        return known[key]["bf16"]
    fp32_ms, bf16_ms = _matmul_ms(torch.float32), _matmul_ms(torch.bfloat16)
    faster = bf16_ms < _BF16_MARGIN * fp32_ms
    known[key] = {"fp32_ms": round(fp32_ms, 3), "bf16_ms": round(bf16_ms, 3), "bf16": faster}
    try:
        atomic_write_text(memo, json.dumps(known, indent=1) + "\n")
    except OSError:  # a read-only cache: measured again by the next process
        pass
    return faster


def _matmul_ms(dtype) -> float:
    """The best of 7 timings of an FFN-shaped matmul (256 tokens of a 576-wide model into 1536)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 576, generator=gen).to(dtype)
    w = torch.randn(1536, 576, generator=gen).to(dtype)
    torch.nn.functional.linear(x, w)  # warm-up: oneDNN builds its kernel on first use
    best = float("inf")
    for _ in range(7):
        t0 = time.perf_counter()
        for _ in range(4):
            torch.nn.functional.linear(x, w)
        best = min(best, (time.perf_counter() - t0) / 4)
    return best * 1e3


def _cpu_model() -> str:
    """The CPU's name and a hash of its vector/matrix flags (a VM's name may be generic: "Intel Xeon Processor")."""
    import hashlib

    flags = " ".join(simd_flags())
    return f"{cpu_model()} [{hashlib.sha256(flags.encode()).hexdigest()[:8]}]" if flags else cpu_model()


def freeze_in_bf16(model) -> None:
    """Store the frozen base weights in bf16 (the trainable ones stay fp32): autocast would otherwise
    re-cast every frozen matrix at every use, and they take half the memory."""
    import torch

    for p in model.parameters():
        if not p.requires_grad and p.dtype == torch.float32:
            p.data = p.data.to(torch.bfloat16)


def make_autocast(device: str, precision: str):
    """Matmuls in bf16 where `use_bf16` says so; a no-op context otherwise."""
    import torch

    kind = torch.device(device).type
    return torch.autocast(kind if kind in ("cuda", "cpu") else "cpu", dtype=torch.bfloat16,
                          enabled=use_bf16(device, precision))
