"""Training examples from the store: texts tokenized once, batches as lists of token ids.

An example is a query (entity, relation) and its answer entity. Every train triple (h, r, t) gives
two: (h, r) -> t and the inverse (t, r + R) -> h, so one model answers tail and head queries.
Relation ids >= R are inverses.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from kalmkg import text as verbalize
from kalmkg.text import GraphTexts


def with_inverses(triples: np.ndarray, num_relations: int) -> np.ndarray:
    """[n, 3] (h, r, t) -> [2n, 3] (query, relation, answer): the triples, then their inverses."""
    inverse = np.stack([triples[:, 2], triples[:, 1] + num_relations, triples[:, 0]], axis=1)
    return np.concatenate([triples, inverse]).astype(np.int64)


@dataclass
class TokenizedExamples:
    """Token ids of every view an epoch needs, computed once per run."""

    examples: np.ndarray  # [n, 3] query entity, relation (>= R: inverse), answer entity
    hr_index: np.ndarray  # [n] row of `hr_ids` for each example
    hr_ids: list[list[int]]  # unique (query, relation) views
    tail_ids: list[list[int]]  # per entity: its tail view
    target_ids: list[list[int]]  # per entity: completion target + EOS
    pad_id: int = 0
    lengths: np.ndarray = field(default=None)  # [n] tokens of hr view + tail view (for bucketing)


def tokenize_examples(texts: GraphTexts, examples: np.ndarray, tokenizer, max_seq_len: int = 256) -> TokenizedExamples:
    keys, hr_index = np.unique(examples[:, :2], axis=0, return_inverse=True) if len(examples) else \
        (np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=np.int64))
    hr_texts = [verbalize.hr_view(texts.entities[q], texts.relations[r]) for q, r in keys.tolist()]
    tok = lambda xs: tokenizer(xs, add_special_tokens=False)["input_ids"] if xs else []  # noqa: E731
    hr_ids = tok(hr_texts)
    tail_ids = tok([verbalize.tail_view(t) for t in texts.entities])
    eos = tokenizer.eos_token_id
    target_ids = [ids + [eos] for ids in tok([verbalize.completion_target(t) for t in texts.entities])]
    # The completion sequence is hr + target; keep it within max_seq_len by cutting the target.
    hr_len = np.array([len(x) for x in hr_ids], dtype=np.int64)
    tail_len = np.array([len(x) for x in tail_ids], dtype=np.int64)
    hr_index = hr_index.reshape(-1)
    longest_hr = int(hr_len.max()) if len(hr_len) else 0
    if longest_hr + 2 > max_seq_len:
        raise ValueError(f"a head-relation view has {longest_hr} tokens, over max_seq_len={max_seq_len}")
    room = max_seq_len - longest_hr
    target_ids = [t if len(t) <= room else t[: room - 1] + [eos] for t in target_ids]
    lengths = hr_len[hr_index] + tail_len[examples[:, 2]] if len(examples) else np.zeros(0, dtype=np.int64)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    return TokenizedExamples(examples, hr_index, hr_ids, tail_ids, target_ids, pad, lengths)


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, lengths: np.ndarray | None = None,
                  bucket: bool = True, bucket_span: int = 32) -> list[np.ndarray]:
    """Deterministic batches of example indices for one epoch (full batches only).

    With `bucket`, a random window of `bucket_span` batches is sorted by length before it is cut, so
    batches pad little; the batch order is then shuffled again. Same (seed, epoch) -> same batches,
    which is what makes resuming exact.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(n)
    if bucket and lengths is not None:
        window = batch_size * bucket_span
        order = np.concatenate([
            chunk[np.argsort(lengths[chunk], kind="stable")]
            for chunk in np.array_split(order, max(1, -(-n // window)))
        ]) if n else order
    batches = [order[i:i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
    if bucket:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def lm_positions(batch_size: int, lm_examples: int) -> np.ndarray:
    """Which examples of a global batch also get the LM loss: spread evenly (floor(i * B / m)), so
    every process of a split batch gets its share, and the same examples are chosen however the
    batch is split."""
    m = min(max(lm_examples, 0), batch_size)
    return (np.arange(m) * batch_size) // m if m else np.zeros(0, dtype=np.int64)
