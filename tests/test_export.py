"""`kalmkg export`: merged GGUF round trip through llama.cpp, metadata, quant types, atomic output, errors.

llama.cpp's converter recognises a BPE tokenizer by hashing how it splits a fixed text, so the tokenizer
trained on the fly by tests/tiny_model.py is refused ("pre-tokenizer was not recognized"). The export
tests therefore build their tiny random Llama around the SmolLM2 tokenizer read from the embedded GGUF
(a few seconds, no download); the model itself stays tiny (hidden 64, 2 layers).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kalmkg.errors import KalmkgError
from kalmkg.encode import embed_rows
from kalmkg.export.convert import QUANT_TYPES
from kalmkg.export.gguf_meta import read_gguf_metadata
from kalmkg.export.pipeline import STAGES, ExportProgress, export_run
from kalmkg.prompts import SYSTEM_NO_CONTEXT
from kalmkg.workspace import Workspace

SAMPLE_TTL = Path(__file__).resolve().parent.parent / "sample_graphs" / "world.ttl"


# ------------------------------------------------------------------------------------------------ fixtures


def _sample_workspace(root: Path) -> Workspace:
    from kalmkg.ingestion import ingest, resolve_sources
    from kalmkg.split import split_store
    from kalmkg.store import Store

    ws = Workspace(root)
    with Store.open(ws, create=True) as store:
        ingest(store, resolve_sources([SAMPLE_TTL]))
        split_store(store, 0.1, 0.1, seed=0)
    return ws


@pytest.fixture(scope="module")
def trained_ws(tmp_path_factory, gguf_tiny) -> Workspace:
    """The sample graph with a 2-step run 'r' of the tiny model (shared: exports use distinct names)."""
    from kalmkg.training.loop import TrainConfig, train

    ws = _sample_workspace(tmp_path_factory.mktemp("export") / "ws")
    train(ws, TrainConfig(base=str(gguf_tiny), batch_size=8, max_steps=2, precision="fp32", eval_limit=10,
                          checkpoint_every=2, eval_every=2, patience=0), run_id="r")
    return ws


class Recorder(ExportProgress):
    def __init__(self):
        self.started, self.done, self.messages = [], [], []

    def stage(self, name, index, total):
        self.started.append((name, index, total))

    def stage_done(self, name, seconds, detail=""):
        self.done.append(name)

    def message(self, text):
        self.messages.append(text)


def _leftovers(ws: Workspace) -> list[str]:
    return [p.name for p in ws.models_dir.iterdir() if p.name.startswith(".")] if ws.models_dir.exists() else []


# ------------------------------------------------------------------------------------------- round trip


def test_f16_export_round_trips_through_llama_cpp(trained_ws, gguf_tiny):
    import llama_cpp
    import torch
    from peft import PeftModel

    from kalmkg import text as verbalize
    from kalmkg.encode import TorchEncoder
    from kalmkg.models import load_base, resolve_base
    from kalmkg.runs import read_config

    progress = Recorder()
    result = export_run(trained_ws, None, "F16", None, False, progress)

    assert result.name == "r-F16" and result.quant == "F16" and result.run_id == "r"
    assert result.path == trained_ws.models_dir / "r-F16.gguf" and result.path.is_file()
    assert result.modelfile is None and not (trained_ws.models_dir / "r-F16.Modelfile").exists()
    assert progress.started == [(s, i, len(STAGES)) for i, s in enumerate(STAGES)] and progress.done == list(STAGES)
    assert result.min_cosine >= 0.99 and result.verification.tokenizer_match
    assert result.verification.first_token_match
    assert _leftovers(trained_ws) == []

    # Independently of export's own check: the unmerged LoRA model in torch vs the GGUF in llama.cpp.
    base, tokenizer = load_base(resolve_base(str(gguf_tiny)), dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(trained_ws.runs_dir / "r" / "adapter"))
    texts = [verbalize.tail_view(t) for t in ("Paris, capital of France", "Marie Curie", "Rhine, a river")]
    expected = TorchEncoder(model, tokenizer).encode(texts)
    llm = llama_cpp.Llama(str(result.path), embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_LAST,
                          n_ctx=512, verbose=False)
    try:
        rows = [llm.tokenize(t.encode(), add_bos=False, special=True) for t in texts]
        assert rows == tokenizer(texts, add_special_tokens=False)["input_ids"]
        got = embed_rows(llm, rows)
    finally:
        llm.close()
    cosines = np.sum(got * expected, axis=1)
    assert cosines.min() >= 0.99, cosines

    # kalmkg metadata, in the GGUF and beside it
    config = read_config(trained_ws.runs_dir / "r")
    meta = read_gguf_metadata(result.path)
    assert meta["kalmkg.run_id"] == "r"
    assert meta["kalmkg.graph_fingerprint"] == config["graph"]["fingerprint"]
    assert meta["kalmkg.pooling"] == "last" and meta["kalmkg.add_bos"] is False
    assert meta["kalmkg.base.name"] == gguf_tiny.name and meta["general.name"] == "r-F16"
    assert meta["kalmkg.template.tail"] == verbalize.TAIL_TEMPLATE
    assert meta["general.file_type"] == 1  # LLAMA_FTYPE_MOSTLY_F16
    info = json.loads((trained_ws.models_dir / "r-F16.json").read_text())
    assert info["file"] == "r-F16.gguf" and info["size_bytes"] == result.path.stat().st_size
    assert info["run_id"] == "r" and info["graph_fingerprint"] == config["graph"]["fingerprint"]
    assert info["embedding"]["pooling"] == "last" and info["base"]["name"] == gguf_tiny.name
    assert info["verification"]["min_cosine"] >= 0.99 and set(info["seconds"]) == set(STAGES)


@pytest.mark.slow
def test_ask_says_a_calibrated_prediction_for_a_fact_the_graph_lacks_without_torch(trained_ws, tmp_path):
    """The real chain: export, entity index, calibration on valid, then `ask` about a fact the graph does not
    hold, through llama.cpp with the run's link predictor; torch is never imported."""
    import shutil
    import subprocess
    import sys

    from helpers_graph import NO_TORCH
    from kalmkg.evaluation.calibration import Calibration, CurvePoint, read_calibration, write_calibration
    from kalmkg.evaluation.link_prediction import evaluate_run
    from kalmkg.index import embed
    from kalmkg.loaded import load_model

    ws = Workspace(tmp_path / "ws")
    shutil.copytree(trained_ws.root, ws.root)
    for old in ws.models_dir.glob("*") if ws.models_dir.exists() else []:
        old.unlink()
    export_run(ws, None, "F16", None, False, Recorder())
    loaded = load_model(ws)
    embed(ws, loaded)
    evaluate_run(ws, split="valid", loaded=loaded)
    measured = read_calibration(loaded.run_dir)
    assert measured.model == "run:r" and measured.queries > 0

    def ask(*extra):
        cmd = [sys.executable, "-c", NO_TORCH, "-w", str(ws.root), "ask", "Who is the spouse of Angela Merkel?",
               "--json", *extra]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr
        assert "TORCH_LOADED=False" in out.stderr
        return json.loads(out.stdout)

    # a calibration that trusts every prediction: the predictor's first answer is said, as a prediction
    write_calibration(loaded.run_dir, Calibration(measured.model, measured.weights, "valid", 10, 1.0, 0.05,
                                                  [CurvePoint(0.0, 1.0, 10)]))
    data = ask()
    said = data["predicted"]
    assert said["said"] and said["source"] == "prediction" and said["from"] == "Angela Merkel"
    assert said["relation"] == "spouse" and 0 < said["probability"] <= 1 and data["chosen"] is None
    assert data["answer"].startswith(f"Not in the graph; predicted: {said['entity']['label']} (probability ")
    assert said["entity"]["label"] != "Angela Merkel" and data["seconds"]["predict"] > 0
    # one it never trusts: "I don't know", the prediction kept in the JSON and noted
    write_calibration(loaded.run_dir, Calibration(measured.model, measured.weights, "valid", 10, 0.0, 0.05,
                                                  [CurvePoint(0.0, 0.0, 10)]))
    data = ask()
    assert data["answer"].startswith("I don't know") and not data["predicted"]["said"]
    assert data["notes"] and "not said" in data["notes"][0]
    assert ask("--no-predict")["predicted"] is None


