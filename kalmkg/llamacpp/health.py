"""A self-test of llama.cpp in a child process before this environment first uses it in-process.

A llama.cpp built for instructions the machine does not grant dies by a signal (SIGILL) with no message,
and takes the whole kalmkg command with it. So the first use runs `selftest` in a child: load the
embedded GGUF, decode a few tokens, embed a text. A child killed by a signal becomes one error line
naming the signal, the CPU and the command that rebuilds llama.cpp for it. A healthy verdict is cached,
keyed by the hash of the llama.cpp library files and the CPU's identity, so later commands pay a hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from kalmkg.errors import KalmkgError
from kalmkg.llamacpp.environment import (
    cpu_identity, cpu_model, file_sha256, library_files, read_build_record, rebuild_command, simd_flags,
    stat_signature,
)

SELFTEST_MODULE = "kalmkg.llamacpp.selftest"
TIMEOUT_S = 300


@dataclass
class Verdict:
    healthy: bool
    key: str
    detail: str  # what failed, or the library's system info when healthy
    seconds: float
    cached: bool = False


def content_hash(files: list[Path]) -> str:
    """sha256 of the library files' bytes; remembered by their stat signature, so a command that finds
    them unchanged pays a few stat calls instead of hashing tens (CUDA: hundreds) of MB."""
    memo = verdict_dir() / "library-hashes.json"
    sig = stat_signature(files)
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known, dict) and isinstance(known.get(sig), str):
        return known[sig]
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode())
        file_sha256(path, digest)
    value = digest.hexdigest()
    _write_json(memo, {**(known if isinstance(known, dict) else {}), sig: value})
    return value


def verdict_key(files: list[Path] | None = None) -> str:
    """The verdict's key: the library files' content and the CPU's identity."""
    digest = hashlib.sha256(cpu_identity().encode())
    digest.update(content_hash(files if files is not None else library_files()).encode())
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


def _write_json(path: Path, data) -> None:
    """Atomic (write, then rename): concurrent commands read the old file or the new one."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache only costs the work again next time


def _store(verdict: Verdict) -> None:
    _write_json(verdict_dir() / f"{verdict.key}.json", asdict(verdict) | {"cached": False})


def _signal_name(returncode: int) -> str:
    try:
        sig = signal.Signals(-returncode)
    except ValueError:
        return f"signal {-returncode}"
    text = {signal.SIGILL: "illegal instruction", signal.SIGSEGV: "segmentation fault",
            signal.SIGBUS: "bus error", signal.SIGABRT: "abort", signal.SIGKILL: "killed",
            signal.SIGFPE: "floating-point exception"}.get(sig)
    return f"{sig.name} ({text})" if text else sig.name


def _crash_advice() -> str:
    """The CPU, what the library was built for, and the command that fixes it."""
    record = read_build_record()
    advertised = simd_flags()
    cpu = f"CPU {cpu_model()}" + (f" advertises {' '.join(advertised)}" if advertised else "")
    if record is None:
        return f"{cpu}; llama.cpp was built by pip's default (-march=native). Rebuild it for this machine: {rebuild_command()}"
    built = " ".join(record.get("features") or []) or "the baseline instruction set"
    # kalmkg's own build already ran each extension here: leave out the widest ones to find the culprit
    suspects = [f for f in ("amx", "avx512bf16", "avx512vnni", "avx512vbmi", "avx512f") if f in (record.get("features") or [])]
    hint = f" (if it crashes again: {rebuild_command(' --disable ' + ','.join(suspects))})" if suspects else ""
    return f"{cpu}; llama.cpp was built here for {built}. Rebuild it for this machine: {rebuild_command()}{hint}"


def run_selftest(command: list[str] | None = None, timeout: float = TIMEOUT_S) -> tuple[bool, str]:
    """(healthy, detail) of the self-test child; `command` replaces it (tests)."""
    import kalmkg

    cmd = command or [sys.executable, "-m", SELFTEST_MODULE]
    # run from kalmkg's own folder: `-m` puts the working directory first on sys.path, and a folder holding
    # another llama_cpp/ would test a library other than the one whose hash keys the verdict
    home = Path(kalmkg.__file__).resolve().parents[1]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", timeout=timeout, cwd=home)
    except subprocess.TimeoutExpired:
        return False, f"llama.cpp's self-test did not finish in {timeout:.0f} s"
    if proc.returncode < 0:
        return False, f"llama.cpp crashed with {_signal_name(proc.returncode)} in its self-test; {_crash_advice()}"
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
