"""A self-test of llama.cpp in a child process before this environment first uses it in-process.

A llama.cpp built for instructions the machine does not grant dies by a signal (SIGILL) with no message,
and takes the whole kalmkg command with it. So the first use runs `selftest` in a child: load the
embedded GGUF, decode a few tokens, embed a text. A child killed by a signal becomes one error line
naming the signal, the CPU and the command that rebuilds llama.cpp for it. A healthy verdict is cached,
keyed by the hash of the llama.cpp library files and the CPU's identity, so later commands pay a hash.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from kalmkg.errors import KalmkgError

SELFTEST_MODULE = "kalmkg.llamacpp.selftest"
TIMEOUT_S = 300


@dataclass
class Verdict:
    healthy: bool
    key: str
    detail: str  # what failed, or the library's system info when healthy
    seconds: float
    cached: bool = False


def library_files() -> list[Path]:
    """llama-cpp-python's shared libraries, found without importing it (importing loads them)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise KalmkgError("llama-cpp-python is not installed: run `python -m kalmkg.llamacpp.build` "
                          "(what `make install` does)")
    lib = Path(next(iter(spec.submodule_search_locations))) / "lib"
    files = sorted(p for p in lib.glob("*") if p.is_file() and (".so" in p.name or p.suffix in (".dylib", ".dll")))
    # wheels hold no symlinks: libllama.so.0 and .so.0.5.0 are copies of libllama.so, hashed once
    plain = [p for p in files if p.suffix in (".so", ".dylib", ".dll")]
    return plain or files


def cpu_identity() -> str:
    """Model and advertised feature flags: a verdict for one CPU says nothing about another."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name in ("model name", "flags", "features", "cpu implementer", "cpu part") and name not in fields:
                fields[name] = value.strip()
    except OSError:
        pass
    return json.dumps([platform.machine(), platform.processor(), sorted(fields.items())])


def verdict_key(files: list[Path] | None = None) -> str:
    digest = hashlib.sha256(cpu_identity().encode())
    for path in files if files is not None else library_files():
        digest.update(path.name.encode())
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:24]


def verdict_dir() -> Path:
    from kalmkg.cache import cache_root

    return cache_root() / "llama-selftest"


def cached_verdict(key: str) -> Verdict | None:
    try:
        data = json.loads((verdict_dir() / f"{key}.json").read_text())
        return Verdict(**{**data, "cached": True})
    except (OSError, ValueError, TypeError):
        return None


def _store(verdict: Verdict) -> None:
    folder = verdict_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".{verdict.key}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(asdict(verdict) | {"cached": False}))
        os.replace(tmp, folder / f"{verdict.key}.json")
    except OSError:
        pass  # a read-only cache only costs the self-test again next time


def _signal_name(returncode: int) -> str:
    try:
        sig = signal.Signals(-returncode)
    except ValueError:
        return f"signal {-returncode}"
    text = {signal.SIGILL: "illegal instruction", signal.SIGSEGV: "segmentation fault",
            signal.SIGBUS: "bus error", signal.SIGABRT: "abort", signal.SIGKILL: "killed",
            signal.SIGFPE: "floating-point exception"}.get(sig)
    return f"{sig.name} ({text})" if text else sig.name


def _cpu_summary() -> str:
    from kalmkg.llamacpp.build import cpu_model, read_build_record

    record = read_build_record()
    built = ("built for " + (" ".join(record["features"]) or "the baseline ISA")) if record \
        else "built by pip's default (-march=native)"
    advertised = []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                advertised = [f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "avx_vnni")]
                break
    except OSError:
        pass
    return f"CPU {cpu_model()}" + (f" advertises {' '.join(advertised)}" if advertised else "") + f"; llama.cpp {built}"


def run_selftest(command: list[str] | None = None, timeout: float = TIMEOUT_S) -> tuple[bool, str]:
    """(healthy, detail) of the self-test child; `command` replaces it (tests)."""
    from kalmkg.llamacpp.build import REBUILD_COMMAND

    cmd = command or [sys.executable, "-m", SELFTEST_MODULE]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, f"llama.cpp's self-test did not finish in {timeout:.0f} s"
    if proc.returncode < 0:
        return False, (f"llama.cpp crashed with {_signal_name(proc.returncode)} in its self-test; "
                       f"{_cpu_summary()}. Rebuild it for this machine: {REBUILD_COMMAND}")
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        return False, f"llama.cpp's self-test failed: {lines[-1][:300] if lines else f'exit {proc.returncode}'}"
    return True, proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""


def check(command: list[str] | None = None, *, use_cache: bool = True) -> Verdict:
    """The verdict for this environment: cached by library hash and CPU, else from a fresh self-test."""
    key = verdict_key()
    if use_cache and (hit := cached_verdict(key)) is not None:
        return hit
    t0 = time.perf_counter()
    healthy, detail = run_selftest(command)
    verdict = Verdict(healthy, key, detail, round(time.perf_counter() - t0, 2))
    if healthy:  # a failure is tried again next time: the cause may be outside the library
        _store(verdict)
    return verdict


def ensure_healthy(command: list[str] | None = None) -> None:
    """Raise KalmkgError (one line) unless llama.cpp passes its self-test here."""
    verdict = check(command)
    if not verdict.healthy:
        raise KalmkgError(verdict.detail)
