"""What kalmkg trusts: weights load only from safetensors (or a GGUF, converted to them), the files a run
keeps for itself (checkpoint, token cache) hold tensors and plain arrays and are read without unpickling
code, and chat templates render in a sandbox. A run folder or model folder from elsewhere runs no code."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers_graph import assert_one_line_error, run_kalmkg
from kalmkg.errors import KalmkgError


class _Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def _pickle_bomb(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        pickle.dump({"trainable": _Payload(marker)}, fh)


def test_the_token_cache_is_plain_arrays_and_a_pickle_in_its_place_runs_no_code(tmp_path):
    from kalmkg.npy import write_npy
    from kalmkg.text import GraphTexts
    from kalmkg.training.data import HrViews, TokenizedExamples, TokenRows, read_tokens, write_tokens

    texts = GraphTexts(["a", "b", "c"], ["r", "inverse of r"])
    tokens = TokenizedExamples(np.array([[0, 1, 2], [2, 1, 0]]), HrViews(texts, None),
                               TokenRows.of([[[1], [2, 3]], [[4, 5, 6]]]), TokenRows.of([[[9, 2], [], [8, 2]]]),
                               relation_lengths=np.array([5, 7]), pad_id=2)
    folder = tmp_path / "tokens"
    folder.mkdir()
    write_tokens(tokens, folder)
    write_npy(folder / "examples.npy", tokens.examples)
    back = read_tokens(folder, texts, None)
    assert back.tail_ids == tokens.tail_ids and back.target_ids == tokens.target_ids
    assert list(back.tail_ids) == [[1], [2, 3], [4, 5, 6]] and back.target_ids[1] == []
    assert np.array_equal(back.examples, tokens.examples) and back.relation_lengths.tolist() == [5, 7]
    assert back.pad_id == 2 and back.hr_index_of(np.array([[2, 1, 0]])) == [5]

    marker = tmp_path / "ran"
    _pickle_bomb(folder / "tail_ids.flat.npy", marker)
    with pytest.raises(KalmkgError, match="cannot read the run's token cache"):
        read_tokens(folder, texts, None)
    assert not marker.exists()


def test_a_checkpoint_is_read_as_tensors_only(tmp_path):
    from kalmkg.training.checkpoint import load_checkpoint

    marker = tmp_path / "ran"
    _pickle_bomb(tmp_path / "checkpoint" / "state.pt", marker)
    with pytest.raises(KalmkgError, match="not a checkpoint kalmkg wrote"):
        load_checkpoint(tmp_path / "checkpoint", learner=None, device="cpu")
    assert not marker.exists()


def test_a_checkpoint_kalmkg_wrote_resumes_under_weights_only(sample_ws, tiny_model):
    """Everything a checkpoint holds (optimizer, schedule, counters, pre-batch, random state) loads with
    weights_only=True (test_train checks that the resumed run equals a straight one)."""
    import torch

    from kalmkg.training.loop import TrainConfig, train

    cfg = TrainConfig(base=str(tiny_model), batch_size=8, max_steps=2, checkpoint_every=1, eval_limit=5,
                      precision="fp32", prebatch=1, learn_temperature=True, structure="none")
    run = train(sample_ws, cfg, run_id="w", stop_after=1)
    payload = torch.load(run.run_dir / "checkpoint" / "state.pt", weights_only=True)
    assert payload["state"]["step"] == 1 and payload["prebatch"]
    assert (run.run_dir / "tokens" / "examples.npy").is_file() and not (run.run_dir / "tokens.pt").exists()
    assert train(sample_ws, TrainConfig(), resume="w").steps == 2


def test_a_base_folder_with_only_pickled_weights_is_refused_in_one_line(tmp_path, tiny_model, sample_ws):
    import torch

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_model, folder)
    from safetensors.torch import load_file

    weights = {}
    for f in folder.glob("*.safetensors"):
        weights.update(load_file(f))
        f.unlink()
    torch.save(weights, folder / "pytorch_model.bin")
    proc = run_kalmkg("-w", sample_ws.root, "train", "--base", folder, "--dry-run", cwd=tmp_path)
    assert_one_line_error(proc, "no .safetensors weights", "pytorch_model.bin", "safetensors or GGUF")


def test_a_pickled_adapter_is_refused(tmp_path, tiny_model):
    from kalmkg.models import merged_model, resolve_base

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / "adapter_model.bin").write_bytes(b"\x80\x04N.")
    with pytest.raises(KalmkgError, match="the LoRA adapter in .* has no .safetensors weights"):
        merged_model(resolve_base(str(tiny_model)), adapter)


def test_chat_templates_render_in_a_sandbox():
    """ask renders the GGUF's template through llama-cpp-python, training and the Ollama export through
    transformers: both use jinja2's immutable sandbox, so a template cannot reach Python's internals."""
    from jinja2.exceptions import SecurityError
    from transformers.utils.chat_template_utils import render_jinja_template

    escape = "{{ ''.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(SecurityError):
        render_jinja_template([[{"role": "user", "content": "hi"}]], chat_template=escape)
    llama_cpp = pytest.importorskip("llama_cpp.llama_chat_format")
    formatter = llama_cpp.Jinja2ChatFormatter(template=escape, eos_token="</s>", bos_token="<s>")
    with pytest.raises(SecurityError):
        formatter(messages=[{"role": "user", "content": "hi"}])
