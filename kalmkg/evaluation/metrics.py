"""Ranking metrics for link prediction, as PyKEEN and SimKGC define them.

Filtered setting: every other known true answer of a query is removed from the candidates before the
target is ranked. Ties are resolved "realistically": the expected rank under random tie-breaking,
the mean of the optimistic rank (1 + #better) and the pessimistic rank (#better + #tied, itself included).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

HITS_AT = (1, 3, 10)


def filtered_ranks(scores, targets, filter_mask=None) -> np.ndarray:
    """Realistic ranks of `targets` in each row of `scores` ([B, N] torch or numpy; higher is better).

    `filter_mask` ([B, N] bool) marks known true answers to remove; a row's own target is never removed.
    """
    import torch

    scores = torch.as_tensor(scores, dtype=torch.float32).clone()
    targets = torch.as_tensor(targets, dtype=torch.long)
    rows = torch.arange(scores.shape[0])
    target_scores = scores[rows, targets].clone()
    if filter_mask is not None:
        mask = torch.as_tensor(filter_mask, dtype=torch.bool).clone()
        mask[rows, targets] = False
        scores[mask] = float("-inf")
    better = (scores > target_scores[:, None]).sum(dim=1)
    tied = (scores == target_scores[:, None]).sum(dim=1)  # includes the target itself
    return ((2 * better + 1 + tied).double() / 2).numpy()


def summarize(ranks: Iterable[float]) -> dict[str, float]:
    """MR, MRR and Hits@k of realistic ranks."""
    r = np.asarray(list(ranks) if not isinstance(ranks, np.ndarray) else ranks, dtype=np.float64)
    if r.size == 0:
        return {"count": 0, "mr": float("nan"), "mrr": float("nan"), **{f"hits@{k}": float("nan") for k in HITS_AT}}
    out = {"count": int(r.size), "mr": float(r.mean()), "mrr": float((1.0 / r).mean())}
    for k in HITS_AT:
        out[f"hits@{k}"] = float((r <= k).mean())
    return out


def by_relation(ranks: np.ndarray, relations: np.ndarray) -> dict[int, dict[str, float]]:
    """`summarize` of the ranks of each relation's queries (`relations[i]` is query i's relation id, both
    directions counted under the relation), most queries first."""
    ranks, relations = np.asarray(ranks, dtype=np.float64), np.asarray(relations)
    ids, counts = np.unique(relations, return_counts=True)
    order = sorted(zip(ids.tolist(), counts.tolist()), key=lambda x: (-x[1], x[0]))
    return {int(r): summarize(ranks[relations == r]) for r, _ in order}


class KnownAnswers(Mapping):
    """(query entity, relation) -> its true answers (a frozenset), both directions: (h, r) -> t and
    (t, r + R) -> h, held in three numpy arrays rather than a Python set per query.

    The queries' keys (entity * 2R + relation) sorted, each once, the offset where its answers start,
    and every answer in that order: 16 bytes per (query, answer) pair, where a dict of sets costs some
    200, so the training filter and the evaluation filter of a 10M-triple graph fit in memory. A lookup
    is a binary search; only the sets that are asked for become Python objects."""

    def __init__(self, triples: np.ndarray, num_relations: int):
        triples = np.asarray(triples, dtype=np.int64).reshape(-1, 3)
        self._width = max(2 * num_relations, 1)
        query = np.concatenate([triples[:, 0], triples[:, 2]])
        relation = np.concatenate([triples[:, 1], triples[:, 1] + num_relations])
        answer = np.concatenate([triples[:, 2], triples[:, 0]])
        key = query * self._width + relation
        order = np.lexsort((answer, key))
        key, answer = key[order], answer[order]
        fresh = np.ones(len(key), dtype=bool)
        fresh[1:] = (key[1:] != key[:-1]) | (answer[1:] != answer[:-1])  # a repeated triple counts once
        key, self._answers = key[fresh], answer[fresh]
        self._keys, starts = np.unique(key, return_index=True)
        self._starts = np.append(starts, len(key)).astype(np.int64)

    @classmethod
    def open(cls, folder: Path) -> "KnownAnswers":
        """The arrays `Store.write_known_answers` wrote to `folder`, memory-mapped: a lookup reads the pages
        of its own query, so a 10M-triple graph's answers stay on disk."""
        from kalmkg.npy import open_npy

        known = cls.__new__(cls)
        known._width = int(np.load(folder / "width.npy"))
        known._keys, known._starts, known._answers = (open_npy(folder / f"{name}.npy")
                                                      for name in ("keys", "starts", "answers"))
        return known

    def _find(self, query) -> int:
        entity, relation = query
        k = int(entity) * self._width + int(relation)
        i = int(np.searchsorted(self._keys, k))
        return i if i < len(self._keys) and self._keys[i] == k and 0 <= relation < self._width else -1

    def __getitem__(self, query) -> frozenset[int]:
        i = self._find(query)
        if i < 0:
            raise KeyError(query)
        return frozenset(self._answers[self._starts[i]:self._starts[i + 1]].tolist())

    def __contains__(self, query) -> bool:
        return self._find(query) >= 0

    def __iter__(self):
        for k in self._keys.tolist():
            yield divmod(k, self._width)

    def __len__(self) -> int:
        return len(self._keys)


def known_answers(triples: np.ndarray, num_relations: int) -> KnownAnswers:
    """(query entity, relation) -> true answers, both directions: (h, r) -> t and (t, r + R) -> h."""
    return KnownAnswers(triples, num_relations)


def self_loop_relations(triples: np.ndarray) -> set[int]:
    """The relations with at least one triple (x, r, x): for them an entity may answer its own query."""
    return set(np.unique(triples[triples[:, 0] == triples[:, 2], 1]).tolist()) if len(triples) else set()


def answer_mask(queries: Sequence[tuple[int, int]], answers: Mapping[tuple[int, int], set[int]], n: int):
    """[B, n] bool mask of the known answers of each (entity, relation) query."""
    import torch

    mask = torch.zeros(len(queries), n, dtype=torch.bool)
    for i, q in enumerate(queries):
        known = answers.get(tuple(q))
        if known:
            mask[i, list(known)] = True
    return mask