def test_default_quant_is_q8_0_below_1b_and_ollama_writes_a_modelfile(trained_ws):
    result = export_run(trained_ws, "r", None, None, True)

    assert result.quant == "Q8_0" and result.name == "r-Q8_0" and result.n_params < 1e9
    assert result.min_cosine >= 0.99
    assert read_gguf_metadata(result.path)["general.file_type"] == 7  # LLAMA_FTYPE_MOSTLY_Q8_0
    modelfile = (trained_ws.models_dir / "r-Q8_0.Modelfile").read_text()
    assert result.modelfile == trained_ws.models_dir / "r-Q8_0.Modelfile"
    assert "FROM ./r-Q8_0.gguf" in modelfile
    # SmolLM2's ChatML template, turned into Ollama's Go template, and its end-of-turn stop token
    assert '{{ else if eq .Role "user" }}<|im_start|>user\n{{ .Content }}<|im_end|>\n' in modelfile
    assert '{{ if and $last (ne .Role "assistant") }}<|im_start|>assistant\n{{ end }}' in modelfile
    assert f'SYSTEM """{SYSTEM_NO_CONTEXT}"""' in modelfile and "named SmolLM" not in modelfile  # ask's prompt
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    assert json.loads(result.metadata_path.read_text())["ollama_modelfile"] == "r-Q8_0.Modelfile"


