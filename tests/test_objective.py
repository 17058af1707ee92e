import math

import pytest
import torch
import torch.nn.functional as F

from kalmkg.training.objective import (
    LearnableTemperature,
    completion_loss,
    distillation_kl,
    false_negative_mask,
    info_nce,
    kalm_loss,
    last_token_pool,
)

# Two unit vectors per side, so every cosine is a readable number:
# cos = [[0.8, 0.28], [0.6, 0.96]]
HR = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
T = torch.tensor([[0.8, 0.6], [0.28, 0.96]])


def reference_losses(cos, margin, tau, mask=None, pos=None):
    """Both InfoNCE directions in plain Python; masked entries are simply left out."""
    B, N = len(cos), len(cos[0])
    pos = pos or list(range(B))
    mask = mask or [[False] * N for _ in range(B)]
    logit = [[(cos[i][j] - margin * (j == pos[i])) / tau for j in range(N)] for i in range(B)]
    hr_t = 0.0
    for i in range(B):
        z = sum(math.exp(logit[i][j]) for j in range(N) if not mask[i][j])
        hr_t += -logit[i][pos[i]] + math.log(z)
    t_hr = 0.0
    for i in range(B):
        j = pos[i]
        z = sum(math.exp(logit[k][j]) for k in range(B) if not mask[k][j])
        t_hr += -logit[i][j] + math.log(z)
    return hr_t / B, t_hr / B


# ---------------------------------------------------------------- pooling


def test_last_token_pool_right_left_and_mixed_padding():
    hidden = torch.arange(24, dtype=torch.float32).view(2, 4, 3)
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    mixed = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 1]])
    assert last_token_pool(hidden, right).tolist() == [[6, 7, 8], [15, 16, 17]]
    assert last_token_pool(hidden, left).tolist() == [[9, 10, 11], [21, 22, 23]]
    assert last_token_pool(hidden, mixed).tolist() == [[3, 4, 5], [21, 22, 23]]
    assert last_token_pool(hidden, right.bool()).tolist() == [[6, 7, 8], [15, 16, 17]]


# ---------------------------------------------------------------- info_nce


def test_info_nce_hand_computed_2x2():
    out = info_nce(HR, T, margin=0.02, temperature=0.05)
    # By hand: logits = [[(0.8-0.02)/0.05, 0.28/0.05], [0.6/0.05, (0.96-0.02)/0.05]]
    logits = [[15.6, 5.6], [12.0, 18.8]]
    hr_t = ((-15.6 + math.log(math.exp(15.6) + math.exp(5.6)))
            + (-18.8 + math.log(math.exp(12.0) + math.exp(18.8)))) / 2
    t_hr = ((-15.6 + math.log(math.exp(15.6) + math.exp(12.0)))
            + (-18.8 + math.log(math.exp(5.6) + math.exp(18.8)))) / 2
    assert out["logits"].flatten().tolist() == pytest.approx(sum(logits, []), abs=1e-4)
    assert out["loss_hr_t"].item() == pytest.approx(hr_t, abs=1e-5)
    assert out["loss_t_hr"].item() == pytest.approx(t_hr, abs=1e-5)
    assert out["loss"].item() == pytest.approx((hr_t + t_hr) / 2, abs=1e-5)
    assert out["accuracy"].item() == 1.0


def test_margin_only_moves_positive_logits_and_temperature_scales():
    a = info_nce(HR, T, margin=0.0, temperature=0.05)["logits"]
    b = info_nce(HR, T, margin=0.1, temperature=0.05)["logits"]
    assert (a - b).flatten().tolist() == pytest.approx([2.0, 0.0, 0.0, 2.0], abs=1e-5)
    c = info_nce(HR, T, margin=0.1, temperature=0.5)["logits"]
    assert torch.allclose(b * 0.05, c * 0.5, atol=1e-6)


def test_tensor_temperature_gets_gradient():
    tau = torch.tensor(0.05, requires_grad=True)
    info_nce(HR, T, margin=0.02, temperature=tau)["loss"].backward()
    assert tau.grad is not None and tau.grad.abs().item() > 0


def test_accuracy_counts_rows_whose_argmax_is_the_positive():
    # Row 1's positive (0.28) loses to column 0 (0.6).
    tails = torch.tensor([[0.8, 0.6], [0.96, 0.28]])
    hr = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    out = info_nce(hr, tails, margin=0.0, temperature=0.05)
    assert out["accuracy"].item() == 0.5


