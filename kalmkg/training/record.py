"""A training run's record: its folder (new, or the one to resume), the config.toml that says how to
reproduce it, and its row in the store's run table (started, then finished or interrupted)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from kalmkg import runs
from kalmkg.errors import KalmkgError
from kalmkg.files import atomic_write_text
from kalmkg.store import Store
from kalmkg.training.checkpoint import has_checkpoint
from kalmkg.training.config import TrainConfig, saved_train_config
from kalmkg.workspace import Workspace


@dataclass
class RunFolder:
    path: Path
    run_id: str
    cfg: TrainConfig  # a resumed run's own saved config
    resuming: bool

    @property
    def checkpoint(self) -> Path:
        return self.path / "checkpoint"


def open_run(workspace: Workspace, cfg: TrainConfig, run_id: str | None, resume: str | None,
             dry_run: bool) -> RunFolder:
    """The folder of a new run (which must not exist yet, unless only dry-running), or of the run
    `resume` names with the config it was started with."""
    if resume is not None:
        path = runs.find_run(workspace, resume)
        folder = RunFolder(path, path.name, saved_train_config(runs.read_config(path)), resuming=True)
        if not has_checkpoint(folder.checkpoint):
            raise KalmkgError(f"run {folder.run_id} has no checkpoint to resume from")
        return folder
    run_id = run_id or runs.new_run_id(cfg.base)
    path = runs.run_dir(workspace, run_id)
    if path.exists() and not dry_run:
        raise KalmkgError(f"run folder {path} already exists (pick another --run-name or --resume it)")
    return RunFolder(path, run_id, cfg, resuming=False)


def write_config(run: RunFolder, resolved, graph_fingerprint: str, world_size: int) -> None:
    """config.toml: the training settings, the base model and graph they ran on, the environment."""
    import torch
    import transformers

    from kalmkg import __version__

    atomic_write_text(run.path / "config.toml", runs.config_to_toml({
        "train": runs.as_dict(run.cfg),
        "base": {"name": resolved.name, "path": str(resolved.path), "source": resolved.source,
                 "fingerprint": resolved.fingerprint},
        "graph": {"fingerprint": graph_fingerprint},
        "environment": {"kalmkg": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                        "world_size": world_size},
    }))


def record_start(workspace: Workspace, run: RunFolder, graph_fingerprint: str) -> None:
    # Store.edit, not a write in place: readers of the workspace never find the store locked
    with Store.edit(workspace) as store:
        store.add_run(run.run_id, run.cfg.base, str(run.path), graph_fingerprint, json.dumps(runs.as_dict(run.cfg)))


def record_end(workspace: Workspace, run: RunFolder, status: str, steps: int, best_metric: float | None) -> None:
    with Store.edit(workspace) as store:
        store.update_run(run.run_id, status=status, steps=steps, best_metric=best_metric)
