"""Filtered ranking of every entity, both directions, from vectors: what training's validation and
`kalmkg evaluate` share. Model-free (an encoder and vectors come in, ranks go out), so training depends
on this module and not on evaluation's model loading.

Tail prediction ranks all entities for (h, r, ?); head prediction is tail prediction of the inverse
query (t, r^-1, ?). Known true answers from train/valid/test other than the target are filtered.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from kalmkg import text
from kalmkg.evaluation.metrics import KnownAnswers, known_answers, summarize


def sample_triples(triples: np.ndarray, limit: int, seed: int = 0) -> np.ndarray:
    """A fixed-seed sample of at most `limit` triples (all of them when limit <= 0)."""
    if limit <= 0 or len(triples) <= limit:
        return triples
    idx = np.sort(np.random.default_rng(seed).choice(len(triples), limit, replace=False))
    return triples[idx]


def rank_with_vectors(encoder, texts, triples: np.ndarray, all_triples, entity_vectors, *,
                      batch_size: int = 64, top: int = 3, chunk: int = 1024, progress=None, fusion=None,
                      query_vectors: np.ndarray | None = None, entity_chunk: int | None = None) -> dict:
    """Filtered realistic ranks of `triples` in both directions against given entity vectors, by exact
    search, with the filtered top-`top` of every query. `all_triples`: the triples whose answers are
    filtered, or their `metrics.KnownAnswers`. `entity_vectors`: an [N, D] array, or any object whose
    slices `[a:b]` are such rows (`npy.RowFile`: vectors on disk). `fusion` (structure.fusion.Fusion,
    fitted) adds the structure model's share to the cosines; `query_vectors` are the queries' vectors
    when they were encoded before (nothing is encoded then).

    The scores of `chunk` queries are computed against `entity_chunk` entities at a time (by default as
    many as keep a block near 32 MB), so a graph of millions of entities ranks in fixed memory; each
    block is computed twice, once for the targets' own scores and once to count, so that a target ties
    with itself and with every equal vector exactly.

    Queries are the n tail queries (h, r) then the n head queries (t, r + R). Returns ranks [2n],
    queries [2n, 2], targets [2n], top_ids / top_scores [2n, top], and the seconds spent encoding the
    queries and ranking them (kept apart: evaluation must be dominated by encoding, not by ranking).
    """
    import time

    import torch

    R = texts.num_relations
    n_ent = len(entity_vectors)
    answers = all_triples if isinstance(all_triples, KnownAnswers) else known_answers(all_triples, R)
    queries = np.concatenate([triples[:, [0, 1]], np.stack([triples[:, 2], triples[:, 1] + R], 1)]).astype(np.int64)
    targets = np.concatenate([triples[:, 2], triples[:, 0]]).astype(np.int64)
    t0 = time.perf_counter()
    if query_vectors is not None:
        qvecs = torch.as_tensor(np.asarray(query_vectors, dtype=np.float32))
    elif len(queries):
        qtexts = [text.hr_view(texts.entities[q], texts.relations[r]) for q, r in queries.tolist()]
        qvecs = torch.as_tensor(encode_texts(encoder, qtexts, batch_size, progress, "queries"))
    else:
        qvecs = torch.zeros((0, 0))
    t1 = time.perf_counter()
    if progress:
        progress("rank", 0, len(queries))
    ranks = np.empty(len(queries))
    k = min(top, n_ent)
    top_ids = np.zeros((len(queries), k), dtype=np.int64)
    top_scores = np.zeros((len(queries), k), dtype=np.float32)
    step = entity_chunk or max(1024, (1 << 23) // max(1, min(chunk, len(queries))))
    for start in range(0, len(queries), chunk):
        sl = slice(start, start + chunk)
        q, tgt = qvecs[sl], torch.as_tensor(targets[sl])
        extra = torch.as_tensor(fusion.extra(queries[sl], R, n_ent)) if fusion is not None else None
        rows = torch.arange(len(tgt))

        target_scores = torch.empty(len(tgt))
        for lo, hi, scores in _score_blocks(q, entity_vectors, step, extra):
            inside = (tgt >= lo) & (tgt < hi)
            target_scores[inside] = scores[rows[inside], tgt[inside] - lo]
        # every other known answer of a query leaves its candidates (the filtered setting)
        known_rows, known_cols = _other_answers(queries[sl], targets[sl], answers)
        better, tied = torch.zeros(len(tgt), dtype=torch.long), torch.zeros(len(tgt), dtype=torch.long)
        best_scores, best_ids = torch.full((len(tgt), 0), float("-inf")), torch.zeros((len(tgt), 0), dtype=torch.long)
        for lo, hi, scores in _score_blocks(q, entity_vectors, step, extra):
            inside = (known_cols >= lo) & (known_cols < hi)
            scores[known_rows[inside], known_cols[inside] - lo] = float("-inf")
            better += (scores > target_scores[:, None]).sum(dim=1)
            tied += (scores == target_scores[:, None]).sum(dim=1)  # the target itself among them
            block = scores.topk(min(k, hi - lo), dim=1)
            merged = torch.cat([best_scores, block.values], dim=1).topk(min(k, best_scores.shape[1] + hi - lo), dim=1)
            best_ids = torch.cat([best_ids, block.indices + lo], dim=1).gather(1, merged.indices)
            best_scores = merged.values
        ranks[sl] = ((2 * better + 1 + tied).double() / 2).numpy()
        top_ids[sl], top_scores[sl] = best_ids.numpy(), best_scores.numpy()
        if progress:
            progress("rank", min(start + chunk, len(queries)), len(queries))
    t2 = time.perf_counter()
    return {"ranks": ranks, "queries": queries, "targets": targets, "top_ids": top_ids, "top_scores": top_scores,
            "query_vectors": qvecs.numpy(), "query_encoding_s": t1 - t0, "ranking_s": t2 - t1}


def _score_blocks(queries, entity_vectors, step: int, extra=None):
    """(lo, hi, [Q, hi - lo] scores) of the query vectors against entities lo..hi, `step` entities at a time;
    `extra` ([Q, N]): added to the scores."""
    import torch

    n = len(entity_vectors)
    for lo in range(0, n, step):
        hi = min(lo + step, n)
        scores = queries @ torch.as_tensor(np.asarray(entity_vectors[lo:hi], dtype=np.float32)).T
        yield lo, hi, scores if extra is None else scores + extra[:, lo:hi]


def _other_answers(queries: np.ndarray, targets: np.ndarray, answers) -> tuple:
    """(rows, columns) as two long tensors: every known answer of each query other than its target."""
    import torch

    rows, cols = [], []
    for i, ((entity, relation), target) in enumerate(zip(queries.tolist(), targets.tolist())):
        known = [a for a in answers.get((entity, relation), ()) if a != target]
        rows += [i] * len(known)
        cols += known
    return torch.as_tensor(rows, dtype=torch.long), torch.as_tensor(cols, dtype=torch.long)


def encode_texts(encoder, texts: list[str], batch_size: int, progress=None, stage: str = "encode",
                 into: Path | None = None):
    """[n, D] float32 vectors of `texts` in input order, encoded in length-sorted chunks of 16 batches
    (little padding; `progress(stage, done, n)` after each chunk). `into`: a scratch file the vectors
    go to instead of memory (returns an `npy.RowFile` over it; the caller closes it)."""
    from kalmkg.npy import RowFile

    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    step = max(1, 16 * batch_size)
    out = None
    if progress:
        progress(stage, 0, len(texts))
    for start in range(0, len(order), step):
        idx = order[start:start + step]
        vecs = np.asarray(encoder.encode([texts[i] for i in idx], batch_size), dtype=np.float32)
        if out is None:
            out = RowFile(into, len(texts), vecs.shape[1]) if into is not None else \
                np.empty((len(texts), vecs.shape[1]), dtype=np.float32)
        if into is not None:
            out.write(idx, vecs)
        else:
            out[idx] = vecs
        if progress:
            progress(stage, min(start + step, len(texts)), len(texts))
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


def rank_queries(model, tokenizer, texts, triples: np.ndarray, all_triples, *, device: str = "cpu",
                 batch_size: int = 64, prefix=None, shard=None, scratch: Path | None = None) -> dict:
    """Training's validation: encode every entity and the queries of `triples` with the model being
    trained (`prefix`: with the run's kept frozen-layer states), then `rank_with_vectors`; summaries
    per direction and for both, plus the raw ranks. `all_triples` as `rank_with_vectors` takes it.

    `scratch`: a folder where the entity vectors wait on disk (a graph of millions of entities), else
    they are held in memory. `shard` (several processes): (the slice of the entities this process
    encodes, a function that joins every process's vectors in entity order); each process then ranks
    the queries with all of them (in memory)."""
    from kalmkg.encode import TorchEncoder

    encoder = TorchEncoder(model, tokenizer, device, prefix)
    share, join = shard if shard is not None else (slice(None), None)
    into = scratch / f"entity-vectors.{os.getpid()}" if scratch is not None and join is None else None
    vectors = encode_texts(encoder, [text.tail_view(t) for t in texts.entities[share]], batch_size, into=into)
    try:
        if join is not None:
            vectors = join(vectors)
        ranks = rank_with_vectors(encoder, texts, triples, all_triples, vectors, batch_size=batch_size)["ranks"]
    finally:
        if into is not None and hasattr(vectors, "close"):
            vectors.close()
    return {**by_direction(ranks), "ranks": ranks}


def by_direction(ranks: np.ndarray) -> dict:
    """Metrics of the ranks `rank_with_vectors` returns (n tail queries, then n head queries) for tail,
    head and both directions."""
    n = len(ranks) // 2
    return {"tail": summarize(ranks[:n]), "head": summarize(ranks[n:]), "both": summarize(ranks)}
