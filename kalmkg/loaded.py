"""Load the model a run trained (base + its LoRA adapter), or an untrained base, ready to encode.

Every user-level task after training (embed, predict, evaluate) starts here, so they all see the same
weights, tokenizer and entity texts (cut to the run's `max_entity_tokens` with the run's tokenizer),
and name the model by the same fingerprint: `run:<id>` for a run, `base:<weights fingerprint>` for an
untrained base. The entity index records that fingerprint (and a hash of the adapter files, which
change when a run is resumed) to tell when it was built by another model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from kalmkg import runs
from kalmkg.device import inference_precision, pick_device
from kalmkg.encode import GGUFEncoder, TorchEncoder
from kalmkg.errors import KalmkgError
from kalmkg.export.registry import list_exports
from kalmkg.models import EMBEDDED, describe_base, embedded_gguf, load_base, load_tokenizer, merged_model, resolve_base
from kalmkg.store import Store
from kalmkg.text import GraphTexts, store_entity_texts, store_relation_texts, truncate_texts
from kalmkg.training.config import saved_train_config, size_defaults
from kalmkg.workspace import Workspace

# Hash the adapter's bytes below this size (LoRA adapters: a few MB); above it (full fine-tunes) the
# files' sizes and modification times stand for their content.
_CONTENT_HASH_LIMIT = 256 << 20


@dataclass
class LoadedModel:
    """A model ready to encode views, and what identifies it.

    The weights load on first use of `model`: deciding whether the index is fresh, resolving names or
    running another backend (GGUF) needs only the tokenizer and the texts, and a 7B model takes a while.
    """

    tokenizer: Any  # None: entity texts are used uncut (tests with a fake encoder)
    raw_texts: list[str]  # per entity id: "name, description", not yet cut to max_entity_tokens
    relation_texts: list[str]  # the R relations, then their R inverses
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
    gguf: Path | None = None  # a base given as a GGUF file (embedded or .gguf): what the gguf backend runs
    precision: str = "fp32"  # the torch weights: "fp32" or "bf16" (device.inference_precision)
    loader: Callable[[], Any] | None = field(default=None, repr=False)
    _model: Any = field(default=None, repr=False)
    _texts: Any = field(default=None, repr=False)

    @property
    def model(self) -> Any:
        if self._model is None and self.loader is not None:
            self._model = self.loader()
            self._model.eval()
        return self._model

    @property
    def texts(self):
        """text.GraphTexts: every entity text cut to `max_entity_tokens` tokens (as training cut them),
        computed on first use: a single prediction needs one entity's text, and cutting 41k texts
        takes seconds."""
        if self._texts is None:
            cut = (truncate_texts(self.raw_texts, self.tokenizer, self.max_entity_tokens)
                   if self.tokenizer is not None and self.raw_texts else list(self.raw_texts))
            self._texts = GraphTexts(cut, list(self.relation_texts))
        return self._texts

    def entity_texts(self, ids) -> list[str]:
        """The texts of entities `ids`, cut as in `texts` (the same function, on just those texts)."""
        if self._texts is not None or self.tokenizer is None:
            return [self.texts.entities[i] for i in ids]

        raw = [self.raw_texts[i] for i in ids]
        return truncate_texts(raw, self.tokenizer, self.max_entity_tokens) if raw else []

    def entity_text(self, i: int) -> str:
        return self.entity_texts([i])[0]

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
               tables: tuple | None = None, tokenizer=None, precision: str = "auto", quantize: str = "none") -> LoadedModel:
    """The run's model (default: the latest run), or the untrained `base` when given.

    `tables` = (entity_table, relation_table, graph_fingerprint) saves reading the store again.
    `tokenizer` cuts the entity texts instead of the run's own (`ask` passes its GGUF's, so no
    transformers is loaded; the torch model then cannot be used). `precision`: the torch weights'
    (auto, fp32, bf16: `device.inference_precision`). `quantize`: an untrained base held as a run
    trained on it (a run's own base always loads as the run recorded).
    """
    if run is not None and base is not None:
        raise KalmkgError("give --run or --base, not both")
    device = pick_device(device)
    precision = inference_precision(device, precision)
    if tables is None:
        tables = read_tables(workspace)
    entity_table, relation_table, graph_fp = tables
    warnings: list[str] = []

    if base is not None:
        resolved = resolve_base(base)
        tokenizer = tokenizer or load_tokenizer(resolved.path, resolved.name)
        # texts cut as a run of this base trains them by default
        max_tokens = size_defaults(describe_base(resolved.path, resolved.fingerprint)[0]).max_entity_tokens
        fingerprint, weights, name, rdir = f"base:{resolved.fingerprint}", resolved.fingerprint, resolved.name, None
        latest = False
        gguf = _base_gguf(resolved)

        def loader():
            return load_base(resolved, dtype=torch_dtype(precision), device=device, quantize=quantize)[0]
    else:
        rdir = runs.find_run(workspace, run)
        latest = run is None or runs.latest_run(workspace).resolve() == rdir.resolve()
        config = runs.read_config(rdir)
        cfg = saved_train_config(config)
        adapter = rdir / "adapter"
        if not adapter.is_dir():
            raise KalmkgError(f"run {rdir.name} has no trained weights yet (no adapter/: it stopped before its "
                              f"first validation); `kalmkg train --resume {rdir.name}` finishes it")
        resolved = resolve_base(cfg.base, check=False)  # checked when the run was trained
        trained_on = config.get("base", {}).get("fingerprint")
        if trained_on and trained_on != resolved.fingerprint:
            warnings.append(f"the base model {cfg.base!r} changed since run {rdir.name} was trained "
                            f"(fingerprint {trained_on} -> {resolved.fingerprint}); its adapter may not fit")
        if config.get("graph", {}).get("fingerprint") not in (None, graph_fp):
            warnings.append(f"the graph changed since run {rdir.name} was trained; entities added since were "
                            "never seen in training")
        # the tokenizer exactly as training saved it (pad token set); the base's for older runs
        saved = rdir / "tokenizer"
        tokenizer = tokenizer or load_tokenizer(str(saved) if saved.is_dir() else resolved.path, rdir.name)
        max_tokens = cfg.max_entity_tokens
        fingerprint, weights, name = f"run:{rdir.name}", files_fingerprint(adapter), rdir.name
        gguf = None  # a run's GGUF is what `kalmkg export` writes (see make_encoder)

        def loader():
            if cfg.quantize != "none" and importlib.util.find_spec("bitsandbytes") is None:
                raise KalmkgError(f"run {rdir.name} trained on its base in {cfg.quantize} (--quantize), and uses it so: "
                                  "that needs the bitsandbytes package: pip install 'kalmkg[quantize]'")
            return merged_model(resolved, adapter, device, torch_dtype(precision), quantize=cfg.quantize)

    # the texts of text.graph_texts, cut lazily (LoadedModel.texts)
    raw, relations = store_entity_texts(entity_table), store_relation_texts(relation_table)
    return LoadedModel(tokenizer, raw, relations, fingerprint, weights, name, rdir, max_tokens, graph_fp, device, warnings,
                       entity_table["key"].to_pylist(), entity_table["label"].to_pylist(),
                       relation_table["key"].to_pylist(), relation_table["label"].to_pylist(),
                       base, latest, gguf, loader=loader, precision=precision)


def torch_dtype(precision: str):
    """The torch dtype of an inference precision ("fp32", "bf16"); imported only when weights load."""
    import torch

    return torch.bfloat16 if precision == "bf16" else torch.float32


def _base_gguf(resolved) -> Path | None:
    if resolved.source == "embedded":
        return embedded_gguf(resolved.spec.lower())
    if resolved.source == "gguf":
        return Path(resolved.spec).expanduser()
    return None


def read_tables(workspace: Workspace) -> tuple:
    """(entity_table, relation_table, graph fingerprint), read in one short store session."""
    with Store.open(workspace) as store:
        return store.entity_table(), store.relation_table(), store.fingerprint()


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
    return TorchEncoder(loaded.model, loaded.tokenizer, loaded.device)


BACKENDS = ("torch", "gguf")


def make_encoder(loaded: LoadedModel, backend: str = "torch", *, n_threads: int | None = None,
                 gguf: str | Path | None = None):
    """An Encoder (kalmkg.encode) for `loaded` on the chosen backend.

    gguf: an untrained base given as a GGUF (the embedded SmolLM2, a .gguf file) runs from that file; a
    run from its `kalmkg export` (`gguf` names one of models/, else the newest export of the run).
    Index, predict and evaluate only call `encode(texts, batch_size)`, so nothing else changes.
    """
    if backend == "torch":
        return torch_encoder(loaded)
    if backend == "gguf":
        path = loaded.gguf if loaded.is_base else find_export(loaded.run_dir, gguf)
        if path is None:
            raise KalmkgError(f"the gguf backend needs a GGUF: the base {loaded.name} is not one; "
                              "use --backend torch")
        return GGUFEncoder(path, loaded.tokenizer, n_threads=n_threads)
    raise KalmkgError(f"unknown backend '{backend}'; use one of: {', '.join(BACKENDS)}")


def gguf_first_encoder(workspace: Workspace, *, run: str | None = None, base: str | None = None,
                       gguf: str | Path | None = None, n_threads: int | None = None) -> GGUFEncoder | None:
    """The GGUF encoder of a run's export (or of a base that is a GGUF file), opened before the model is
    loaded: `load_model(tokenizer=encoder.text_tokenizer())` then cuts the texts with the GGUF's own
    tokenizer, and neither torch nor transformers is imported (a cold `kalmkg predict --backend gguf`).
    None for a base that is no GGUF (a Hugging Face folder or hub id)."""
    if base is None:
        return GGUFEncoder(find_export(runs.find_run(workspace, run), gguf), n_threads=n_threads)
    spec = base.strip()
    path = embedded_gguf(spec.lower()) if spec.lower() in EMBEDDED else Path(spec).expanduser()
    return GGUFEncoder(path, n_threads=n_threads) if path.suffix.lower() == ".gguf" and path.is_file() else None


def find_export(run_dir: Path, name: str | Path | None = None) -> Path:
    """The GGUF `kalmkg export` wrote for the run (models/<name>.gguf with models/<name>.json beside it):
    the one named, else the newest. Refused when the run's adapter is newer than the file (a resumed run)."""
    run_id = run_dir.name
    models = run_dir.parent.parent / "models"
    if name is not None:
        path = Path(name)
        if not path.is_file():
            path = models / (path.name if path.suffix == ".gguf" else f"{path.name}.gguf")
        if not path.is_file():
            raise KalmkgError(f"no GGUF '{name}' in {models}")
        candidates = [path]
    else:
        candidates = [gguf for gguf, info in list_exports(models) if info.get("run_id") == run_id]
        if not candidates:
            raise KalmkgError(f"the gguf backend needs a GGUF of run {run_id}: run "
                              f"`kalmkg export --run {run_id}` (or use --backend torch)")
    path = max(candidates, key=lambda p: p.stat().st_mtime)
    adapter = run_dir / "adapter"
    newest = max((p.stat().st_mtime for p in adapter.rglob("*") if p.is_file()), default=0.0)
    if newest > path.stat().st_mtime:
        raise KalmkgError(f"run {run_id}'s weights changed after {path.name} was exported; run "
                          f"`kalmkg export --run {run_id}` again")
    return path
