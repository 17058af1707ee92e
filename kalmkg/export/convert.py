"""Hugging Face folder -> F16 GGUF by llama.cpp's own converter (a subprocess), and F16 GGUF -> a
quantized one by llama-cpp-python's ``llama_model_quantize``. The converter and its architectures are
found here too, so an export fails before its long merge when they are missing. llama_cpp is imported
inside the functions."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from kalmkg.errors import KalmkgError
from kalmkg.llamacpp import runtime
from kalmkg.llamacpp.environment import converter_dir
from kalmkg.system import installed_version

QUANT_TYPES = ("F16", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M")
SMALL_MODEL_PARAMS = 1_000_000_000  # below: default Q8_0 (size hardly matters), above: Q4_K_M


def check_quant(quant: str | None) -> str | None:
    """`--quant` as one of QUANT_TYPES (any case); None stays None (see default_quant)."""
    if quant is None:
        return None
    q = quant.strip().upper()
    if q not in QUANT_TYPES:
        raise KalmkgError(f"unknown quantization type {quant!r}; use one of: {', '.join(QUANT_TYPES)}")
    return q


def default_quant(n_params: int) -> str:
    return "Q8_0" if n_params < SMALL_MODEL_PARAMS else "Q4_K_M"


# ---------------------------------------------------------------------------------------- the converter


def _converter_script() -> Path:
    """llama.cpp's convert_hf_to_gguf.py, installed apart from the environment's packages by the llama.cpp
    build step (it brings its own copy of `gguf`; see kalmkg.llamacpp.build)."""
    return converter_dir() / "convert_hf_to_gguf.py"


def _converter_name() -> str:
    return f"llama.cpp's converter (from llama-cpp-python {installed_version('llama-cpp-python')})"


def require_converter() -> None:
    import importlib.util

    if importlib.util.find_spec("llama_cpp") is None or not _converter_script().is_file():
        raise KalmkgError("the GGUF export needs llama.cpp and its converter: run "
                          "`python -m kalmkg.llamacpp.build` (what `make install` does)")


def check_architecture(architecture: str, base_name: str) -> None:
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


def convert(hf_dir: Path, out: Path, name: str, base_name: str) -> None:
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
    raise KalmkgError(f"llama.cpp's converter failed (exit {proc.returncode}): {last_error_line(log)}")


def last_error_line(log: str) -> str:
    """The converter's line that says what went wrong (progress bars skipped), else its last line."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip() and "%|" not in ln]
    for ln in reversed(lines):
        if re.search(r"error|exception|not supported|cannot|failed", ln, re.I):
            return ln[:300]
    return lines[-1][:300] if lines else "no output"


# --------------------------------------------------------------------------------------------- quantize


def quantize(src: Path, dst: Path, quant: str) -> None:
    import ctypes

    llama_cpp = runtime.load()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{quant}")
    with llama_log() as log:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0 or not dst.is_file():
        lines = [ln.strip() for ln in log if ln.strip()]
        why = next((ln for ln in reversed(lines) if "fail" in ln.lower() or "error" in ln.lower()),
                   lines[-1] if lines else "no message")
        raise KalmkgError(f"quantizing to {quant} failed: {why[:300]}")


@contextmanager
def llama_log() -> Iterator[list[str]]:
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
