"""What is installed where, and on which CPU: the facts the build step and the self-test share.

Standard library only (and kalmkg.errors): the build step imports it before kalmkg's dependencies are
installed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import sys
from pathlib import Path

from kalmkg.errors import KalmkgError


def rebuild_command(extra: str = "") -> str:
    """The command that rebuilds llama.cpp into *this* environment (a bare `python` may be another one)."""
    return f"{sys.executable} -m kalmkg.llamacpp.build --force{extra}"


def _cpuinfo() -> dict[str, str]:
    """Each /proc/cpuinfo field's first value (the first CPU's), names lower-cased; {} without the file."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, sep, value = line.partition(":")
            if sep:
                fields.setdefault(name.strip().lower(), value.strip())
    except OSError:
        pass
    return fields


def cpu_model() -> str:
    fields = _cpuinfo()
    for name in ("model name", "hardware", "cpu model"):
        if fields.get(name):
            return fields[name]
    return platform.processor() or platform.machine()


def advertised_flags() -> set[str] | None:
    """The CPU flags the kernel lists in /proc/cpuinfo (x86 `flags`, arm64 `Features`), or None without it."""
    fields = _cpuinfo()
    value = fields.get("flags", fields.get("features"))
    return set(value.split()) if value is not None else None


def simd_flags() -> list[str]:
    """The advertised flags llama.cpp's kernels care about (vector and matrix extensions), sorted."""
    return sorted(f for f in advertised_flags() or ()
                  if f in ("sse4_2", "avx", "avx2", "fma", "f16c", "bmi2", "avx_vnni")
                  or f.startswith(("avx512", "amx", "asimd", "sve", "i8mm")))


def file_sha256(path: Path, digest=None):
    """`digest` (a new sha256 by default) updated with the file's bytes, read in 1 MiB blocks."""
    digest = digest if digest is not None else hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest


def library_files() -> list[Path]:
    """llama-cpp-python's shared libraries (all of them: libllama.so loads libggml.so.0, not libggml.so),
    found without importing it (importing loads them); $LLAMA_CPP_LIB_PATH as llama-cpp-python honours it."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise KalmkgError("llama-cpp-python is not installed: run `python -m kalmkg.llamacpp.build` "
                          "(what `make install` does)")
    lib = Path(os.environ.get("LLAMA_CPP_LIB_PATH") or Path(next(iter(spec.submodule_search_locations))) / "lib")
    files = sorted(p for p in lib.glob("*") if p.is_file() and (".so" in p.name or p.suffix in (".dylib", ".dll")))
    if not files:
        raise KalmkgError(f"llama-cpp-python has no libraries in {lib}: reinstall it with "
                          "`python -m kalmkg.llamacpp.build --force`")
    return files


def stat_signature(files: list[Path]) -> str:
    """Cheap identity of the library files (name, size, mtime, inode): changes whenever pip replaces them."""
    rows = []
    for p in files:
        st = p.stat()
        rows.append([str(p), st.st_size, st.st_mtime_ns, st.st_ino])
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:24]


def cpu_identity() -> str:
    """Model and advertised feature flags: a verdict for one CPU says nothing about another."""
    fields = _cpuinfo()
    keep = sorted((k, fields[k]) for k in ("model name", "flags", "features", "cpu implementer", "cpu part")
                  if k in fields)
    return json.dumps([platform.machine(), platform.processor(), keep])


def converter_dir() -> Path:
    """Where the converter is installed: inside this environment, so it leaves with it."""
    return Path(sys.prefix) / "share" / "kalmkg" / "llama-converter"


def build_record_path() -> Path:
    return Path(sys.prefix) / "share" / "kalmkg" / "llama-build.json"


def read_build_record() -> dict | None:
    """What `install` recorded, or None when the installed library is no longer the one it installed
    (a later `pip install llama-cpp-python` replaced it)."""
    try:
        record = json.loads(build_record_path().read_text())
        return record if record.get("library") == stat_signature(library_files()) else None
    except Exception:  # no record, a broken one, or no llama-cpp-python at all
        return None
