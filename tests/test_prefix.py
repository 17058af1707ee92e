"""The frozen-layer cache: what it keeps, when it is on, and that it never changes what the model computes."""

from __future__ import annotations

import warnings

import pytest

from kalmkg.encode import last_hidden

from kalmkg.training.config import TrainConfig


def lora_model(tiny_model, **overrides):
    from kalmkg.models import apply_lora, load_base, resolve_base

    model, tokenizer = load_base(resolve_base(str(tiny_model)))
    return apply_lora(model, TrainConfig(lora_dropout=0.0, **overrides)), tokenizer


def rows_of(tokenizer, texts):
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


TEXTS = ["Paris capital of France", "Berlin", "Rome is the capital of Italy and Europe", "Lisbon Portugal"]


def test_only_a_frozen_bottom_that_runs_without_dropout_is_kept(tiny_model):
    import torch

    from kalmkg.models import backbone
    from kalmkg.training.prefix import prefix_for, trained_from

    top, _ = lora_model(tiny_model, lora_layers=1)
    assert trained_from(backbone(top)) == 1
    assert prefix_for(top, 64) is not None
    assert prefix_for(top, 0) is None  # --frozen-cache-mb 0: off
    every, _ = lora_model(tiny_model, lora_layers=0)
    assert trained_from(backbone(every)) is None and prefix_for(every, 64) is None
    full, _ = lora_model(tiny_model, full=True)
    assert prefix_for(full, 64) is None
    backbone(top).config.layer_types = ["sliding_attention", "full_attention"]  # looked up by position
    assert prefix_for(top, 64) is None
    backbone(top).config.layer_types = ["full_attention", "full_attention"]
    assert prefix_for(top, 64) is not None
    backbone(top).config.attention_dropout = 0.1  # the bottom's output would be random
    assert prefix_for(top, 64) is None
    backbone(top).config.attention_dropout = 0.0
    backbone(top).embed_dropout = torch.nn.Dropout(0.1)  # dropout outside the layers counts too
    assert prefix_for(top, 64) is None


def test_kept_states_give_the_whole_models_hidden_states_and_stay_in_budget(tiny_model):
    import torch

    from kalmkg.encode import pad_rows
    from kalmkg.models import backbone
    from kalmkg.training.prefix import prefix_for

    model, tokenizer = lora_model(tiny_model, lora_layers=1)
    rows = rows_of(tokenizer, TEXTS)
    ids, mask = pad_rows(rows, 0)
    with torch.no_grad():
        whole = backbone(model)(input_ids=ids, attention_mask=mask).last_hidden_state
    one_row = max(len(r) for r in rows) * model.config.hidden_size * 4 / 2**20
    prefix = prefix_for(model, 2.5 * one_row)  # room for two or three of the four rows
    for _ in range(2):
        with torch.no_grad():
            split = last_hidden(None, rows, 0, "cpu", prefix)[0]
        real = mask.bool()
        torch.testing.assert_close(split[real], whole[real], rtol=1e-5, atol=1e-5)
    stats = prefix.stats()
    assert 1 <= stats["rows"] < len(rows) and prefix.bytes <= prefix.budget  # least recently used out
    assert sum(b.numel() for b in prefix.kept.buffers) <= prefix.budget
    assert stats["misses"] >= 4 and not stats["off"]
    # a row met again is found, whatever it is batched with and however wide the batch
    j = next(j for j, r in enumerate(rows) if (None, *r) in prefix.kept)
    with torch.no_grad():
        alone = last_hidden(None, rows[j:j + 1], 0, "cpu", prefix)[0]
    assert prefix.stats()["hits"] == stats["hits"] + 1
    torch.testing.assert_close(alone[0, : len(rows[j])], whole[j, : len(rows[j])], rtol=1e-5, atol=1e-5)