def test_a_k_quant_exports_with_its_looser_threshold(trained_ws):
    result = export_run(trained_ws, "r", "q4_k_m", "tiny-q4", False)
    assert result.quant == "Q4_K_M" and result.path.name == "tiny-q4.gguf"
    assert result.verification.threshold < 0.99 and result.min_cosine >= result.verification.threshold
    assert read_gguf_metadata(result.path)["general.file_type"] == 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M


# --------------------------------------------------------------------------------------------- atomicity


def test_a_failed_verification_leaves_nothing_and_keeps_the_previous_file(trained_ws, monkeypatch):
    import kalmkg.export.verify as verify

    final = trained_ws.models_dir / "atomic-v.gguf"
    final.parent.mkdir(parents=True, exist_ok=True)
    final.write_bytes(b"previous export")
    monkeypatch.setitem(verify.MIN_COSINE, "Q8_0", 1.5)  # no GGUF can pass: the real failure path runs
    with pytest.raises(KalmkgError, match=r"min cosine .* < 1\.5.*nothing was written"):
        export_run(trained_ws, "r", "Q8_0", "atomic-v", False)
    assert final.read_bytes() == b"previous export"
    assert not (trained_ws.models_dir / "atomic-v.json").exists()
    assert _leftovers(trained_ws) == []


def test_a_failed_quantization_leaves_no_partial_file(trained_ws, monkeypatch):
    import kalmkg.export.pipeline as pipeline

    def half_written(src, dst, quant):
        Path(dst).write_bytes(b"GGUF" + b"\0" * 100)
        raise KalmkgError(f"quantizing to {quant} failed: simulated")

    monkeypatch.setattr(pipeline, "quantize", half_written)
    with pytest.raises(KalmkgError, match="simulated"):
        export_run(trained_ws, "r", "Q6_K", "atomic-q", True)
    assert not [p for p in trained_ws.models_dir.iterdir() if p.name.startswith("atomic-q")]
    assert _leftovers(trained_ws) == []


def test_no_space_is_refused_before_any_work(trained_ws, monkeypatch):
    from collections import namedtuple

    import kalmkg.export.pipeline as pipeline

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 10**6, 10**6))
    with pytest.raises(KalmkgError, match=r"not enough disk space .* needs about .*3x the float32 model"):
        export_run(trained_ws, "r", "Q8_0", "nospace", False)
    monkeypatch.undo()
    assert not list(trained_ws.models_dir.glob("nospace*")) and _leftovers(trained_ws) == []


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("quant", ["Q3_K", "q4", "f32", ""])
def test_an_unknown_quant_type_lists_the_valid_ones(tmp_path, quant):
    with pytest.raises(KalmkgError) as info:
        export_run(Workspace(tmp_path / "ws"), None, quant, None, False)
    message = str(info.value)
    assert "unknown quantization type" in message and "\n" not in message
    assert all(q in message for q in QUANT_TYPES)