def test_general_positive_index_matches_reference():
    tails = torch.tensor([[0.6, 0.8], [0.8, 0.6], [0.0, 1.0]])
    pos = torch.tensor([2, 0])
    out = info_nce(HR, tails, margin=0.02, temperature=0.05, positive_index=pos)
    cos = (HR @ tails.T).tolist()
    hr_t, t_hr = reference_losses(cos, 0.02, 0.05, pos=[2, 0])
    assert out["loss_hr_t"].item() == pytest.approx(hr_t, abs=1e-4)
    assert out["loss_t_hr"].item() == pytest.approx(t_hr, abs=1e-4)


def test_masked_entries_do_not_contribute():
    tails = torch.cat([T, F.normalize(torch.tensor([[1.0, 1.0]]), dim=1)])
    mask = torch.tensor([[False, False, True], [True, False, True]])
    out = info_nce(HR, tails, margin=0.02, temperature=0.05, mask=mask)
    hr_t, t_hr = reference_losses((HR @ tails.T).tolist(), 0.02, 0.05, mask=mask.tolist())
    assert out["loss_hr_t"].item() == pytest.approx(hr_t, abs=1e-4)
    assert out["loss_t_hr"].item() == pytest.approx(t_hr, abs=1e-4)
    # Column 2 is masked for every row: moving its vector changes nothing.
    moved = tails.clone()
    moved[2] = torch.tensor([0.0, 1.0])
    again = info_nce(HR, moved, margin=0.02, temperature=0.05, mask=mask)
    assert again["loss"].item() == out["loss"].item()
    unmasked = info_nce(HR, tails, margin=0.02, temperature=0.05)
    assert unmasked["loss"].item() != pytest.approx(out["loss"].item())


def test_row_with_all_negatives_masked_is_finite_and_gradients_finite():
    hr, tails = HR.clone().requires_grad_(), T.clone().requires_grad_()
    mask = torch.tensor([[False, True], [True, False]])
    out = info_nce(hr, tails, margin=0.02, temperature=0.05, mask=mask)
    assert torch.isfinite(out["loss"])
    assert out["loss"].item() == pytest.approx(0.0, abs=1e-6)
    out["loss"].backward()
    assert torch.isfinite(hr.grad).all() and torch.isfinite(tails.grad).all()


def test_mask_never_removes_the_positive():
    mask = torch.tensor([[False, True], [True, False]])
    out = info_nce(HR, T, margin=0.02, temperature=0.05, mask=mask)
    full = info_nce(HR, T, margin=0.02, temperature=0.05, mask=torch.ones(2, 2, dtype=torch.bool))
    assert full["loss"].item() == pytest.approx(out["loss"].item(), abs=1e-6)
    assert full["accuracy"].item() == 1.0


def test_half_precision_inputs_give_float32_finite_logits():
    mask = torch.tensor([[False, True], [False, False]])
    out = info_nce(HR.bfloat16(), T.bfloat16(), margin=0.02, temperature=0.05, mask=mask)
    assert out["logits"].dtype == torch.float32
    assert torch.isfinite(out["loss"])


def test_extra_negatives_add_columns_for_hr_to_t_only():
    base = info_nce(HR, T, margin=0.02, temperature=0.05)
    # A pre-batch vector identical to row 0's positive is a hard negative for row 0.
    extra = T[:1].clone()
    out = info_nce(HR, T, margin=0.02, temperature=0.05, extra_negatives=extra)
    assert out["loss_hr_t"].item() > base["loss_hr_t"].item() + 0.1
    assert out["loss_t_hr"].item() == pytest.approx(base["loss_t_hr"].item())
    assert out["logits"].shape == (2, 2)
    # Row 0's loss by hand with the extra column cos = 0.8.
    row0 = -15.6 + math.log(math.exp(15.6) + math.exp(5.6) + math.exp(16.0))
    row1 = -18.8 + math.log(math.exp(12.0) + math.exp(18.8) + math.exp(0.6 / 0.05))
    assert out["loss_hr_t"].item() == pytest.approx((row0 + row1) / 2, abs=1e-4)
    masked = info_nce(HR, T, margin=0.02, temperature=0.05, extra_negatives=extra,
                      extra_mask=torch.ones(2, 1, dtype=torch.bool))
    assert masked["loss_hr_t"].item() == pytest.approx(base["loss_hr_t"].item(), abs=1e-6)


