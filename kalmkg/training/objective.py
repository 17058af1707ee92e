"""The KaLM training objective as pure functions of tensors.

    L_KaLM = L_exp + lambda * L_imp

L_exp is a dual-view InfoNCE between head-relation embeddings and tail embeddings (both the
last-token hidden state of the same LLM, L2-normalised); L_imp is next-token cross-entropy on
the tail tokens of a triple-completion prompt. Nothing here knows about models, tokenizers or
devices: the training step (`step.py`) pools, normalises, gathers across ranks and calls these;
they are every loss training runs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from kalmkg.training.config import TEMPERATURE_RANGE  # where tau is clamped (the one place it is set)

# Fill value for masked logits. Logits are upcast to float32 before masking, so half of float32's
# minimum is below any real logit (|cos/tau| <= 1/tau) at any temperature, unlike a fixed -1e4,
# yet finite, so no inf - inf can reach logsumexp, softmax or the logged logits. Subtracting the
# row maximum from it cannot overflow.
_MASKED = torch.finfo(torch.float32).min / 2


def last_token_pool(hidden: Tensor, attention_mask: Tensor) -> Tensor:
    """Hidden state at the last non-padding token of each row.

    out[b] = hidden[b, t_b],  t_b = max{t : attention_mask[b, t] = 1}

    Works for left and right padding alike because t_b is found per row from the mask rather
    than assumed to be T-1 or sum(mask)-1. Not normalised. hidden: [B, T, D], mask: [B, T].
    """
    T = attention_mask.shape[1]
    positions = torch.arange(T, device=attention_mask.device)
    # Position-weighted mask: its argmax is the position of the last 1 (positions are distinct).
    last = (attention_mask.long() * positions).argmax(dim=1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def false_negative_mask(
    hr: Tensor,
    tails: Tensor,
    cand_tails: Tensor,
    known_tails: Mapping[tuple[int, int], frozenset[int] | set[int]],
    positive_index: Tensor | None = None,
) -> Tensor:
    """Which candidate columns are known true answers of a row's query, other than its positive.

    mask[i, j] = (cand_tails[j] in known_tails[(h_i, r_i)]  or  cand_tails[j] = tails[i])
                 and  j != positive_index[i]

    hr: [B, 2] (head id, relation id); tails: [B] the target tail id of each row;
    cand_tails: [N] the entity id behind each candidate column; positive_index: [B], default
    arange(B), -1 where the row's positive is not among the candidates (pre-batch columns). Returns a bool [B, N]. Masks every known true pair of the training graph, not
    only repeated tail ids (the released KaLM code only ever matched the latter). A query absent
    from known_tails still gets its repeated tail ids masked.
    """
    B, N = hr.shape[0], cand_tails.shape[0]
    if positive_index is None:
        positive_index = torch.arange(B)
    cand = cand_tails.detach().cpu()
    mask = torch.zeros(B, N, dtype=torch.bool)
    # One Python lookup per row: B is a batch (tens to hundreds), the set sizes are small, and
    # isin does the [N]-wide work in C.
    for i, ((h, r), t) in enumerate(zip(hr.tolist(), tails.tolist())):
        answers = set(known_tails.get((h, r), ())) | {t}
        mask[i] = torch.isin(cand, torch.tensor(sorted(answers), dtype=cand.dtype))
    positive_index = positive_index.cpu()
    has_positive = positive_index >= 0
    mask[torch.arange(B)[has_positive], positive_index[has_positive]] = False
    return mask.to(cand_tails.device)


def info_nce(
    hr: Tensor,
    tails: Tensor,
    *,
    margin: float,
    temperature: Tensor | float,
    mask: Tensor | None = None,
    positive_index: Tensor | None = None,
    extra_negatives: Tensor | None = None,
    extra_mask: Tensor | None = None,
    self_negatives: Tensor | None = None,
    self_negative_mask: Tensor | None = None,
) -> dict[str, Tensor]:
    """Dual-view InfoNCE with additive margin on the positive (KaLM's L_exp, SimKGC options).

    hr: [B, D] and tails: [N, D], N >= B, both already L2-normalised; row i's positive is column
    p_i = positive_index[i] (default i). Main logits, [B, N]:

        s_ij = (cos(hr_i, t_j) - margin * [j = p_i]) / tau,   s_ij = -inf where mask[i, j], j != p_i

    hr->t: cross-entropy of row i over its N main columns plus optional extra columns
        extra_negatives [M, D]:  cos(hr_i, e_m) / tau    (pre-batch tails; extra_mask [B, M])
        self_negatives  [B, D]:  cos(hr_i, self_i) / tau (the head as a tail; self_negative_mask
                                 [B] drops it where the head is the tail)
    t->hr: cross-entropy of column p_i over the B rows, s_{k p_i} for k = 1..B, target k = i
        (main columns only).

    Returns loss = (loss_hr_t + loss_t_hr) / 2, both parts, accuracy = fraction of rows whose
    argmax over the main columns is p_i, and the detached main logits [B, N].
    """
    B, N = hr.shape[0], tails.shape[0]
    if positive_index is None:
        positive_index = torch.arange(B, device=hr.device)
    # Upcast: under bf16/fp16 autocast the matmul comes out in half precision; the margin,
    # the division by tau (bf16 spacing is 0.125 near 1/tau = 20) and the softmax are done in
    # float32 so they add no rounding of their own, and the mask fill value is always valid.
    cos = (hr @ tails.T).float()
    positive = F.one_hot(positive_index, N).to(cos.dtype)
    logits = (cos - margin * positive) / temperature
    if mask is not None:
        # The positive stays whatever the mask says: a masked target would make its row's loss
        # about 1e38 instead of the log(N) a false-negative mask is meant to lower it towards.
        logits = logits.masked_fill(mask & ~positive.bool(), _MASKED)

    columns = [logits]
    if extra_negatives is not None:
        extra = (hr @ extra_negatives.T).float() / temperature
        if extra_mask is not None:
            extra = extra.masked_fill(extra_mask, _MASKED)
        columns.append(extra)
    if self_negatives is not None:
        self_logit = (hr * self_negatives).sum(dim=-1, keepdim=True).float() / temperature
        if self_negative_mask is not None:
            self_logit = self_logit.masked_fill(self_negative_mask.view(B, 1), _MASKED)
        columns.append(self_logit)

    rows = torch.arange(B, device=hr.device)
    loss_hr_t = F.cross_entropy(torch.cat(columns, dim=1), positive_index)
    # Column p_i read down the B rows; its correct "class" is row i.
    loss_t_hr = F.cross_entropy(logits[:, positive_index].T, rows)
    accuracy = (logits.detach().argmax(dim=1) == positive_index).float().mean()
    return {
        "loss": (loss_hr_t + loss_t_hr) / 2,
        "loss_hr_t": loss_hr_t,
        "loss_t_hr": loss_t_hr,
        "accuracy": accuracy,
        "logits": logits.detach(),
    }


def completion_loss(logits: Sequence[Tensor], targets: Sequence[Tensor]) -> Tensor:
    """KaLM's L_imp, the triple-completion LM loss: cross-entropy of each example's target tokens,
    mean over its tokens, then over the examples.

        L_imp = 1/n sum_i 1/|y_i| sum_j -log softmax(logits_i[j])[y_i[j]]

    logits_i: [L_i, V], the logits at the positions that predict the target y_i: [L_i] (tail text +
    EOS). In a completion sequence prompt + y_i that is positions len(prompt) - 1 ... len(prompt) +
    L_i - 2: the prompt's last token predicts y_i[0]. Only those positions need the LM head.

    The mean per example first makes the value the same however the examples are spread over
    processes, so averaging across processes gives the single-process loss. n >= 1.
    """
    per_example = [F.cross_entropy(x.float(), y.to(x.device)) for x, y in zip(logits, targets, strict=True)]
    return torch.stack(per_example).mean()


def distillation_kl(logits: Sequence[Tensor], reference: Sequence[Tensor]) -> Tensor:
    """A guard against drift: KL(reference || run) of the next-token distributions at each reply's
    positions, mean over its positions, then over the replies (as completion_loss, so it averages
    across processes the same way).

        KL_i = 1/|y_i| sum_j sum_v p_ref(v | j) (log p_ref(v | j) - log p_run(v | j))

    logits_i, reference_i: [L_i, V] at the same positions; the reference (the frozen base) gets no
    gradient. The forward KL from the base puts weight where the base is confident, which is where
    its instruction following lives; zero when the run's distributions are the base's. n >= 1.
    """
    per_reply = [F.kl_div(F.log_softmax(x.float(), dim=-1), F.log_softmax(ref.detach().float().to(x.device), dim=-1),
                          log_target=True, reduction="batchmean")
                 for x, ref in zip(logits, reference, strict=True)]
    return torch.stack(per_reply).mean()


def kalm_loss(l_exp: Tensor, l_imp: Tensor | None, lm_weight: float) -> Tensor:
    """L_KaLM = L_exp + lm_weight * L_imp (just L_exp when there is no LM part this step)."""
    return l_exp if l_imp is None else l_exp + lm_weight * l_imp


class LearnableTemperature(torch.nn.Module):
    """InfoNCE temperature tau, stored as log(1/tau) like CLIP and SimKGC so it stays positive.

    forward() -> tau = clamp(exp(-log_inv_tau), 1e-3, 1.0). With learnable=False log_inv_tau is a
    buffer (moves with .to(), saved in state_dict, never trained). Keep it out of weight decay:
    decay pulls log(1/tau) to 0, i.e. tau to 1.
    """

    def __init__(self, init: float = 0.05, learnable: bool = True, min: float = TEMPERATURE_RANGE[0],
                 max: float = TEMPERATURE_RANGE[1]):
        super().__init__()
        if not min <= init <= max:
            raise ValueError(f"temperature init {init} outside [{min}, {max}]")
        self.min, self.max = min, max
        value = torch.tensor(math.log(1.0 / init))
        if learnable:
            self.log_inv_tau = torch.nn.Parameter(value)
        else:
            self.register_buffer("log_inv_tau", value)

    def forward(self) -> Tensor:
        tau = torch.exp(-self.log_inv_tau)
        # Straight-through clamp: the value is clamped, the gradient is that of the unclamped tau.
        # A plain clamp has zero gradient beyond the bound, so a tau that overshoots it would
        # stay stuck there for the rest of training.
        return tau + (tau.clamp(self.min, self.max) - tau).detach()
