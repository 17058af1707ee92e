"""Which torch device a command runs on."""

from __future__ import annotations

import os


def pick_device(spec: str) -> str:
    """`auto`: this rank's GPU under torchrun, else Apple's MPS, else the CPU; anything else as given
    (without importing torch: a named device costs nothing to pick)."""
    if spec != "auto":
        return spec
    import torch

    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


PRECISIONS = ("auto", "fp32", "bf16")  # training's --precision and inference's


def inference_precision(device: str, precision: str = "auto") -> str:
    """The weights `embed`, `predict` and `evaluate` load for the torch backend: "fp32" or "bf16".
    `auto`: bf16 on a CUDA GPU that runs it natively (half the memory: a 7B base is 14 GB, not 28), fp32
    elsewhere (a CPU's vectors stay the exact ones the GGUF export is checked against). Picking fp32 or
    a CPU's auto imports nothing."""
    from kalmkg.errors import KalmkgError

    if precision not in PRECISIONS:
        raise KalmkgError(f"unknown precision '{precision}'; use {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if not device.startswith("cuda"):
        return "fp32"
    return "bf16" if cuda_runs_bf16(device) else "fp32"


def cuda_runs_bf16(device: str) -> bool:
    """Whether the CUDA `device` runs bf16 natively: Ampere (compute capability 8) and later.
    torch.cuda.is_bf16_supported() also says yes where it is emulated, slowly (T4, V100)."""
    import torch

    return torch.cuda.get_device_properties(torch.device(device)).major >= 8
