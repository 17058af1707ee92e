"""Mixed precision for training: whether to use bf16, the autocast context, and the frozen weights
stored in bf16. Weights that train and the optimizer stay fp32; the loss is fp32."""

from __future__ import annotations

from kalmkg.errors import KalmkgError


def use_bf16(device: str, precision: str) -> bool:
    import torch

    if precision in ("fp32", "bf16"):
        return precision == "bf16"
    if precision != "auto":
        raise KalmkgError(f"unknown precision '{precision}'; use auto, fp32 or bf16")
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.is_bf16_supported()
    if kind == "cpu":  # oneDNN runs bf16 matmuls at about twice the fp32 speed on these CPUs
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


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