@pytest.mark.parametrize("name", ["../escape", "a/b", ".hidden", "with space"])
def test_a_bad_model_name_is_refused(tmp_path, name):
    with pytest.raises(KalmkgError, match="invalid model name"):
        export_run(Workspace(tmp_path / "ws"), None, "Q8_0", name, False)


def test_no_trained_run_says_to_train_first(sample_ws):
    with pytest.raises(KalmkgError, match=r"run `kalmkg train` first"):
        export_run(sample_ws, None, None, None, False)
    with pytest.raises(KalmkgError, match="no run 'nope'"):
        export_run(sample_ws, "nope", None, None, False)


def test_a_run_without_weights_says_to_train_first(sample_ws, gguf_tiny):
    from kalmkg.files import atomic_write_text

    run = sample_ws.runs_dir / "empty"
    atomic_write_text(run / "config.toml", f'[train]\nbase = "{gguf_tiny}"\n')
    with pytest.raises(KalmkgError, match=r"run empty has no trained weights yet .*`kalmkg train` first"):
        export_run(sample_ws, "empty", None, None, False)


def test_an_architecture_the_converter_lacks_is_named(tmp_path):
    from kalmkg.export.convert import check_architecture, convert

    with pytest.raises(KalmkgError, match="does not support the architecture FooBarForCausalLM of base foo"):
        check_architecture("FooBarForCausalLM", "foo")
    check_architecture("LlamaForCausalLM", "llama")  # supported: no error
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": ["FooBarForCausalLM"], "model_type": "foo"}))
    with pytest.raises(KalmkgError, match="does not support the architecture FooBarForCausalLM of base foo"):
        convert(folder, tmp_path / "out.gguf", "x", "foo")


def test_a_tokenizer_the_converter_cannot_identify_is_reported(tmp_path, tiny_model):
    from kalmkg.export.convert import convert

    with pytest.raises(KalmkgError, match="does not recognise the tokenizer of base tiny"):
        convert(tiny_model, tmp_path / "out.gguf", "x", "tiny")
    assert not (tmp_path / "out.gguf").exists()


def test_modelfile_template_follows_a_custom_chat_template(tiny_model):
    from transformers import AutoTokenizer

    from kalmkg.export.ollama import modelfile

    text = modelfile(AutoTokenizer.from_pretrained(tiny_model), "m")
    # tests/tiny_model.py's template: "<s>{role}: {content}</s>\n" per message, "<s>assistant: " to generate
    assert '{{ if eq .Role "system" }}<s>system: {{ .Content }}</s>\n' in text
    assert '{{ else if eq .Role "assistant" }}<s>assistant: {{ .Content }}</s>\n' in text
    assert '{{ if and $last (ne .Role "assistant") }}<s>assistant: {{ end }}' in text
    assert 'PARAMETER stop "</s>"' in text and f'SYSTEM """{SYSTEM_NO_CONTEXT}"""' in text


