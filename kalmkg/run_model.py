"""Load the model a run trained (base + its LoRA adapter), or an untrained base, ready to encode.

Every user-level task after training (embed, predict, evaluate) starts here, so they all see the same
weights, tokenizer and entity texts (cut to the run's `max_entity_tokens` with the run's tokenizer),
and name the model by the same fingerprint: `run:<id>` for a run, `base:<weights fingerprint>` for an
untrained base. The entity index records that fingerprint (and a hash of the adapter files, which
change when a run is resumed) to tell when it was built by another model.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kalmkg.errors import KalmkgError
from kalmkg.workspace import Workspace

# Hash the adapter's bytes below this size (LoRA adapters: a few MB); above it (full fine-tunes) the
# files' sizes and modification times stand for their content.
_CONTENT_HASH_LIMIT = 256 << 20


@dataclass
class LoadedModel:
    """A model ready to encode views, and what identifies it."""

    model: Any
    tokenizer: Any
    texts: Any  # dataset.GraphTexts: entity texts (cut) and relation texts (R, then the R inverses)
    fingerprint: str  # "run:<id>" or "base:<fingerprint of the base weights>"
    weights: str  # a hash of the weight files (adapter or base): changes when a run is resumed
    name: str  # the run id, or the base model's name
    run_dir: Path | None  # None for an untrained base
    max_entity_tokens: int
    graph_fingerprint: str  # Store.fingerprint() when the texts were read
    device: str = "cpu"
    warnings: list[str] = field(default_factory=list)
    # by id, from the store (for output rows and index rows)
    entity_keys: list[str] = field(default_factory=list)
    entity_labels: list[str] = field(default_factory=list)
    relation_keys: list[str] = field(default_factory=list)
    relation_labels: list[str] = field(default_factory=list)
    base_spec: str | None = None  # what --base named (an untrained base only)
    latest: bool = False  # the workspace's latest run (what commands pick without --run)

    @property
    def is_base(self) -> bool:
        return self.run_dir is None

    @property
    def selector(self) -> str:
        """The CLI option that picks this model again (for messages)."""
        return f"--base {self.base_spec or self.name}" if self.is_base else f"--run {self.name}"

    def embed_command(self) -> str:
        """`kalmkg embed` with the option that picks this model (none for the latest run)."""
        return "kalmkg embed" if self.latest else f"kalmkg embed {self.selector}"


def load_model(workspace: Workspace, *, run: str | None = None, base: str | None = None, device: str = "cpu",
               tables: tuple | None = None) -> LoadedModel:
    """The run's model (default: the latest run), or the untrained `base` when given.

    `tables` = (entity_table, relation_table, graph_fingerprint) saves reading the store again.
    """
    from kalmkg.dataset import load_texts
    from kalmkg.models import load_base, resolve_base
    from kalmkg.train import TrainConfig, pick_device

    if run is not None and base is not None:
        raise KalmkgError("give --run or --base, not both")
    device = pick_device(device)
    if tables is None:
        tables = read_tables(workspace)
    entity_table, relation_table, graph_fp = tables
    warnings: list[str] = []

    if base is not None:
        resolved = resolve_base(base)
        model, tokenizer = load_base(resolved, device=device)
        max_tokens = TrainConfig.max_entity_tokens
        fingerprint, weights, name, rdir = f"base:{resolved.fingerprint}", resolved.fingerprint, resolved.name, None
        latest = False
    else:
        from kalmkg import runs

        rdir = runs.find_run(workspace, run)
        latest = run is None or runs.latest_run(workspace).resolve() == rdir.resolve()
        config = runs.read_config(rdir)
        cfg = runs.dataclass_from(TrainConfig, config.get("train", {}))
        adapter = rdir / "adapter"
        if not adapter.is_dir():
            raise KalmkgError(f"run {rdir.name} has no trained weights yet (no adapter/: it stopped before its "
                              f"first validation); `kalmkg train --resume {rdir.name}` finishes it")
        resolved = resolve_base(cfg.base)
        trained_on = config.get("base", {}).get("fingerprint")
        if trained_on and trained_on != resolved.fingerprint:
            warnings.append(f"the base model {cfg.base!r} changed since run {rdir.name} was trained "
                            f"(fingerprint {trained_on} -> {resolved.fingerprint}); its adapter may not fit")
        if config.get("graph", {}).get("fingerprint") not in (None, graph_fp):
            warnings.append(f"the graph changed since run {rdir.name} was trained; entities added since were "
                            "never seen in training")
        model, tokenizer = _load_trained(resolved, adapter, device)
        saved_tok = rdir / "tokenizer"
        if saved_tok.is_dir():  # the tokenizer exactly as training used it (pad token set)
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(saved_tok)
            tokenizer.padding_side = "right"
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
        max_tokens = cfg.max_entity_tokens
        fingerprint, weights, name = f"run:{rdir.name}", files_fingerprint(adapter), rdir.name

    model.eval()
    texts = load_texts(entity_table, relation_table, tokenizer, max_tokens)
    return LoadedModel(model, tokenizer, texts, fingerprint, weights, name, rdir, max_tokens, graph_fp, device,
                       warnings, entity_table["key"].to_pylist(), entity_table["label"].to_pylist(),
                       relation_table["key"].to_pylist(), relation_table["label"].to_pylist(), base, latest)


def read_tables(workspace: Workspace) -> tuple:
    """(entity_table, relation_table, graph fingerprint), read in one short store session."""
    from kalmkg.store import Store

    with Store.open(workspace) as store:
        return store.entity_table(), store.relation_table(), store.fingerprint()


def _load_trained(resolved, adapter: Path, device: str):
    """Base + LoRA adapter merged into plain weights (no LoRA matmuls at inference: faster, and the same
    weights `kalmkg export` merges), or a full fine-tune saved in place of the adapter."""
    from kalmkg.models import load_base

    if (adapter / "adapter_config.json").is_file():
        from peft import PeftModel

        model, tokenizer = load_base(resolved, device=device)
        try:
            model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
        except (ValueError, KeyError, RuntimeError) as e:
            raise KalmkgError(f"cannot apply the adapter in {adapter}: {str(e).splitlines()[0]}") from e
        return model.to(device), tokenizer
    if (adapter / "config.json").is_file():  # `--full` fine-tuning saves the whole model there
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(adapter, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(resolved.path)  # replaced by the run's own when saved
        return model.to(device), tokenizer
    raise KalmkgError(f"{adapter} holds neither a LoRA adapter nor a model")


def files_fingerprint(folder: Path) -> str:
    """A short hash of the files in `folder` (content for small folders, size and mtime for large ones)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in files)
    h = hashlib.sha256()
    for p in files:
        h.update(str(p.relative_to(folder)).encode())
        if total <= _CONTENT_HASH_LIMIT:
            h.update(p.read_bytes())
        else:
            st = p.stat()
            h.update(f":{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def safe_name(name: str) -> str:
    """A model name as a folder name (evals/base-<name>/)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-.") or "model"


def torch_encoder(loaded: LoadedModel):
    """The torch backend of the Encoder interface for a loaded model."""
    from kalmkg.encode import TorchEncoder

    return TorchEncoder(loaded.model, loaded.tokenizer, loaded.device)


BACKENDS = ("torch", "gguf")


def make_encoder(loaded: LoadedModel, backend: str = "torch"):
    """An Encoder (kalmkg.encode) for `loaded` on the chosen backend.

    Extension point for the llama.cpp backend: once `kalmkg export` writes `models/<run>-<quant>.gguf`,
    the "gguf" branch opens it with pooling LLAMA_POOLING_TYPE_LAST and embeddings on, tokenizes without
    BOS (as the torch side does: `add_special_tokens=False`) and L2-normalises; it must return vectors
    of the same width in input order, like TorchEncoder.encode. Index and predict code only call
    `encode(texts, batch_size)`, so nothing else changes.
    """
    if backend == "torch":
        return torch_encoder(loaded)
    if backend == "gguf":
        raise KalmkgError(f"the gguf backend needs a GGUF export of {loaded.name} "
                          "(`kalmkg export`), which does not exist yet; use --backend torch")
    raise KalmkgError(f"unknown backend '{backend}'; use one of: {', '.join(BACKENDS)}")
