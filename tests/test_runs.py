"""Run folders: config.toml round trip, atomic writes, run ids, and finding runs."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

import pytest

from kalmkg import runs
from kalmkg.errors import KalmkgError
from kalmkg.files import atomic_path, atomic_write_text
from kalmkg.runs import (
    as_dict,
    config_to_toml,
    dataclass_from,
    find_run,
    latest_run,
    new_run_id,
    read_config,
)
from kalmkg.workspace import Workspace


def write_config(folder, sections):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.toml").write_text(config_to_toml(sections))
    return folder


def round_trip(tmp_path, sections):
    write_config(tmp_path / "run", sections)
    return read_config(tmp_path / "run")


# ------------------------------------------------------------------ config.toml
def test_config_round_trips_scalars_strings_and_lists(tmp_path):
    sections = {
        "train": {
            "base": 'a "quoted" \\ back\\slash \\n not-a-newline',
            "path": "C:\\models\\llama",
            "multiline": "line 1\nline 2\ttab",
            "unicode": "Zürich ✓ 日本",
            "empty": "",
            "steps": 10,
            "negative": -3,
            "big": 2**40,
            "zero": 0,
            "lr": 1e-4,
            "margin": 0.02,
            "whole_float": 3.0,
            "huge": 1e20,
            "full": False,
            "bucket": True,
            "lora_targets": ["gate_proj", "up_proj", 'odd "name"'],
            "no_targets": [],
            "weights": [0.5, 1, 2.25],
        },
        "environment": {"torch": "2.13.0+cpu", "world_size": 1},
    }
    back = round_trip(tmp_path, sections)
    assert back == sections
    assert type(back["train"]["whole_float"]) is float and type(back["train"]["steps"]) is int
    assert type(back["train"]["full"]) is bool


def test_config_tuples_are_written_as_arrays(tmp_path):
    back = round_trip(tmp_path, {"train": {"targets": ("q_proj", "v_proj")}})
    assert back == {"train": {"targets": ["q_proj", "v_proj"]}}


def test_config_keeps_section_order_and_dotted_sections_nest(tmp_path):
    sections = {"train": {"a": 1}, "base.lora": {"r": 8, "targets": ["q"]}, "graph": {"fingerprint": "abc"}}
    text = config_to_toml(sections)
    assert text.index("[train]") < text.index("[base.lora]") < text.index("[graph]")
    back = round_trip(tmp_path, sections)
    assert back == {"train": {"a": 1}, "base": {"lora": {"r": 8, "targets": ["q"]}}, "graph": {"fingerprint": "abc"}}


def test_config_empty_section(tmp_path):
    assert round_trip(tmp_path, {"train": {}, "graph": {"x": "y"}}) == {"train": {}, "graph": {"x": "y"}}


def test_config_round_trips_nested_tables(tmp_path):
    sections = {"base": {"name": "tiny", "lora": {"r": 8, "targets": ["q"]}}}
    assert round_trip(tmp_path, sections) == sections


def test_read_config_of_missing_run_fails(tmp_path):
    with pytest.raises(KalmkgError, match="no such file"):
        read_config(tmp_path / "nope")


@dataclass
class Settings:
    name: str = "x"
    size: int = 1
    rate: float = 0.5
    targets: tuple[str, ...] = ("a",)
    flags: tuple[int, ...] = field(default_factory=tuple)


def test_dataclass_from_ignores_unknown_keys_and_makes_tuples():
    s = dataclass_from(Settings, {"name": "y", "targets": ["q", "v"], "flags": [1, 2], "unknown": 3, "other": [1]})
    assert s == Settings(name="y", size=1, rate=0.5, targets=("q", "v"), flags=(1, 2))
    assert isinstance(s.targets, tuple) and isinstance(s.flags, tuple)
    assert not hasattr(s, "unknown")


def test_dataclass_from_empty_table_gives_defaults():
    assert dataclass_from(Settings, {}) == Settings()


def test_train_config_round_trips_through_toml(tmp_path):
    from kalmkg.training.loop import TrainConfig

    cfg = TrainConfig(base="meta-llama/Llama-2-7b-hf", lora_targets=("q_proj", "v_proj"), lr=3e-5, full=True,
                      batch_size=12, device="cpu")
    back = round_trip(tmp_path, {"train": as_dict(cfg), "graph": {"fingerprint": "f"}})
    assert dataclass_from(TrainConfig, back["train"]) == cfg


# ------------------------------------------------------------------ atomic writes
def test_atomic_write_text_writes_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "config.toml"
    atomic_write_text(path, "a = 1\n")
    assert path.read_text() == "a = 1\n"
    atomic_write_text(path, "a = 2\nb = \"Zürich\"\n")  # replaces the old content
    assert path.read_text(encoding="utf-8") == "a = 2\nb = \"Zürich\"\n"
    assert sorted(os.listdir(path.parent)) == ["config.toml"]


def test_atomic_path_creates_a_new_folder(tmp_path):
    target = tmp_path / "adapter"
    with atomic_path(target) as tmp:
        assert tmp != target and tmp.parent.parent == tmp_path and not tmp.exists()
        tmp.mkdir()
        (tmp / "weights.bin").write_bytes(b"new")
    assert (target / "weights.bin").read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


def test_atomic_path_replaces_an_existing_folder(tmp_path):
    target = tmp_path / "checkpoint"
    target.mkdir()
    (target / "state.pt").write_bytes(b"old")
    (target / "stale.txt").write_text("old only")
    with atomic_path(target) as tmp:
        tmp.mkdir()
        (tmp / "state.pt").write_bytes(b"new")
        assert (target / "state.pt").read_bytes() == b"old"  # untouched until the body is done
    assert sorted(os.listdir(target)) == ["state.pt"]
    assert (target / "state.pt").read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]


def test_atomic_path_replaces_an_existing_file(tmp_path):
    target = tmp_path / "plot.png"
    target.write_bytes(b"old")
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == ["plot.png"]


def test_atomic_path_failure_leaves_the_target_untouched(tmp_path):
    target = tmp_path / "checkpoint"
    target.mkdir()
    (target / "state.pt").write_bytes(b"old")
    with pytest.raises(RuntimeError, match="killed"):
        with atomic_path(target) as tmp:
            tmp.mkdir()
            (tmp / "state.pt").write_bytes(b"half")
            raise RuntimeError("killed")
    assert sorted(os.listdir(target)) == ["state.pt"]
    assert (target / "state.pt").read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["checkpoint"]


def test_atomic_path_failure_without_a_target_creates_nothing(tmp_path):
    with pytest.raises(ValueError):
        with atomic_path(tmp_path / "adapter") as tmp:
            tmp.mkdir()
            raise ValueError
    assert os.listdir(tmp_path) == []


def test_atomic_path_body_writing_nothing_keeps_the_existing_target(tmp_path):
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "weights.bin").write_bytes(b"old")
    try:
        with atomic_path(target):
            pass
    except OSError:
        pass  # failing is fine; losing the existing folder is not
    assert (target / "weights.bin").read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["adapter"]


# ------------------------------------------------------------------ run ids
SAFE = re.compile(r"^\d{8}-\d{6}-[a-z0-9][a-z0-9-]*$")


@pytest.mark.parametrize("base,short", [
    ("meta-llama/Llama-2-7b-hf", "llama-2-7b-hf"),
    ("/path/to/My Model", "my-model"),
    ("/path/to/model/", "model"),
    ("smollm2-135m", "smollm2-135m"),
    ("HuggingFaceTB/SmolLM2-135M-Instruct", "smollm2-135m-instruct"),
    ("weird: name*?<>|", "weird-name"),
])
def test_new_run_id_is_filesystem_safe(tmp_path, base, short):
    run_id = new_run_id(base)
    assert SAFE.match(run_id), run_id
    assert run_id.endswith("-" + short)
    assert "/" not in run_id and "\\" not in run_id and " " not in run_id
    folder = tmp_path / run_id
    folder.mkdir()
    assert folder.is_dir() and folder.parent == tmp_path


@pytest.mark.parametrize("base", ["", "/", "...", "ü/ß"])
def test_new_run_id_falls_back_to_run(base):
    run_id = new_run_id(base)
    assert SAFE.match(run_id), run_id
    assert run_id.endswith("-run")


def test_new_run_id_cuts_long_names():
    run_id = new_run_id("some-org/" + "A-Very-Long-Model-Name" * 5)
    stamp, short = run_id[:16], run_id[16:]
    assert re.fullmatch(r"\d{8}-\d{6}-", stamp)
    assert len(short) == 24 and ("a-very-long-model-name" * 5).startswith(short)


# ------------------------------------------------------------------ finding runs
def make_run(ws, name, mtime=None):
    folder = write_config(ws.runs_dir / name, {"train": {"base": name}})
    if mtime is not None:
        os.utime(folder / "config.toml", (mtime, mtime))
    return folder


@pytest.mark.parametrize("setup", ["no-root", "no-runs-dir", "empty-runs-dir", "runs-without-config"])
def test_no_run_raises_and_points_to_kalmkg_train(tmp_path, setup):
    ws = Workspace(tmp_path / "ws")
    if setup != "no-root":
        ws.root.mkdir()
    if setup in ("empty-runs-dir", "runs-without-config"):
        ws.runs_dir.mkdir()
    if setup == "runs-without-config":
        (ws.runs_dir / "half-made").mkdir()
        (ws.runs_dir / "half-made" / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(KalmkgError, match="kalmkg train"):
        latest_run(ws)
    with pytest.raises(KalmkgError, match="kalmkg train"):
        find_run(ws, None)


def test_latest_run_picks_the_newest_config(tmp_path):
    ws = Workspace(tmp_path)
    make_run(ws, "a-first", mtime=1_000_000)
    make_run(ws, "b-newest", mtime=3_000_000)
    make_run(ws, "c-middle", mtime=2_000_000)
    (ws.runs_dir / "d-no-config").mkdir()  # newer folder, but not a run
    assert latest_run(ws) == ws.runs_dir / "b-newest"
    assert find_run(ws, None) == ws.runs_dir / "b-newest"
    os.utime(ws.runs_dir / "a-first" / "config.toml", (4_000_000, 4_000_000))
    assert latest_run(ws) == ws.runs_dir / "a-first"


def test_find_run_by_id_and_by_path(tmp_path):
    ws = Workspace(tmp_path)
    a = make_run(ws, "run-a", mtime=1_000_000)
    make_run(ws, "run-b", mtime=2_000_000)
    assert find_run(ws, "run-a") == a
    assert find_run(ws, str(a)) == a
    assert read_config(find_run(ws, "run-a")) == {"train": {"base": "run-a"}}


def test_find_run_of_unknown_id_raises(tmp_path):
    ws = Workspace(tmp_path)
    make_run(ws, "run-a")
    (ws.runs_dir / "no-config").mkdir()
    with pytest.raises(KalmkgError, match="nope"):
        find_run(ws, "nope")
    with pytest.raises(KalmkgError, match="no-config"):
        find_run(ws, "no-config")


def test_run_dir_is_under_the_workspace_runs(tmp_path):
    ws = Workspace(tmp_path)
    assert runs.run_dir(ws, "x") == tmp_path / "runs" / "x"


def test_config_holds_any_unicode_and_leaves_none_out(tmp_path):
    """A path or name outside the BMP (an emoji) reads back; None is not written as a value."""
    sections = {"train": {"base": str(tmp_path / "modèles 😀" / "base"), "note": "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "lr": None},
                "base": {"path": tmp_path / "x"}}
    back = round_trip(tmp_path, sections)
    assert back == {"train": {"base": sections["train"]["base"], "note": "𝔘𝔫𝔦𝔠𝔬𝔡𝔢"}, "base": {"path": str(tmp_path / "x")}}


def test_results_are_created_with_the_users_umask_and_no_partial_file_is_left(tmp_path, monkeypatch):
    import os

    from kalmkg.files import staging_dir

    old = os.umask(0o027)
    try:
        staged_model = staging_dir(tmp_path / "cache", ".base.")  # renamed into place as a cached model
        atomic_write_text(tmp_path / "config.toml", "a = 1\n")
        with atomic_path(tmp_path / "adapter") as staged:
            staged.mkdir()
            (staged / "weights").write_text("w")
    finally:
        os.umask(old)
    assert (tmp_path / "config.toml").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "adapter").stat().st_mode & 0o777 == 0o750
    assert staged_model.stat().st_mode & 0o777 == 0o750 and not any(staged_model.iterdir())
    staged_model.rmdir()
    (tmp_path / "cache").rmdir()

    def full_disk(*_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space"):
        atomic_write_text(tmp_path / "config.toml", "a = 2\n")
    assert (tmp_path / "config.toml").read_text() == "a = 1\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "config.toml"]


# ------------------------------------------------------------------ kalmkg runs, train --config, --json
def test_train_config_file_reproduces_a_run_and_options_override_it(tiny_run_ws, tmp_path):
    """`kalmkg train --config runs/<id>/config.toml` trains with that run's settings; an option given on the
    command line wins over the file; `--json` prints the result; `kalmkg runs` lists, shows, compares."""
    import json

    from helpers_graph import run_kalmkg

    ws = tiny_run_ws.root
    proc = run_kalmkg("-w", ws, "train", "--config", ws / "runs" / "r" / "config.toml", "--max-steps", "1",
                      "--run-name", "s", "--no-embed", "--json", cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["run_id"] == "s" and result["steps"] == 1 and result["out_of_time"] is False
    first, second = (read_config(ws / "runs" / r)["train"] for r in ("r", "s"))
    assert {k for k in first.keys() | second.keys() if first.get(k) != second.get(k)} == {"max_steps"}

    listed = json.loads(run_kalmkg("-w", ws, "runs", "--json", cwd=tmp_path).stdout)
    assert [r["id"] for r in listed] == ["r", "s"]
    assert [r["status"] for r in listed] == ["finished", "finished"]
    assert [r["steps"] for r in listed] == [2, 1] and all(r["graph_current"] for r in listed)
    assert listed[0]["best_valid"]["step"] == 2 and 0 < listed[0]["best_valid"]["mrr"] <= 1
    shown = json.loads(run_kalmkg("-w", ws, "runs", "show", "r", "--json", cwd=tmp_path).stdout)
    assert shown["config"] == first and shown["adapter"] and shown["checkpoint"]
    compared = json.loads(run_kalmkg("-w", ws, "runs", "compare", "r", "s", "--json", cwd=tmp_path).stdout)
    assert compared["runs"] == ["r", "s"] and compared["settings_that_differ"] == {"max_steps": [2, 1]}
    assert compared["metrics"]["steps"] == [2, 1]
    table = run_kalmkg("-w", ws, "runs", cwd=tmp_path, env=_wide())
    assert table.returncode == 0 and "finished" in table.stdout and " r " in table.stdout


def _wide() -> dict:
    from helpers_graph import cli_env

    return cli_env(COLUMNS="200")


def test_runs_show_evaluations_and_a_changed_graph(tiny_run_ws, tmp_path):
    import json

    from helpers_graph import ingest_into, run_kalmkg, write

    ws = tiny_run_ws.root
    eval_file = {"triples": 15, "metrics": {"both": {"mrr": 0.5, "hits@1": 0.25, "hits@10": 1.0}}}
    (ws / "runs" / "r" / "eval-test.json").write_text(json.dumps(eval_file))
    ingest_into(ws, [write(tmp_path / "more.tsv", "new\tr\tthing\n")])
    shown = json.loads(run_kalmkg("-w", ws, "runs", "show", "--json", cwd=tmp_path).stdout)
    assert shown["evaluations"]["test"]["metrics"]["both"]["mrr"] == 0.5
    assert shown["graph_current"] is False
    text = run_kalmkg("-w", ws, "runs", "show", "r", cwd=tmp_path, env=_wide()).stdout
    assert "Evaluations" in text and "0.500" in text and "the store holds another graph now" in text


@pytest.mark.parametrize("args, words", [
    (["runs", "show", "nope"], "no run 'nope'"),
    (["runs", "compare", "r"], "two or more run ids"),
    (["train", "--config", "missing.toml"], "no such file"),
])
def test_runs_and_config_errors_are_one_line(tiny_run_ws, tmp_path, args, words):
    from helpers_graph import assert_one_line_error, run_kalmkg

    assert_one_line_error(run_kalmkg("-w", tiny_run_ws.root, *args, cwd=tmp_path), words)


@pytest.mark.parametrize("text, words", [
    ("[train]\nbatch_sise = 8\n", "unknown TrainConfig settings batch_sise"),
    ("[train\n", "is not TOML"),
    ("[train]\nlr = -1.0\n", "lr"),
])
def test_a_bad_config_file_is_one_line(sample_ws, tmp_path, text, words):
    from helpers_graph import assert_one_line_error, run_kalmkg, write

    path = write(tmp_path / "c.toml", text)
    assert_one_line_error(run_kalmkg("-w", sample_ws.root, "train", "--config", path, cwd=tmp_path), words)


def test_no_runs_yet(sample_ws, tmp_path):
    import json

    from helpers_graph import assert_one_line_error, run_kalmkg

    assert json.loads(run_kalmkg("-w", sample_ws.root, "runs", "--json", cwd=tmp_path).stdout) == []
    assert_one_line_error(run_kalmkg("-w", sample_ws.root, "runs", cwd=tmp_path), "no training run")


def test_the_adapter_folder_carries_a_model_card_and_loads_with_peft(tiny_run, tiny_model):
    """Hugging Face's conventions: the run's adapter/ loads with peft as it is, and its README.md is a real
    card (base, graph, objective, validation, how to load and reproduce), not peft's empty template."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = tiny_run / "runs" / "r" / "adapter"
    card = (adapter / "README.md").read_text(encoding="utf-8")
    head = card.split("---")[1]
    assert "library_name: peft" in head and "base_model: tiny" in head and "- knowledge-graph" in head
    fingerprint = read_config(tiny_run / "runs" / "r")["graph"]["fingerprint"]
    assert f"fingerprint `{fingerprint}`" in card and "144 entities, 16 relations" in card
    assert "Validation (filtered" in card and "at step 2" in card
    assert f"kalmkg train --config {(tiny_run / 'runs' / 'r').resolve() / 'config.toml'}" in card
    assert "Model Card for Model ID" not in card
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    model = PeftModel.from_pretrained(base, adapter)
    assert any("lora_A" in name for name, _ in model.named_parameters())
    with torch.no_grad():
        assert model(torch.tensor([[1, 2, 3]])).logits.shape[:2] == (1, 3)


def test_a_flag_set_in_the_config_file_can_be_turned_off_on_the_command_line(sample_ws, tiny_model, tmp_path):
    import json

    from helpers_graph import run_kalmkg, write

    path = write(tmp_path / "c.toml", f"[train]\nbase = {str(tiny_model)!r}\nself_negatives = true\nmax_steps = 3\n")
    plan = lambda *extra: json.loads(run_kalmkg("-w", sample_ws.root, "train", "--config", path, "--dry-run",  # noqa: E731
                                                "--json", *extra, cwd=tmp_path).stdout)["config"]
    assert plan()["self_negatives"] is True and plan()["max_steps"] == 3
    assert plan("--no-self-negatives")["self_negatives"] is False