def test_modelfile_template_writes_a_start_text_once(tiny_model):
    from transformers import AutoTokenizer

    from kalmkg.export.ollama import modelfile

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = (  # Llama 3's layout: BOS once, then headed turns
        "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
        "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
    text = modelfile(tokenizer, "m")
    assert 'TEMPLATE """<s>{{ range $i, $_ := .Messages }}' in text  # this tokenizer adds no BOS itself
    assert '{{ if eq .Role "system" }}<|start_header_id|>system<|end_header_id|>\n\n{{ .Content }}<|eot_id|>' in text
    assert 'PARAMETER stop "<|eot_id|>"' in text


def test_cli_export_prints_json_and_reports_bad_input_as_kalmkg_error(trained_ws):
    from typer.testing import CliRunner

    from kalmkg.cli.app import app

    bad = CliRunner().invoke(app, ["-w", str(trained_ws.root), "export", "--quant", "Q3"])
    assert isinstance(bad.exception, KalmkgError) and "Q4_K_M" in str(bad.exception)
    ok = CliRunner().invoke(app, ["-w", str(trained_ws.root), "export", "--run", "r", "-q", "f16", "--name", "cli",
                                  "--json"], catch_exceptions=False)
    assert ok.exit_code == 0, ok.output
    data = json.loads(ok.stdout)
    assert data["path"] == str(trained_ws.models_dir / "cli.gguf") and data["quant"] == "F16"
    assert data["verification"]["min_cosine"] >= 0.99 and set(data["seconds"]) == set(STAGES)


# ------------------------------------------------------------------------------------ the embedded model


@pytest.mark.slow
def test_embedded_smollm2_run_exports_to_q8_0(tmp_path):
    import time

    from kalmkg.training.loop import TrainConfig, train

    ws = _sample_workspace(tmp_path / "ws")
    train(ws, TrainConfig(max_steps=2, batch_size=4, lora_layers=2, max_entity_tokens=12, eval_limit=5),
          run_id="smol")
    start = time.perf_counter()
    result = export_run(ws, "smol", None, None, True)
    seconds = time.perf_counter() - start
    assert result.quant == "Q8_0" and result.min_cosine >= 0.99
    assert result.verification.tokenizer_match and result.verification.first_token_match
    assert 100e6 < result.size_bytes < 200e6  # 135M parameters at 8.5 bits
    meta = read_gguf_metadata(result.path)
    assert meta["kalmkg.run_id"] == "smol" and meta["kalmkg.base.name"] == "SmolLM2-135M-Instruct"
    print(f"\nSmolLM2-135M Q8_0 export: {seconds:.1f}s {result.seconds}, {result.size_bytes / 1e6:.1f} MB, "
          f"min cosine {result.min_cosine:.5f}, greedy {'same' if result.verification.greedy_match else 'differs'}")


# ------------------------------------------------------------------------------- the pieces, model-free


def _reference(vocab: int = 1000):
    from kalmkg.export.verify import Reference

    vectors = np.eye(3, 4, dtype=np.float32)  # three unit rows
    logits = np.zeros(vocab, dtype=np.float32)
    logits[0] = 1.0  # torch's greedy pick is token 0, by a clear margin
    return Reference(["a", "b", "c"], [[1], [2], [3]], vectors, "p", [9], [0, 5], logits)


def _llama(ref, **change):
    from kalmkg.export.verify import LlamaOutputs

    got = LlamaOutputs([list(i) for i in ref.ids], ref.vectors.copy(), list(ref.tokens), ref.first_logits.copy())
    for key, value in change.items():
        setattr(got, key, value)
    return got


def test_judge_accepts_matching_outputs_and_refuses_a_wrong_embedding():
    from kalmkg.export.verify import greedy_difference, judge

    ref = _reference()
    v = judge(ref, _llama(ref), "Q8_0")
    assert v.min_cosine == 1.0 and v.texts == 3 and v.tokenizer_match and v.greedy_match
    assert v.first_token_match and v.first_token_margin == 0.0 and v.logits_cosine == 1.0
    assert greedy_difference(v) is None

    rotated = ref.vectors.copy()
    rotated[1] = [0, 0, 0, 1]  # text "b" lands elsewhere: cosine 0
    with pytest.raises(KalmkgError, match=r"Q8_0 GGUF does not reproduce .* min cosine 0\.0000 < 0\.99 "
                                          r"\(on 'b'\); nothing was written"):
        judge(ref, _llama(ref, vectors=rotated), "Q8_0")
    with pytest.raises(KalmkgError, match="llama.cpp tokenizes the texts differently"):
        judge(ref, _llama(ref, vectors=rotated, ids=[[1], [7, 7], [3]]), "Q8_0")


def test_judge_allows_a_first_token_tie_but_not_a_clear_difference_for_near_lossless_types():
    from kalmkg.export.verify import greedy_difference, judge, tie_tolerance

    ref = _reference()
    other = np.zeros_like(ref.first_logits)
    other[1] = 1.0  # llama.cpp picks token 1, where torch's margin for token 0 is 1.0
    with pytest.raises(KalmkgError, match=r"first greedy token 1 instead of 0 \(torch margin 1\.000\)"):
        judge(ref, _llama(ref, tokens=[1, 5], first_logits=other), "F16")
    # K-quants are only held to their embedding threshold; the difference is reported, not refused
    v = judge(ref, _llama(ref, tokens=[1, 5], first_logits=other), "Q4_K_M")
    assert not v.first_token_match and v.first_token_margin == 1.0 and "near tie" in greedy_difference(v)

    tied = _reference()
    tied.first_logits[1] = 0.99999  # torch: token 0 by 1e-5, a tie within the logit noise
    swapped = tied.first_logits.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    centered = [x - x.mean() for x in (tied.first_logits, swapped)]
    assert tie_tolerance(*centered) > 1e-5
    v = judge(tied, _llama(tied, tokens=[1, 5], first_logits=swapped), "Q8_0")
    assert not v.first_token_match and 0 < v.first_token_margin < 1e-4

    later = judge(ref, _llama(ref, tokens=[0, 6]), "Q8_0")
    assert later.first_token_match and not later.greedy_match
    assert greedy_difference(later) == "greedy continuation differs from torch after the first token (quantization noise)"


def test_quant_and_name_options_and_their_defaults():
    from kalmkg.export.convert import check_quant, default_quant
    from kalmkg.export.registry import ExportTarget, check_name, default_name

    assert check_quant(" q4_k_m ") == "Q4_K_M" and check_quant(None) is None
    assert default_quant(135_000_000) == "Q8_0" and default_quant(7_000_000_000) == "Q4_K_M"
    assert check_name(" smollm-kg.GGUF ") == "smollm-kg" and check_name(None) is None
    assert default_name("r", "Q8_0") == "r-Q8_0"
    target = ExportTarget(Path("/m"), "x", "F16")
    assert (target.gguf, target.metadata, target.modelfile) == (Path("/m/x.gguf"), Path("/m/x.json"),
                                                               Path("/m/x.Modelfile"))


def _source(tmp_path):
    from kalmkg.export.registry import ExportSource
    from kalmkg.models import ResolvedBase

    base = ResolvedBase("tiny", "tiny", str(tmp_path / "base"), "local", "fp-base")
    config = {"graph": {"fingerprint": "fp-graph"}, "train": {"max_entity_tokens": 17}}
    return ExportSource(tmp_path / "runs" / "r", config, base, 1234, "LlamaForCausalLM")


def test_the_json_record_and_the_gguf_keys_describe_the_same_embedding(tmp_path):
    from kalmkg import text as verbalize
    from kalmkg.export.gguf_meta import kalmkg_metadata
    from kalmkg.export.registry import ExportOutcome, ExportTarget, export_record

    source = _source(tmp_path)
    target = ExportTarget(tmp_path / "models", "r-F16", "F16", ollama=True)
    record = export_record(source, target, ExportOutcome(99, {"min_cosine": 1.0}, {"merge": 0.5}))
    assert record["file"] == "r-F16.gguf" and record["ollama_modelfile"] == "r-F16.Modelfile"
    assert record["run_id"] == "r" and record["graph_fingerprint"] == "fp-graph" and record["size_bytes"] == 99
    assert record["base"] == {"name": "tiny", "spec": "tiny", "source": "local", "fingerprint": "fp-base"}
    assert record["embedding"]["max_entity_tokens"] == 17
    assert record["embedding"]["templates"]["tail"] == verbalize.TAIL_TEMPLATE
    keys = kalmkg_metadata(source, "F16")
    assert keys["kalmkg.run_id"] == "r" and keys["kalmkg.base.fingerprint"] == "fp-base"
    assert {k: keys[f"kalmkg.{k}"] for k in ("pooling", "normalize", "add_bos", "max_entity_tokens")} == \
        {k: v for k, v in record["embedding"].items() if k != "templates"}
    assert {k: keys[f"kalmkg.template.{k}"] for k in ("hr", "tail", "inverse")} == record["embedding"]["templates"]


def test_list_exports_reads_the_records_back_newest_first(tmp_path):
    import os

    from kalmkg.export.registry import list_exports

    models = tmp_path / "models"
    assert list_exports(models) == []
    models.mkdir()
    for i, name in enumerate(("old", "new")):
        (models / f"{name}.gguf").write_bytes(b"GGUF")
        (models / f"{name}.json").write_text(json.dumps({"file": f"{name}.gguf", "run_id": name}))
        os.utime(models / f"{name}.gguf", (1000 + i, 1000 + i))
    (models / "gone.json").write_text(json.dumps({"file": "gone.gguf"}))  # its GGUF was deleted
    (models / "broken.json").write_text("{")
    (models / "list.json").write_text("[1]")
    assert [(p.name, info["run_id"]) for p, info in list_exports(models)] == [("new.gguf", "new"), ("old.gguf", "old")]


@pytest.mark.parametrize("replaced", [False, True])
def test_publish_takes_back_the_files_it_added_when_the_gguf_cannot_move(tmp_path, replaced):
    from kalmkg.export.pipeline import publish

    tmp, final = tmp_path / "tmp", tmp_path / "m.gguf"
    tmp.mkdir()
    meta = tmp_path / "m.json"
    if replaced:
        meta.write_text("previous")
    with pytest.raises(FileNotFoundError):
        publish(tmp, tmp / "missing.gguf", final, {meta: "new"}, replaced)
    assert not final.exists()
    assert (meta.read_text() == "new") if replaced else not meta.exists()

    (tmp / "ok.gguf").write_bytes(b"GGUF")
    publish(tmp, tmp / "ok.gguf", final, {meta: "newer"}, replaced)
    assert final.read_bytes() == b"GGUF" and meta.read_text() == "newer"


def test_an_export_the_disk_refuses_is_one_line_and_leaves_models_as_they_were(trained_ws, tmp_path):
    """A real write failure (the child's file size limit at 1 MB, as a full disk): one error line, no
    partial or staging file in models/, the export made before untouched."""
    import resource
    import signal
    import subprocess
    import sys

    from helpers_graph import cli_env

    before = trained_ws.models_dir / "kept.gguf"
    before.parent.mkdir(parents=True, exist_ok=True)
    before.write_bytes(b"an earlier export")
    listing = sorted(p.name for p in trained_ws.models_dir.iterdir())

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    proc = subprocess.run([sys.executable, "-m", "kalmkg", "-w", str(trained_ws.root), "export", "--run", "r",
                           "-q", "f16", "--name", "full-disk"], capture_output=True, text=True, env=cli_env(),
                          cwd=tmp_path, timeout=600, preexec_fn=limit)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: out of disk space")  # after the stages' lines
    assert sorted(p.name for p in trained_ws.models_dir.iterdir()) == listing and _leftovers(trained_ws) == []
    assert before.read_bytes() == b"an earlier export"


def test_export_hf_keeps_the_merged_folder_with_a_card_that_transformers_loads(trained_ws, tmp_path):
    """`kalmkg export --hf DIR`: the verified merge as a Hugging Face folder, for other runtimes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "hf"
    result = export_run(trained_ws, "r", "F16", "tiny-hf", False, hf=out)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "README.md", "tokenizer_config.json"} <= names
    assert not any(n.endswith(".bin") for n in names) and result.path.exists()
    card = (out / "README.md").read_text()
    assert "library_name: transformers" in card and "The merged weights of" in card and "run" not in card.split("---")[1]
    model, tokenizer = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template  # the chat template travels with it
    with torch.no_grad():
        assert model(**tokenizer("Paris", return_tensors="pt")).logits.shape[0] == 1


def test_export_hf_never_replaces_a_users_folder(trained_ws, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "weights.bin").write_text("someone's")
    with pytest.raises(KalmkgError, match="holds files kalmkg did not write"):
        export_run(trained_ws, "r", "F16", "never", False, hf=mine)
    assert (mine / "weights.bin").read_text() == "someone's"
    assert not (trained_ws.models_dir / "never.gguf").exists()
