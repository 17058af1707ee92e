"""LoRA's CPU dropout (training/dropout.py): the same distribution and scaling as nn.Dropout."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from kalmkg.training.dropout import WordDropout, effective_p, keep_mask, use_word_dropout, word_dropout  # noqa: E402


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_drops_p_of_the_elements_and_keeps_the_mean(p):
    torch.manual_seed(0)
    n = 1_000_003  # not a multiple of the 4 words in an int64
    y = word_dropout(torch.ones(n), p)
    dropped = (y == 0).double().mean().item()
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(dropped - p) < 5 * sigma
    assert abs(effective_p(p) - p) < 1e-5
    assert torch.allclose(y[y != 0], torch.tensor(1 / (1 - effective_p(p))))
    assert abs(y.double().mean().item() - 1) < 5 * sigma / (1 - p)


def test_every_word_of_the_random_integers_is_used_alike():
    # each int64 gives 4 masks; a generator that leaves the sign bit 0 would never drop every fourth
    torch.manual_seed(1)
    keep = keep_mask(torch.Size([400_000, 4]), 0.25)
    per_word = 1 - keep.double().mean(0)
    assert torch.all((per_word - 0.25).abs() < 0.01), per_word


def test_mask_follows_the_seed():
    torch.manual_seed(3)
    a = keep_mask(torch.Size([64, 64]), 0.3)
    torch.manual_seed(3)
    b = keep_mask(torch.Size([64, 64]), 0.3)
    c = keep_mask(torch.Size([64, 64]), 0.3)
    assert torch.equal(a, b)
    assert not torch.equal(b, c)


def test_gradient_is_the_mask_times_the_scale():
    torch.manual_seed(0)
    x = torch.randn(50, 30, requires_grad=True)
    y = word_dropout(x, 0.2)
    y.sum().backward()
    kept = y != 0
    assert torch.allclose(x.grad[kept], torch.tensor(1 / (1 - effective_p(0.2))))
    assert torch.all(x.grad[~kept] == 0)


def test_module_is_identity_in_eval_and_with_p_zero():
    x = torch.randn(8, 8)
    drop = WordDropout(0.5).eval()
    assert torch.equal(drop(x), x)
    assert torch.equal(WordDropout(0.0).train()(x), x)
    assert torch.equal(word_dropout(x, 1.0), torch.zeros_like(x))


def test_replaces_lora_dropout_of_a_peft_model(tiny_model):
    from kalmkg.models import apply_lora, load_base, resolve_base
    from kalmkg.training.config import TrainConfig

    model, _ = load_base(resolve_base(str(tiny_model)))
    model = apply_lora(model, TrainConfig(lora_dropout=0.1, lora_layers=0))
    n_lora = sum(1 for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), torch.nn.ModuleDict))
    assert n_lora > 0
    assert use_word_dropout(model) == n_lora
    assert not any(type(m) is torch.nn.Dropout and m.p > 0 for m in model.modules()
                   if m is not None and hasattr(m, "p"))
    assert sum(isinstance(m, WordDropout) for m in model.modules()) == n_lora


def test_training_on_a_cpu_uses_it(tiny_model):
    from kalmkg.models import load_base, resolve_base
    from kalmkg.training.config import TrainConfig
    from kalmkg.training.learner import build_learner

    model, _ = load_base(resolve_base(str(tiny_model)))
    learner = build_learner(model, TrainConfig(lora_dropout=0.1, lora_layers=0, lr=1e-3, precision="fp32"),
                            total_steps=10, device="cpu")
    assert any(isinstance(m, WordDropout) for m in learner.model.modules())


def test_a_dropout_of_one_or_more_is_refused():
    from kalmkg.errors import KalmkgError
    from kalmkg.training.config import TrainConfig

    with pytest.raises(KalmkgError, match=r"--lora-dropout must be in \[0, 1\)"):
        TrainConfig(lora_dropout=1.0)