def test_self_negatives_add_one_column_per_row():
    base = info_nce(HR, T, margin=0.02, temperature=0.05)
    heads = torch.tensor([[0.6, 0.8], [0.0, 1.0]])  # cos(hr_i, head_i) = 0.6, 1.0
    out = info_nce(HR, T, margin=0.02, temperature=0.05, self_negatives=heads)
    row0 = -15.6 + math.log(math.exp(15.6) + math.exp(5.6) + math.exp(12.0))
    row1 = -18.8 + math.log(math.exp(12.0) + math.exp(18.8) + math.exp(20.0))
    assert out["loss_hr_t"].item() == pytest.approx((row0 + row1) / 2, abs=1e-4)
    assert out["loss_hr_t"].item() > base["loss_hr_t"].item()
    assert out["loss_t_hr"].item() == pytest.approx(base["loss_t_hr"].item())
    # Row 1's head is its tail: masking its self-negative leaves only row 0's.
    part = info_nce(HR, T, margin=0.02, temperature=0.05, self_negatives=heads,
                    self_negative_mask=torch.tensor([False, True]))
    row1_plain = -18.8 + math.log(math.exp(12.0) + math.exp(18.8))
    assert part["loss_hr_t"].item() == pytest.approx((row0 + row1_plain) / 2, abs=1e-4)


# ---------------------------------------------------------------- false negatives


def test_false_negative_mask_masks_all_known_pairs_but_not_positives():
    # rows: (h, r) -> tail; rows 0 and 1 share (1, 0); row 3 repeats tail 10 and its query is
    # unknown to the graph; column 4 is an extra candidate (e.g. from another rank).
    hr = torch.tensor([[1, 0], [1, 0], [2, 0], [3, 1]])
    tails = torch.tensor([10, 11, 12, 10])
    cand = torch.tensor([10, 11, 12, 10, 13])
    known = {(1, 0): frozenset({10, 11}), (2, 0): frozenset({12, 13}), (9, 9): frozenset({11})}
    mask = false_negative_mask(hr, tails, cand, known)
    expected = [
        [False, True, False, True, False],   # 11 known for (1,0); 10 repeated in column 3
        [True, False, False, True, False],   # 10 known for (1,0), in columns 0 and 3
        [False, False, False, False, True],  # 13 known for (2,0) only
        [True, False, False, False, False],  # unknown query: only the repeated tail id
    ]
    assert mask.dtype == torch.bool
    assert mask.tolist() == expected
    assert not mask.diagonal().any()


def test_false_negative_mask_respects_positive_index():
    hr = torch.tensor([[1, 0], [1, 0]])
    tails = torch.tensor([10, 11])
    cand = torch.tensor([11, 10, 10])
    known = {(1, 0): {10, 11}}
    mask = false_negative_mask(hr, tails, cand, known, positive_index=torch.tensor([1, 0]))
    assert mask.tolist() == [[True, False, True], [False, True, True]]


def test_false_negative_mask_without_a_positive_column_masks_every_known_answer():
    # pre-batch columns: the row's positive is not among them (-1), so every known answer is masked,
    # the last column included
    hr = torch.tensor([[1, 0], [2, 0]])
    tails = torch.tensor([10, 12])
    cand = torch.tensor([13, 11, 10])
    known = {(1, 0): {10, 11}}
    mask = false_negative_mask(hr, tails, cand, known, positive_index=torch.tensor([-1, -1]))
    assert mask.tolist() == [[False, True, True], [False, False, False]]


# ---------------------------------------------------------------- language modelling


def test_completion_loss_is_the_mean_over_examples_of_each_examples_token_mean():
    torch.manual_seed(0)
    logits = [torch.randn(2, 7), torch.randn(4, 7)]
    targets = [torch.tensor([3, 4]), torch.tensor([1, 2, 6, 0])]
    per_example = [torch.stack([-torch.log_softmax(x[j], dim=-1)[y[j]] for j in range(len(y))]).mean()
                   for x, y in zip(logits, targets)]
    expected = (per_example[0] + per_example[1]) / 2  # not the mean over all 6 tokens
    assert completion_loss(logits, targets).item() == pytest.approx(expected.item(), abs=1e-6)
    token_mean = torch.cat([-torch.log_softmax(x, -1).gather(1, y[:, None])[:, 0] for x, y in zip(logits, targets)])
    assert completion_loss(logits, targets).item() != pytest.approx(token_mean.mean().item(), abs=1e-4)


