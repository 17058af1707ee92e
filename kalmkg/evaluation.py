"""Embedding-based link prediction evaluation: filtered ranking of every entity, both directions.

Tail prediction ranks all entities for (h, r, ?); head prediction is tail prediction of the inverse
query (t, r^-1, ?). Known true answers from train/valid/test other than the target are filtered.
"""

from __future__ import annotations

import numpy as np

from kalmkg import verbalize
from kalmkg.metrics import answer_mask, filtered_ranks, known_answers, summarize


def sample_triples(triples: np.ndarray, limit: int, seed: int = 0) -> np.ndarray:
    """A fixed-seed sample of at most `limit` triples (all of them when limit <= 0)."""
    if limit <= 0 or len(triples) <= limit:
        return triples
    idx = np.sort(np.random.default_rng(seed).choice(len(triples), limit, replace=False))
    return triples[idx]


def rank_queries(model, tokenizer, texts, triples: np.ndarray, all_triples: np.ndarray, *, device: str = "cpu",
                 batch_size: int = 64, entity_vectors=None) -> dict:
    """Filtered realistic ranks for head and tail prediction of `triples`; returns summaries per
    direction and for both, plus the raw ranks."""
    import torch

    from kalmkg.encode import TorchEncoder

    encoder = TorchEncoder(model, tokenizer, device)
    R = texts.num_relations
    if entity_vectors is None:
        entity_vectors = torch.as_tensor(encoder.encode([verbalize.tail_view(t) for t in texts.entities], batch_size))
    answers = known_answers(all_triples, R)
    queries = np.concatenate([triples[:, [0, 1]], np.stack([triples[:, 2], triples[:, 1] + R], 1)])
    targets = np.concatenate([triples[:, 2], triples[:, 0]])
    qvecs = torch.as_tensor(encoder.encode(
        [verbalize.hr_view(texts.entities[q], texts.relations[r]) for q, r in queries.tolist()], batch_size))
    ranks = np.empty(len(queries))
    for start in range(0, len(queries), 1024):
        sl = slice(start, start + 1024)
        scores = qvecs[sl] @ entity_vectors.T
        mask = answer_mask(queries[sl].tolist(), answers, entity_vectors.shape[0])
        ranks[sl] = filtered_ranks(scores, targets[sl], mask)
    n = len(triples)
    return {"tail": summarize(ranks[:n]), "head": summarize(ranks[n:]), "both": summarize(ranks), "ranks": ranks}
