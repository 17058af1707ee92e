"""Base model resolution and loading, LoRA wrapping, and the backbone used for embeddings."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_model import make_tiny_llama  # noqa: E402

from kalmkg.errors import KalmkgError  # noqa: E402
from kalmkg.models import (  # noqa: E402
    apply_lora,
    backbone,
    load_base,
    resolve_base,
)
from kalmkg.training.config import TrainConfig  # noqa: E402

torch = pytest.importorskip("torch")


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts; parameters() yields a shared (tied) tensor once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny"))


@pytest.fixture()
def tiny(tiny_dir):
    return load_base(resolve_base(str(tiny_dir)))


def test_tiny_model_is_deterministic(tmp_path):
    a = make_tiny_llama(tmp_path / "a", seed=3)
    b = make_tiny_llama(tmp_path / "b", seed=3)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_tiny_model_resolves_as_local_folder_and_loads(tiny_dir):
    resolved = resolve_base(str(tiny_dir))
    assert resolved.source == "local"
    assert Path(resolved.path) == tiny_dir.resolve()
    assert resolved.fingerprint == resolve_base(str(tiny_dir)).fingerprint
    model, tokenizer = load_base(resolved)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.dtype == torch.float32
    assert tokenizer.pad_token == "<pad>" and tokenizer.padding_side == "right"
    ids = tokenizer("Zürich is the capital of nowhere, 1789!").input_ids
    assert tokenizer.unk_token_id not in ids  # byte-level BPE: no unknown tokens


def test_missing_pad_token_falls_back_to_eos(tmp_path):
    model, tokenizer = load_base(resolve_base(str(make_tiny_llama(tmp_path, pad_token=False))))
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    assert model.config.pad_token_id == tokenizer.eos_token_id


def test_lora_goes_on_ffn_projections_only(tiny):
    model, _ = tiny
    embed_before = model.get_input_embeddings().weight.detach().clone()
    _, total_before = count_parameters(model)
    peft_model = apply_lora(model, TrainConfig())
    lora_parents = {n.rsplit(".", 2)[-2] for n, _ in peft_model.named_modules() if n.endswith(".lora_A")}
    assert lora_parents == {"gate_proj", "up_proj", "down_proj"}
    trainable_names = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable_names and all(".lora_" in n for n in trainable_names)
    assert not any("embed" in n or "lm_head" in n for n in trainable_names)
    trainable, total = count_parameters(peft_model)
    assert 0 < trainable < total and total == total_before + trainable
    base = peft_model.get_base_model()
    assert base.lm_head.weight is base.model.embed_tokens.weight  # still tied, untouched
    assert torch.equal(base.model.embed_tokens.weight, embed_before)


@pytest.mark.parametrize("target", ["lm_head", "embed_tokens", "model.embed_tokens"])
def test_lora_on_embeddings_or_head_is_rejected(tiny, target):
    model, _ = tiny
    with pytest.raises(KalmkgError, match="never adapts"):
        apply_lora(model, TrainConfig(lora_targets=("up_proj", target)))


def test_unknown_lora_target_lists_the_linear_modules(tiny):
    model, _ = tiny
    with pytest.raises(KalmkgError) as err:
        apply_lora(model, TrainConfig(lora_targets=("gate_proj", "ffn_in")))
    message = str(err.value)
    assert "'ffn_in'" in message
    for name in ("gate_proj", "up_proj", "down_proj", "q_proj", "o_proj"):
        assert name in message
    assert "lm_head" not in message


def test_full_fine_tuning_trains_everything(tiny):
    model, _ = tiny
    model = apply_lora(model, TrainConfig(full=True))
    trainable, total = count_parameters(model)
    assert trainable == total


@pytest.mark.parametrize("with_lora", [False, True])
@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_backbone_gives_the_last_hidden_state(tiny, with_lora, padding_side):
    model, tokenizer = tiny
    if with_lora:
        model = apply_lora(model, TrainConfig())
        for name, p in model.named_parameters():  # make the adapters matter (lora_B starts at zero)
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.5)
    model.eval()
    tokenizer.padding_side = padding_side
    batch = tokenizer(["[ Paris, capital of ]", "{ France }"], return_tensors="pt", padding=True)
    with torch.no_grad():
        full = model(**batch, output_hidden_states=True).hidden_states[-1]
        stack = backbone(model)(**batch).last_hidden_state
    assert not hasattr(backbone(model), "lm_head")
    torch.testing.assert_close(stack, full)


def test_unknown_base_spec_lists_accepted_forms():
    with pytest.raises(KalmkgError, match="hub id") as err:
        resolve_base("not a model!")
    assert "smollm2-135m" in str(err.value)


def test_offline_uncached_hub_id_says_how_to_pass_a_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.perf_counter()
    with pytest.raises(KalmkgError) as err:
        resolve_base("kalmkg-tests/no-such-model-7f3c9a")
    message = str(err.value)
    assert "--base" in message and "\n" not in message
    assert time.perf_counter() - start < 5  # no network retries


def test_offline_cached_hub_id_loads_from_the_snapshot(monkeypatch, tmp_path, tiny_dir):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    repo = tmp_path / "hub" / "models--kalmkg-tests--tiny"
    snapshot = repo / "snapshots" / ("ab" * 20)
    snapshot.mkdir(parents=True)
    for f in tiny_dir.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("ab" * 20)
    resolved = resolve_base("kalmkg-tests/tiny")
    assert resolved.source == "hub" and Path(resolved.path) == snapshot
    model, _ = load_base(resolved)
    assert type(model).__name__ == "LlamaForCausalLM"


def test_missing_gguf_file_is_an_error(tmp_path):
    with pytest.raises(KalmkgError, match="not found"):
        resolve_base(str(tmp_path / "model.Q4_K_M.gguf"))


def test_a_file_that_is_not_gguf_is_an_error(tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf at all")
    with pytest.raises(KalmkgError, match="not a GGUF"):
        resolve_base(str(fake))


def test_folder_without_config_is_an_error(tmp_path):
    with pytest.raises(KalmkgError, match="config.json"):
        resolve_base(str(tmp_path))


def test_encoder_model_is_rejected_naming_its_architecture(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "bert", "architectures": ["BertForMaskedLM"], "vocab_size": 100})
    )
    with pytest.raises(KalmkgError, match="BertForMaskedLM"):
        resolve_base(str(tmp_path))


@pytest.mark.slow
def test_embedded_smollm2_is_converted_once_then_cached(tmp_path):
    start = time.perf_counter()
    resolved = resolve_base("smollm2-135m", cache_dir=tmp_path)
    model, tokenizer = load_base(resolved)
    first = time.perf_counter() - start
    assert resolved.source == "embedded" and resolved.name == "SmolLM2-135M-Instruct"
    folder = Path(resolved.path)
    assert folder.parent == tmp_path and (folder / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dir left behind
    _, total = count_parameters(model)
    assert 130e6 < total < 140e6
    assert tokenizer.pad_token is not None and tokenizer.eos_token is not None

    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    batch = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        logits = model(**batch).logits
    assert torch.isfinite(logits).all()
    answer = tokenizer.decode(out[0, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer

    start = time.perf_counter()
    again = resolve_base("smollm2-135m", cache_dir=tmp_path)
    load_base(again)
    cached = time.perf_counter() - start
    assert again == resolved
    assert cached < 3, f"cached load took {cached:.1f} s (first: {first:.1f} s)"
    print(f"\nembedded SmolLM2: first load {first:.1f} s, cached {cached:.2f} s, {total:,} parameters")
