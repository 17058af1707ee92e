"""The run an export is made of: found with its trained weights, its base resolved and described (from
the config alone, before any weights load), merged into a plain float32 model and saved as a Hugging Face
folder for llama.cpp's converter. Torch and transformers are imported inside the functions."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from kalmkg import runs
from kalmkg.errors import KalmkgError
from kalmkg.export.registry import ExportSource
from kalmkg.models import ResolvedBase, describe_base, load_tokenizer, merged_model, resolve_base
from kalmkg.workspace import Workspace


def trained_run(workspace: Workspace, run: str | None) -> tuple[Path, dict]:
    """(folder, config) of run ``run`` (default: the latest), refused while it has no weights."""
    rdir = runs.find_run(workspace, run)  # "no training run ... (run `kalmkg train` first)"
    config = runs.read_config(rdir)
    if not (rdir / "adapter").is_dir():
        raise KalmkgError(f"run {rdir.name} has no trained weights yet (no adapter/): run `kalmkg train` first "
                          "and let it reach its first validation or its end")
    return rdir, config


def describe_run(rdir: Path, config: dict, warn: Callable[[str], None]) -> ExportSource:
    """The run with its base resolved and described; ``warn`` hears of a base that changed since training."""
    base = _resolve_run_base(config, warn)
    n_params, architecture, _ = describe_base(base.path)
    return ExportSource(rdir, config, base, n_params, architecture)


def _resolve_run_base(config: dict, warn: Callable[[str], None]) -> ResolvedBase:
    """The run's base model: by the spec it was trained with, else by the folder recorded in the run."""
    spec = str(config.get("train", {}).get("base") or "")
    recorded = config.get("base", {})
    try:
        resolved = resolve_base(spec)
    except KalmkgError:
        path = recorded.get("path")
        if not path or not Path(path).is_dir():
            raise
        resolved = resolve_base(path)  # e.g. a relative --base given from another directory
    if recorded.get("fingerprint") and recorded["fingerprint"] != resolved.fingerprint:
        warn(f"the base model {resolved.name} differs from the one the run was trained on "
             f"(fingerprint {resolved.fingerprint} vs {recorded['fingerprint']}); merging anyway")
    return resolved


def merge(run: ExportSource) -> tuple[Any, Any]:
    """The base in float32 with the run's LoRA folded into its weights (a plain transformers model), and
    the tokenizer the run trained with (pad token included; the base's for runs that saved none). A run
    trained on a quantized base (--quantize) merges into the full-precision base too, as QLoRA deploys."""
    model = merged_model(run.base, run.folder / "adapter")
    saved = run.folder / "tokenizer"
    tokenizer = load_tokenizer(saved if saved.is_dir() else run.base.path, run.run_id)
    model.eval()
    return model, tokenizer


def save_hf(model, tokenizer, folder: Path) -> Path:
    """Weights (float32, so F16 is rounded once, by the converter) + tokenizer + chat template."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
