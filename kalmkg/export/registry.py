"""What `kalmkg export` leaves in a models folder, and how it is named: models/<name>.gguf with
models/<name>.json beside it (and models/<name>.Modelfile with --ollama), describing the run it was made
of. The export writes these files, `kalmkg predict --backend gguf` and `kalmkg ask` find them here.
Model-free: no torch, no llama.cpp."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kalmkg import __version__
from kalmkg import text
from kalmkg.errors import KalmkgError
from kalmkg.models import ResolvedBase
from kalmkg.system import installed_version
from kalmkg.training.config import saved_train_config

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_name(name: str | None) -> str | None:
    """`--name` as the stem of models/<name>.gguf (a trailing .gguf is dropped); None stays None."""
    if name is None:
        return None
    name = name.strip()
    if name.lower().endswith(".gguf"):
        name = name[: -len(".gguf")]
    if not _NAME.match(name):
        raise KalmkgError(f"invalid model name {name!r}: use letters, digits, '.', '_' and '-' "
                          "(it names models/<name>.gguf)")
    return name


def default_name(run_id: str, quant: str) -> str:
    return f"{run_id}-{quant}"


@dataclass(frozen=True)
class ExportTarget:
    """One export's files in the models folder."""

    folder: Path
    name: str
    quant: str
    ollama: bool = False  # write a Modelfile too

    @property
    def gguf(self) -> Path:
        return self.folder / f"{self.name}.gguf"

    @property
    def metadata(self) -> Path:
        return self.folder / f"{self.name}.json"

    @property
    def modelfile(self) -> Path:
        """Where the Modelfile of this name lies (written only with ``ollama``)."""
        return self.folder / f"{self.name}.Modelfile"


@dataclass(frozen=True)
class ExportSource:
    """The trained run an export is made of, and the base its adapter is merged into."""

    folder: Path  # the run folder
    config: dict  # its config.toml as runs.read_config reads it
    base: ResolvedBase
    n_params: int
    architecture: str  # the base's transformers class, e.g. LlamaForCausalLM

    @property
    def run_id(self) -> str:
        return self.folder.name

    @property
    def graph_fingerprint(self) -> str:
        return str(self.config.get("graph", {}).get("fingerprint", ""))

    @property
    def max_entity_tokens(self) -> int:
        return saved_train_config(self.config).max_entity_tokens

    def embedding(self) -> dict[str, Any]:
        """How training embedded texts: what a consumer of the GGUF alone must repeat."""
        return {"pooling": "last", "normalize": True, "add_bos": False, "max_entity_tokens": self.max_entity_tokens,
                "templates": {"hr": text.HR_TEMPLATE, "tail": text.TAIL_TEMPLATE,
                              "inverse": text.INVERSE_TEMPLATE}}


@dataclass(frozen=True)
class ExportOutcome:
    """What the export measured of the file it made: its size, its verification, each stage's seconds."""

    size_bytes: int
    verification: dict[str, Any]  # Verification.as_dict()
    seconds: dict[str, float]


def export_record(run: ExportSource, target: ExportTarget, outcome: ExportOutcome) -> dict[str, Any]:
    """The models/<name>.json of an export (what `list_exports` reads back)."""
    return {
        "name": target.name,
        "file": target.gguf.name,
        "format": "gguf",
        "quantization": target.quant,
        "size_bytes": outcome.size_bytes,
        "n_params": run.n_params,
        "architecture": run.architecture,
        "run_id": run.run_id,
        "run_dir": str(run.folder),
        "graph_fingerprint": run.graph_fingerprint,
        "base": {"name": run.base.name, "spec": run.base.spec, "source": run.base.source,
                 "fingerprint": run.base.fingerprint},
        "embedding": run.embedding(),
        "verification": outcome.verification,
        "seconds": outcome.seconds,
        "ollama_modelfile": target.modelfile.name if target.ollama else None,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": {"kalmkg": __version__, "llama-cpp-python": installed_version("llama-cpp-python"),
                     "gguf": installed_version("gguf")},
    }


def list_exports(models: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Every `kalmkg export` in a models folder, as (GGUF path, its models/<name>.json), newest first.
    A JSON file that cannot be read, whose GGUF is gone, or whose GGUF is not the size it records, is
    skipped."""
    found = []
    for meta in sorted(models.glob("*.json")) if models.is_dir() else []:
        try:
            info = json.loads(meta.read_text())
        except (OSError, ValueError):
            continue
        gguf = models / str(info.get("file", "")) if isinstance(info, dict) else models
        # a record beside a GGUF of another size describes an export replaced half-way: not this file
        if gguf.suffix == ".gguf" and gguf.is_file() and info.get("size_bytes") in (None, gguf.stat().st_size):
            found.append((gguf, info))
    return sorted(found, key=lambda x: x[0].stat().st_mtime, reverse=True)