def test_a_decoder_that_does_not_split_turns_the_cache_off_and_still_answers_right(tiny_model):
    import torch

    from kalmkg.encode import pad_rows
    from kalmkg.models import backbone
    from kalmkg.training.prefix import prefix_for

    model, tokenizer = lora_model(tiny_model, lora_layers=1)
    decoder = backbone(model)
    forward = decoder.forward

    def scaled(*args, inputs_embeds=None, input_ids=None, **kwargs):  # as Gemma scales its embeddings
        if inputs_embeds is None:
            inputs_embeds = decoder.embed_tokens(input_ids)
        return forward(*args, inputs_embeds=inputs_embeds * 3.0, **kwargs)

    decoder.forward = scaled
    rows = rows_of(tokenizer, TEXTS)
    ids, mask = pad_rows(rows, 0)
    prefix = prefix_for(model, 64)
    with torch.no_grad(), pytest.warns(UserWarning, match="does not split"):
        out = last_hidden(None, rows, 0, "cpu", prefix)[0]
    with torch.no_grad():
        whole = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
    assert prefix.stats()["off"] and prefix.stats()["rows"] == 0
    torch.testing.assert_close(out, whole)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once
        with torch.no_grad():
            last_hidden(None, rows, 0, "cpu", prefix)[0]


def test_validation_encodes_with_the_kept_states_and_gets_the_same_vectors(tiny_model):
    import torch

    from kalmkg.encode import TorchEncoder
    from kalmkg.training.prefix import prefix_for

    model, tokenizer = lora_model(tiny_model, lora_layers=1)
    model.train()
    prefix = prefix_for(model, 64)
    plain = TorchEncoder(model, tokenizer).encode(TEXTS)
    kept = TorchEncoder(model, tokenizer, prefix=prefix)
    for _ in range(2):  # the second finds every row
        torch.testing.assert_close(torch.as_tensor(kept.encode(TEXTS)), torch.as_tensor(plain), rtol=1e-5, atol=1e-5)
    assert prefix.stats()["hits"] == len(TEXTS) and model.training  # the run goes on in training mode


def test_a_validation_scan_larger_than_the_budget_keeps_the_training_rows(tiny_model):
    import torch

    from kalmkg.encode import TorchEncoder
    from kalmkg.training.prefix import prefix_for

    model, tokenizer = lora_model(tiny_model, lora_layers=1)
    rows = rows_of(tokenizer, TEXTS)
    one_row = max(len(r) for r in rows) * model.config.hidden_size * 4 / 2**20
    prefix = prefix_for(model, 2.5 * one_row)
    with torch.no_grad():
        last_hidden(None, rows[:1], 0, "cpu", prefix)[0]  # a training row
    TorchEncoder(model, tokenizer, prefix=prefix).encode(TEXTS[1:] * 3)
    assert (None, *rows[0]) in prefix.kept and prefix.bytes <= prefix.budget


def test_slabs_keep_rows_within_the_budget_and_empty_the_least_recently_used_slab_whole():
    import torch

    from kalmkg.training.prefix import Slabs

    row = torch.arange(12, dtype=torch.float32).reshape(3, 4)  # 48 bytes, 64 with alignment
    slabs = Slabs(budget=3 * 128, slab_bytes=128)  # three slabs of two rows each
    for i in range(6):
        assert slabs.put(("r", i), row + i)
    assert len(slabs) == 6 and len(slabs.buffers) == 3 and slabs.bytes == 6 * 64
    torch.testing.assert_close(slabs.get(("r", 0)), row)  # slab 0 is now the most recently used
    assert slabs.put(("r", 6), row + 6)  # no room: slab 1 (rows 2, 3) is the least recently used
    assert ("r", 2) not in slabs and ("r", 3) not in slabs and ("r", 0) in slabs and ("r", 5) in slabs
    torch.testing.assert_close(slabs.get(("r", 6)), row + 6)
    torch.testing.assert_close(slabs.get(("r", 5)), row + 5)  # other slabs' rows untouched
    assert sum(b.numel() for b in slabs.buffers) <= 3 * 128  # the budget bounds what is reserved
    # a validation scan (evict off) fills free room only; a row larger than a slab is never kept
    assert slabs.put(("r", 7), row + 7, evict=False)
    assert not slabs.put(("r", 8), row + 8, evict=False) and ("r", 8) not in slabs
    assert not slabs.put(("big",), torch.zeros(40)) and ("big",) not in slabs
    # rows of other dtypes share the slabs, each read back as it was written
    half = torch.linspace(0, 1, 6, dtype=torch.bfloat16).reshape(2, 3)
    assert slabs.put(("h",), half)
    got = slabs.get(("h",))
    assert got.dtype == torch.bfloat16 and torch.equal(got, half)
    assert Slabs(budget=0).put(("x",), row) is False  # no budget: nothing kept
