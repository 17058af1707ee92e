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
