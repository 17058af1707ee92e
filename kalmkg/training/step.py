"""One KaLM step, the fast way: the loss of a global batch as one process computes it.

    batch -> token rows (hr views, completion sequences hr + target, tail views; identical rows once)
          -> one backbone pass in length-grouped chunks: pooled last tokens, and the hidden states
             of the completion rows at the positions that predict the target
          -> L_exp: InfoNCE over the global batch (embeddings all-gathered with gradients)
          -> L_imp: the LM head on those positions only
          -> L_exp + lambda * L_imp                              (both in objective.py)
             + the chat terms (CHAT_TERMS), L_qv, and L_kl (the chat rows again through the base)

The hr view is a token-identical prefix of its completion sequence, so under a causal model the
completion row's hidden state at the prefix's last token is the hr view's embedding: one pass
serves both losses. This module imports torch at the top: import it lazily from light modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from kalmkg.encode import last_hidden
from kalmkg.models import backbone
from kalmkg.training import objective
from kalmkg.training.config import TrainConfig
from kalmkg.training.data import TokenizedExamples, lm_flags
from kalmkg.training.distributed import World, gather


@dataclass
class StepContext:
    """What every step of a run shares."""

    model: Any
    temperature: Any  # objective.LearnableTemperature
    tokens: TokenizedExamples
    known: Mapping[tuple[int, int], frozenset[int]]  # (query, relation) -> known answers of the train graph
    cfg: TrainConfig
    world: World = World()
    device: str = "cpu"
    prefix: Any = None  # prefix.FrozenPrefix: the frozen layers' kept outputs (None: run the whole model)


class KaLMStep(torch.nn.Module):
    """`kalm_step` as a module over the weights it trains (the model and the temperature), so that
    DistributedDataParallel (`distributed.replicate`) can average their gradients during backward."""

    def __init__(self, ctx: StepContext):
        super().__init__()
        self.model, self.temperature = ctx.model, ctx.temperature
        self.ctx = ctx

    def forward(self, examples: np.ndarray, prebatch: list | None = None, chats: Mapping[str, list] | None = None,
                question_views: np.ndarray | None = None) -> "StepOutput":
        return kalm_step(self.ctx, examples, prebatch, chats, question_views)


class StepOutput(NamedTuple):
    loss: torch.Tensor
    terms: dict  # loss, l_exp, l_imp (None without LM examples), tau, acc, as floats
    tails: tuple  # (detached tail vectors [B, D], their entity ids [B]): the next steps' pre-batch


@dataclass
class StepInputs:
    """What one process feeds the model for its slice of a global batch.

    Identical rows (a tail entity twice in a batch, the same query twice) are encoded once;
    `hr`, `tail` and `self` give each example's row.
    """

    rows: list[list[int]]
    pool_at: list[int]
    lm_spans: dict[int, tuple[int, int]]  # row -> hidden positions that predict the target
    lm_labels: dict[int, list[int]]  # row -> target tokens
    hr: list[int]
    tail: list[int]
    self: list[int]
    chat: dict[str, list[int]] = field(default_factory=dict)  # loss term (CHAT_TERMS) -> its chat rows

    def add_chat(self, term: str, pairs) -> None:
        """Chat rows (prompt + reply) whose reply gets the LM loss `term`."""
        for prompt, reply in pairs:
            self.rows.append(prompt + reply)
            self.pool_at.append(len(prompt) - 1)
            r = len(self.rows) - 1
            self.lm_spans[r] = (len(prompt) - 1, len(prompt) + len(reply) - 1)
            self.lm_labels[r] = reply
            self.chat.setdefault(term, []).append(r)


    def add_views(self, views: list[list[int]]) -> list[int]:
        """Rows pooled at their last token (tail views), one each."""
        start = len(self.rows)
        self.rows += views
        self.pool_at += [len(v) - 1 for v in views]
        return list(range(start, len(self.rows)))


# The chat losses beside KaLM's, each an LM loss on replies, and the config field that weighs it:
# L_qa (questions answered by the weights alone, `ask --no-context`) and L_read (`ask`'s fact-reading turns)
CHAT_TERMS = {"l_qa": "question_weight", "l_read": "reading_weight"}


def build_inputs(tokens: TokenizedExamples, examples: np.ndarray, lm_mask: np.ndarray,
                 self_negatives: bool) -> StepInputs:
    """Token rows for a slice: hr views (or hr view + completion for LM examples), tail views,
    and optionally the head's own tail view (self-negative)."""
    inputs = StepInputs([], [], {}, {}, [], [], [])
    seen: dict[tuple, int] = {}

    def row(ids: list[int], pool: int, unique: bool = True) -> int:
        key = tuple(ids)
        if unique and key in seen:
            return seen[key]
        inputs.rows.append(ids)
        inputs.pool_at.append(pool)
        if unique:
            seen[key] = len(inputs.rows) - 1
        return len(inputs.rows) - 1

    for i, ((_q, _, a), hr_row) in enumerate(zip(examples.tolist(), tokens.hr_index_of(examples))):
        hr = tokens.hr_ids[hr_row]
        if lm_mask[i]:
            target = tokens.target_ids[a]
            r = row(hr + target, len(hr) - 1, unique=False)
            # position t predicts token t + 1: the prompt's last token predicts the target's first
            inputs.lm_spans[r] = (len(hr) - 1, len(hr) + len(target) - 1)
            inputs.lm_labels[r] = target
        else:
            r = row(hr, len(hr) - 1)
        inputs.hr.append(r)
    for q, _, a in examples.tolist():
        inputs.tail.append(row(tokens.tail_ids[a], len(tokens.tail_ids[a]) - 1))
        if self_negatives:
            inputs.self.append(row(tokens.tail_ids[q], len(tokens.tail_ids[q]) - 1))
    return inputs


