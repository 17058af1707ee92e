"""What a run leaves on disk to resume from and to use: the checkpoint (trainable weights,
optimizer, schedule, counters, pre-batch, random state) and the adapter. Both are written
atomically: a kill mid-write leaves the previous one whole."""

from __future__ import annotations

from pathlib import Path

from kalmkg.errors import KalmkgError
from kalmkg.files import atomic_path
from kalmkg.training.learner import Learner

_STATE = "state.pt"


def has_checkpoint(folder: Path) -> bool:
    return (folder / _STATE).exists()


def trainable_state(model, temperature) -> dict:
    """The weights that train (LoRA's, or all with full fine-tuning) and the temperature, on the CPU."""
    state = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    state["__temperature__"] = temperature.state_dict()
    return state


def save_checkpoint(folder: Path, learner: Learner, counters: dict, prebatch: list) -> None:
    """`counters`: the loop's TrainState as a dict; `prebatch`: the (tail vectors, entity ids) kept
    as extra negatives."""
    import torch

    payload = {
        "trainable": trainable_state(learner.model, learner.temperature),
        "optimizer": learner.optimizer.state_dict(),
        "scheduler": learner.scheduler.state_dict(),
        "state": counters,
        "prebatch": [(v.cpu(), ids) for v, ids in prebatch],
        "rng": {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
    }
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        torch.save(payload, tmp / _STATE)


def load_checkpoint(folder: Path, learner: Learner, device) -> tuple[dict, list]:
    """Restore `learner` and the random state in place; returns (counters, prebatch on `device`)."""
    import torch

    import pickle

    try:  # tensors and plain data only: a checkpoint from elsewhere runs no code
        payload = torch.load(folder / _STATE, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as exc:
        raise KalmkgError(f"cannot resume from {folder / _STATE}: not a checkpoint kalmkg wrote, or damaged "
                          f"({str(exc).strip().splitlines()[0][:200]})") from None
    trainable = dict(payload["trainable"])
    learner.temperature.load_state_dict(trainable.pop("__temperature__"))
    params = dict(learner.model.named_parameters())
    with torch.no_grad():
        for name, value in trainable.items():
            params[name].copy_(value.to(params[name].device))
    learner.optimizer.load_state_dict(payload["optimizer"])
    learner.scheduler.load_state_dict(payload["scheduler"])
    torch.set_rng_state(payload["rng"]["torch"])
    if payload["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["rng"]["cuda"])
    prebatch = [(v.to(device), ids) for v, ids in payload["prebatch"]]
    return payload["state"], prebatch


def save_adapter(model, folder: Path) -> None:
    """The LoRA adapter (or the whole model with full fine-tuning), as peft / transformers save it."""
    with atomic_path(folder) as tmp:
        model.save_pretrained(tmp)
