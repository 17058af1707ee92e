"""Crash safety, tested by killing: `ingest`, `train`, `embed` and `export` are started as a user starts
them and killed with SIGKILL (the whole process group: no clean-up runs) at points drawn with a fixed seed
over each command's measured duration, KALMKG_KILLS times each (20). After every kill the workspace is
checked as the next command would find it, and the next command is the chain's next run (a resume, a
retry): it must work from whatever the kill left. At the end the result must be the one an uninterrupted
command gives: the same triples, the same trained weights, the same entity vectors, a complete export.
Each test prints how many runs were killed and how many ended before their kill came."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from helpers_graph import SAMPLE_TTL, cli_env

KILLS = int(os.environ.get("KALMKG_KILLS", "20"))
pytestmark = pytest.mark.slow


def _start(args) -> subprocess.Popen:
    """`kalmkg ARGS` in its own process group; stderr to a file (a pipe nobody reads could stall it)."""
    err = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "kalmkg", *[str(a) for a in args]], stdout=subprocess.DEVNULL,
                            stderr=err, env=cli_env(), start_new_session=True)
    proc.err_file = err
    return proc


def _stderr(proc) -> str:
    proc.err_file.seek(0)
    text = proc.err_file.read().decode(errors="replace")
    proc.err_file.close()
    return text


def _run(args) -> float:
    """Run to the end; its wall time."""
    t0 = time.perf_counter()
    proc = _start(args)
    proc.wait(timeout=600)
    assert proc.returncode == 0, _stderr(proc)[-2000:]
    _stderr(proc)
    return time.perf_counter() - t0


def _kill_after(args, delay: float, killed_while=None) -> bool:
    """Start `kalmkg ARGS` and SIGKILL its process group after `delay` seconds (or as soon as
    `killed_while()` is true, with delay as the longest wait). True when it was killed; False when it
    ended first (then it must have ended well)."""
    proc = _start(args)
    deadline = time.perf_counter() + delay
    while time.perf_counter() < deadline and proc.poll() is None:
        if killed_while is not None and killed_while():
            break
        time.sleep(0.001 if killed_while is not None else 0.01)
    if proc.poll() is not None:
        err = _stderr(proc)
        assert proc.returncode == 0, err[-2000:]
        return False
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    _stderr(proc)
    return True


def _report(what: str, killed: int, ended: int) -> None:
    print(f"\n{what}: {killed} runs killed, {ended} ended before their kill")


def _staging(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) if folder.is_dir() else []


# ------------------------------------------------------------------------------------------------ ingest
def _store_state(ws: Path) -> tuple[int, set[str]]:
    from kalmkg.store import Store
    from kalmkg.workspace import Workspace

    with Store.open(Workspace(ws)) as store:
        triples = store.con.execute("SELECT count(*) FROM triples").fetchone()[0]
        sources = {row[0] for row in store.con.execute("SELECT source FROM ingests").fetchall()}
    return triples, sources


def test_ingest_killed_at_random_points_stores_each_file_whole_or_not_at_all(tmp_path):
    ws, n = tmp_path / "ws", 40_000
    _run(["-w", ws, "ingest", SAMPLE_TTL])
    files = []
    for i in range(KILLS):
        path = tmp_path / f"part{i:02d}.tsv"
        path.write_text("".join(f"n{i}_{j}\tlinks\tn{i}_{j + 1}\n" for j in range(n)))
        files.append(path)
    probe = tmp_path / "probe"
    shutil.copytree(ws, probe)
    duration = _run(["-w", probe, "ingest", files[0]])
    rng = np.random.default_rng(0)
    triples, sources = _store_state(ws)
    killed = ended = 0
    for path in files:
        if _kill_after(["-w", ws, "ingest", path], rng.uniform(0.2, 1.0) * duration):
            killed += 1
        else:
            ended += 1
        now, now_sources = _store_state(ws)  # the store opens after every kill
        new = now_sources - sources
        assert len(new) <= 1 and all(src.endswith(path.name) for src in new)  # this file's record, if any
        assert now == triples + (n if new else 0)  # the file's triples and its record, both or neither
        triples, sources = now, now_sources
    _run(["-w", ws, "ingest", *files])  # the next command: what is in is skipped, the rest goes in
    assert _store_state(ws)[0] == _store_state(probe)[0] - n + KILLS * n
    _report("ingest", killed, ended)
    assert killed >= KILLS // 2


# ------------------------------------------------------------------------------------------------- train
def _trainable(run_dir: Path) -> dict:
    import torch

    payload = torch.load(run_dir / "checkpoint" / "state.pt", weights_only=True)
    return {"step": payload["state"]["step"], "weights": payload["trainable"]}


def test_train_killed_at_random_points_resumes_to_the_weights_of_an_uninterrupted_run(sample_ws, tiny_model):
    """Runs are killed and resumed, again and again, until each ends; then the next run starts, until
    KALMKG_KILLS kills have landed. A kill falls anywhere from late start-up to the run's expected end
    (steps, validations, checkpoint writes: a checkpoint every 2 steps, of the whole tiny model, so that
    writes take a while); every fourth waits for a checkpoint being staged. A checkpoint is never lost or
    goes back, and every run ends in the weights of the uninterrupted one, tensor for tensor."""
    import torch

    ws = sample_ws.root
    steps = 24
    args = ["-w", ws, "train", "--base", tiny_model, "--full", "--max-steps", steps, "--batch-size", 8,
            "--checkpoint-every", 2, "--eval-every", 8, "--eval-limit", 5, "--log-every", 1, "--precision", "fp32",
            "--no-embed", "--structure", "none", "--patience", 0, "--lr", "1e-3"]
    startup = _run([*args, "--run-name", "dry", "--dry-run"])  # imports, the model, the token ids
    duration = _run([*args, "--run-name", "straight"])
    straight = _trainable(ws / "runs" / "straight")
    per_step = max(duration - startup, 0.1) / steps
    rng = np.random.default_rng(1)
    killed = ended = during_write = runs_done = 0
    while killed < KILLS:
        name = f"run{runs_done}"
        run_dir, last_step = ws / "runs" / name, 0

        def staging_now(run_dir=run_dir) -> bool:
            return run_dir.is_dir() and any(p.name.startswith(".checkpoint.") for p in run_dir.iterdir())

        while True:
            if not last_step:
                shutil.rmtree(run_dir, ignore_errors=True)  # killed before its first checkpoint: start again
            command = ["-w", ws, "train", "--resume", name] if last_step else [*args, "--run-name", name]
            expected = startup + (steps - last_step) * per_step
            aimed = killed % 4 == 3
            delay = expected * 1.5 if aimed else rng.uniform(0.7 * startup, expected)
            if killed < KILLS and _kill_after(command, delay, staging_now if aimed else None):
                killed += 1
                during_write += staging_now()  # what the killed write staged is still there
            else:
                if killed >= KILLS:
                    _run(command)
                ended += 1
            if (run_dir / "checkpoint" / "state.pt").exists():
                step = _trainable(run_dir)["step"]  # a whole checkpoint, read as tensors only
                assert step >= last_step and (step % 2 == 0 or step == steps)
                last_step = step
            else:
                assert last_step == 0  # a checkpoint once written is never lost
            if last_step == steps and (run_dir / "training.png").exists():  # the run has ended
                break
        final = _trainable(run_dir)
        assert final["weights"].keys() == straight["weights"].keys()
        for key, value in straight["weights"].items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(value, final["weights"][key]), (name, key)
        assert not [n for n in _staging(run_dir) if n.startswith((".checkpoint.", ".adapter."))]
        runs_done += 1
    _report(f"train ({runs_done} runs, each resumed to the uninterrupted run's weights; {during_write} kills "
            "while a checkpoint was being staged)", killed, ended)


# ------------------------------------------------------------------------------------------------- embed
def _index_state(ws: Path):
    """The index as predict would open it: (vectors or None, the reason it is not usable)."""
    from kalmkg.index import EntityIndex
    from kalmkg.loaded import load_model
    from kalmkg.workspace import Workspace

    workspace = Workspace(ws)
    loaded = load_model(workspace, run="r")
    index, reason = EntityIndex.try_open(workspace, loaded)
    if index is None:
        assert "kalmkg embed" in reason  # says what to do
        return None
    vectors = index.vectors()
    assert vectors.shape[0] == len(loaded.entity_keys) and np.isfinite(vectors).all()
    return vectors


def test_embed_killed_at_random_points_leaves_an_index_that_is_whole_or_says_to_embed(tiny_run_ws, tmp_path):
    ws = tiny_run_ws.root
    more = tmp_path / "more.tsv"  # enough entities that encoding and writing take a while
    more.write_text("".join(f"m{j}\tnear\tm{j + 1}\n" for j in range(2000)))
    _run(["-w", ws, "ingest", more])
    reference = tmp_path / "reference"
    shutil.copytree(ws, reference)
    duration = _run(["-w", reference, "embed", "--run", "r", "--full"])
    expected = _index_state(reference)
    rng = np.random.default_rng(2)
    killed = ended = whole = 0
    for _ in range(KILLS):  # --full: every run rebuilds the index, so each does the whole work again
        if _kill_after(["-w", ws, "embed", "--run", "r", "--full"], rng.uniform(0.2, 0.8) * duration):
            killed += 1
        else:
            ended += 1
        vectors = _index_state(ws)
        if vectors is not None:
            whole += 1
            assert np.allclose(vectors, expected, atol=1e-5)
    _run(["-w", ws, "embed", "--run", "r"])  # picks up where the kills left it
    assert np.allclose(_index_state(ws), expected, atol=1e-5)
    _report(f"embed ({whole} kills left a usable index)", killed, ended)
    assert killed >= KILLS // 2


# ------------------------------------------------------------------------------------------------ export
def test_export_killed_at_random_points_publishes_whole_exports_only(tmp_path, gguf_tiny):
    from kalmkg.export.registry import list_exports
    from kalmkg.ingestion import ingest, resolve_sources
    from kalmkg.split import split_store
    from kalmkg.store import Store
    from kalmkg.training.loop import TrainConfig, train
    from kalmkg.workspace import Workspace

    pytest.importorskip("llama_cpp")
    workspace = Workspace(tmp_path / "ws")
    with Store.open(workspace, create=True) as store:
        ingest(store, resolve_sources([SAMPLE_TTL]))
        split_store(store, 0.1, 0.1, seed=0)
    train(workspace, TrainConfig(base=str(gguf_tiny), batch_size=8, max_steps=2, precision="fp32", eval_limit=10,
                                 checkpoint_every=2, eval_every=2, patience=0, structure="none"), run_id="r")
    ws, models = workspace.root, workspace.models_dir
    duration = _run(["-w", ws, "export", "--run", "r", "-q", "f16", "--name", "first"])
    rng = np.random.default_rng(3)
    killed = ended = 0
    for i in range(KILLS):
        if _kill_after(["-w", ws, "export", "--run", "r", "-q", "f16", "--name", f"e{i}"],
                       rng.uniform(0.2, 1.0) * duration):
            killed += 1
        else:
            ended += 1
        for gguf, info in list_exports(models):  # what ask and predict would pick from
            assert gguf.stat().st_size == info["size_bytes"] and gguf.read_bytes()[:4] == b"GGUF"
        assert not list(models.glob("e*.gguf.*"))  # no partial file under a final name
    _run(["-w", ws, "export", "--run", "r", "-q", "f16", "--name", "last"])
    names = {gguf.stem for gguf, _ in list_exports(models)}
    assert {"first", "last"} <= names
    assert _staging(models) == []  # the last export removed what the killed ones staged
    _report(f"export ({len(names) - 2} killed exports had published first)", killed, ended)
    assert killed >= KILLS // 2