def test_completion_loss_of_a_split_batch_averages_to_the_whole():
    """What makes the loss of a batch split over processes average to the single-process loss."""
    torch.manual_seed(1)
    logits = [torch.randn(n, 5) for n in (1, 3, 2, 5)]
    targets = [torch.randint(0, 5, (n,)) for n in (1, 3, 2, 5)]
    halves = (completion_loss(logits[:2], targets[:2]) + completion_loss(logits[2:], targets[2:])) / 2
    assert halves.item() == pytest.approx(completion_loss(logits, targets).item(), abs=1e-6)


def test_completion_loss_is_float32_and_differentiable_from_half_logits():
    logits = [torch.randn(3, 6, dtype=torch.bfloat16, requires_grad=True)]
    loss = completion_loss(logits, [torch.tensor([0, 5, 2])])
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert logits[0].grad is not None and torch.isfinite(logits[0].grad.float()).all()


def test_distillation_kl_is_the_mean_over_replies_of_each_replys_mean_kl_from_the_reference():
    torch.manual_seed(2)
    run = [torch.randn(2, 6), torch.randn(5, 6)]
    base = [torch.randn(2, 6), torch.randn(5, 6)]

    def kl(p_logits, q_logits):  # KL(p || q) per position, summed over the vocabulary
        p, q = p_logits.softmax(-1), q_logits.softmax(-1)
        return (p * (p.log() - q.log())).sum(-1)

    expected = (kl(base[0], run[0]).mean() + kl(base[1], run[1]).mean()) / 2
    assert distillation_kl(run, base).item() == pytest.approx(expected.item(), abs=1e-6)
    # the direction counts: KL(base || run), not KL(run || base)
    assert distillation_kl(run, base).item() != pytest.approx(((kl(run[0], base[0]).mean() +
                                                              kl(run[1], base[1]).mean()) / 2).item(), abs=1e-4)
    assert distillation_kl(base, base).item() == pytest.approx(0.0, abs=1e-6)


def test_distillation_kl_moves_only_the_run_and_pulls_it_to_the_reference():
    torch.manual_seed(3)
    run = torch.randn(4, 8, dtype=torch.bfloat16, requires_grad=True)
    base = torch.randn(4, 8, requires_grad=True)
    loss = distillation_kl([run], [base])
    assert loss.dtype == torch.float32 and loss.item() > 0
    loss.backward()
    assert base.grad is None and run.grad is not None
    stepped = run.detach().float() - 5.0 * run.grad.float()
    assert distillation_kl([stepped], [base.detach()]).item() < loss.item()


def test_kalm_loss():
    assert kalm_loss(torch.tensor(2.0), torch.tensor(3.0), 0.01).item() == pytest.approx(2.03)
    assert kalm_loss(torch.tensor(2.0), None, 0.01).item() == 2.0


# ---------------------------------------------------------------- temperature


def test_learnable_temperature_is_a_parameter_with_gradient():
    temp = LearnableTemperature(init=0.05, learnable=True)
    params = list(temp.parameters())
    assert len(params) == 1
    tau = temp()
    assert tau.item() == pytest.approx(0.05)
    info_nce(HR, T, margin=0.02, temperature=tau)["loss"].backward()
    assert params[0].grad is not None and params[0].grad.abs().item() > 0


def test_fixed_temperature_has_no_parameters():
    temp = LearnableTemperature(init=0.05, learnable=False)
    assert list(temp.parameters()) == []
    assert "log_inv_tau" in temp.state_dict()
    assert temp().item() == pytest.approx(0.05)
    assert not temp().requires_grad


def test_temperature_clamped_but_still_trainable_beyond_bound():
    temp = LearnableTemperature(init=0.05, learnable=True)
    with torch.no_grad():
        temp.log_inv_tau.fill_(math.log(1e4))  # tau = 1e-4, below the bound
    tau = temp()
    assert tau.item() == pytest.approx(1e-3)
    tau.backward()
    assert temp.log_inv_tau.grad.abs().item() > 0