def run_backbone(decoder, inputs: StepInputs, pad_id: int, device, prefix=None,
                 ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Encode the rows; returns (pooled [R, D], {row: hidden [span, D]} for the LM rows).
    `prefix`: a FrozenPrefix whose kept states of the frozen layers stand in for running them."""
    rows = inputs.rows
    pooled: list = [None] * len(rows)
    lm_hidden: dict = {}
    for chunk in length_chunks([len(r) for r in rows]):
        hidden, _ = last_hidden(decoder, [rows[i] for i in chunk], pad_id, device, prefix)
        for j, i in enumerate(chunk):
            pooled[i] = hidden[j, inputs.pool_at[i]]
            if i in inputs.lm_spans:
                a, b = inputs.lm_spans[i]
                lm_hidden[i] = hidden[j, a:b]
    return torch.stack(pooled), lm_hidden


def length_chunks(lengths: list[int], *, max_waste: float = 0.3, min_chunk: int = 8) -> list[list[int]]:
    """Row indices sorted by length and cut into chunks of similar length (a chunk of at least
    `min_chunk` rows ends where a row is more than 1 + `max_waste` times its first row's length).

    Completion sequences are twice as long as views, and padding every view to them would double the
    work of a forward padded to the longest row."""
    chunks, current = [], []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        if len(current) >= min_chunk and lengths[i] > (1 + max_waste) * lengths[current[0]]:
            chunks.append(current)
            current = []
        current.append(i)
    if current:
        chunks.append(current)
    return chunks


def kalm_step(ctx: StepContext, examples: np.ndarray, prebatch: list | None = None,
              chats: Mapping[str, list] | None = None, question_views: np.ndarray | None = None) -> StepOutput:
    """Loss of one global batch (an [B, 3] example array) as seen by this process: its slice goes
    through the model, the whole batch is in the loss. `prebatch`: earlier steps' `tails`; `chats`: per
    term of CHAT_TERMS, the batch's (prompt, reply) token pairs (this process takes its share);
    `question_views`: [k, 3] (entity, relation, answer) of the chats' "l_qa" questions, for L_qv."""
    cfg, world = ctx.cfg, ctx.world
    mine = world.slice(len(examples))
    inputs = build_inputs(ctx.tokens, examples[mine], lm_flags(len(examples), cfg)[mine], cfg.self_negatives)
    for term, pairs in (chats or {}).items():
        if pairs:
            inputs.add_chat(term, pairs[world.slice(len(pairs))])
    viewed = question_views is not None and len(question_views) > 0 and cfg.question_view_weight > 0
    if viewed:  # each question's answer as a tail view, the positive of its question view
        answer_rows = inputs.add_views([ctx.tokens.tail_ids[a] for a in
                                        question_views[world.slice(len(question_views))][:, 2].tolist()])
    pooled, lm_hidden = run_backbone(backbone(ctx.model), inputs, ctx.tokens.pad_id, ctx.device, ctx.prefix)

    # L_exp: every process contrasts its queries against the tails of the whole global batch
    pooled = F.normalize(pooled.float(), dim=-1)
    hr = gather(pooled[inputs.hr], world)
    tails = gather(pooled[inputs.tail], world)
    selfs = gather(pooled[inputs.self], world) if cfg.self_negatives else None
    masks = _known_answer_masks(examples, ctx.known, prebatch, cfg.self_negatives)
    extra = torch.cat([v for v, _ in prebatch]).to(hr.device) if prebatch else None
    tau = ctx.temperature()
    out = objective.info_nce(hr, tails, margin=cfg.margin, temperature=tau, mask=masks.main.to(hr.device),
                             extra_negatives=extra, extra_mask=_to(masks.extra, hr.device),
                             self_negatives=selfs, self_negative_mask=_to(masks.self, hr.device))

    # L_imp: the LM head only at the positions that predict each completion target; the chat terms likewise
    head = ctx.model.get_output_embeddings()
    logits = {r: head(h) for r, h in lm_hidden.items()}
    chat_rows = sorted({r for rows in inputs.chat.values() for r in rows})
    l_imp = _lm_loss(logits, inputs.lm_labels, [r for r in logits if r not in set(chat_rows)], ctx.device)
    loss = objective.kalm_loss(out["loss"], l_imp, cfg.lm_weight)
    terms = {"l_exp": out["loss"].item(), "l_imp": l_imp.item() if l_imp is not None else None,
             "tau": tau.item(), "acc": out["accuracy"].item()}
    for term, rows in inputs.chat.items():
        value = _lm_loss(logits, inputs.lm_labels, rows, ctx.device)
        loss = loss + getattr(cfg, CHAT_TERMS[term]) * value
        terms[term] = value.item()
    if cfg.base_kl_weight > 0 and chat_rows:
        # L_kl: the chat replies' next-token distributions held near the frozen base's
        kl = objective.distillation_kl([logits[r] for r in chat_rows], base_logits(ctx, inputs, chat_rows))
        loss = loss + cfg.base_kl_weight * kl
        terms["l_kl"] = kl.item()
    if viewed:
        # L_qv: a question's view against its answer's tail view, the other questions' answers and the
        # batch's tails; every known answer of the question's query other than its positive is masked
        questions = gather(pooled[inputs.chat["l_qa"]], world)
        candidates = torch.cat([tails, gather(pooled[answer_rows], world)])
        views = torch.as_tensor(question_views)
        ids = torch.cat([torch.as_tensor(examples)[:, 2], views[:, 2]])
        positive = torch.arange(len(views)) + len(examples)
        mask = objective.false_negative_mask(views[:, :2], views[:, 2], ids, ctx.known, positive_index=positive)
        qv = objective.info_nce(questions, candidates, margin=cfg.margin, temperature=tau, mask=mask.to(hr.device),
                                positive_index=positive.to(hr.device))
        loss = loss + cfg.question_view_weight * qv["loss"]
        terms["l_qv"], terms["acc_qv"] = qv["loss"].item(), qv["accuracy"].item()
    terms = {"loss": loss.item(), **terms}
    return StepOutput(loss, terms, (tails.detach(), torch.as_tensor(examples)[:, 2].clone()))


def base_logits(ctx: StepContext, inputs: StepInputs, rows: list[int]) -> list[torch.Tensor]:
    """The frozen base's logits ([span, V] each) at the LM positions of `rows`: the same rows through
    the model with its LoRA adapters switched off, without gradients. The kept bottom states serve
    here too: LoRA is not in those layers, so they are the base's."""
    sub = StepInputs([inputs.rows[r] for r in rows], [inputs.pool_at[r] for r in rows],
                     {i: inputs.lm_spans[r] for i, r in enumerate(rows)}, {}, [], [], [])
    with torch.no_grad(), ctx.model.disable_adapter():
        _, hidden = run_backbone(backbone(ctx.model), sub, ctx.tokens.pad_id, ctx.device, ctx.prefix)
        head = ctx.model.get_output_embeddings()
        return [head(hidden[i]) for i in range(len(rows))]


def _lm_loss(logits: dict, labels: dict, rows: list[int], device) -> torch.Tensor | None:
    if not rows:
        return None
    return objective.completion_loss([logits[r] for r in rows], [torch.tensor(labels[r], device=device) for r in rows])


class _Masks(NamedTuple):
    main: torch.Tensor  # [B, B]
    extra: torch.Tensor | None  # [B, pre-batch size]
    self: torch.Tensor | None  # [B]


def _known_answer_masks(examples: np.ndarray, known, prebatch: list | None, self_negatives: bool) -> _Masks:
    """Which candidates are known true answers of a row's query (other than its positive): in-batch
    tails, pre-batch tails, and the head itself as a self-negative."""
    ex = torch.as_tensor(examples)
    main = objective.false_negative_mask(ex[:, :2], ex[:, 2], ex[:, 2], known)
    extra = None
    if prebatch:
        extra = objective.false_negative_mask(ex[:, :2], ex[:, 2], torch.cat([ids for _, ids in prebatch]), known,
                                              positive_index=torch.full((len(ex),), -1))
    selfs = None
    if self_negatives:
        selfs = torch.tensor([q == a or q in known.get((q, r), ()) for q, r, a in examples.tolist()])
    return _Masks(main, extra, selfs)


def _to(x: torch.Tensor | None, device) -> torch.Tensor | None:
    return None if x is None else x.to(device)
