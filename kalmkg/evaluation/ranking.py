"""Filtered ranking of every entity, both directions, from vectors: what training's validation and
`kalmkg evaluate` share. Model-free (an encoder and vectors come in, ranks go out), so training depends
on this module and not on evaluation's model loading.

Tail prediction ranks all entities for (h, r, ?); head prediction is tail prediction of the inverse
query (t, r^-1, ?). Known true answers from train/valid/test other than the target are filtered.
"""

from __future__ import annotations

import numpy as np

from kalmkg import text
from kalmkg.evaluation.metrics import answer_mask, filtered_ranks, known_answers, summarize


def sample_triples(triples: np.ndarray, limit: int, seed: int = 0) -> np.ndarray:
    """A fixed-seed sample of at most `limit` triples (all of them when limit <= 0)."""
    if limit <= 0 or len(triples) <= limit:
        return triples
    idx = np.sort(np.random.default_rng(seed).choice(len(triples), limit, replace=False))
    return triples[idx]


def rank_with_vectors(encoder, texts, triples: np.ndarray, all_triples: np.ndarray, entity_vectors, *,
                      batch_size: int = 64, top: int = 3, chunk: int = 1024, progress=None, fusion=None,
                      query_vectors: np.ndarray | None = None) -> dict:
    """Filtered realistic ranks of `triples` in both directions against given entity vectors, by exact
    search (one matrix product per `chunk` queries), with the filtered top-`top` of every query.
    `fusion` (structure.fusion.Fusion, fitted) adds the structure model's share to the cosines;
    `query_vectors` are the queries' vectors when they were encoded before (nothing is encoded then).

    Queries are the n tail queries (h, r) then the n head queries (t, r + R). Returns ranks [2n],
    queries [2n, 2], targets [2n], top_ids / top_scores [2n, top], and the seconds spent encoding the
    queries and ranking them (kept apart: evaluation must be dominated by encoding, not by ranking).
    """
    import time

    import torch

    R = texts.num_relations
    vectors = torch.as_tensor(np.asarray(entity_vectors, dtype=np.float32))
    n_ent = vectors.shape[0]
    answers = known_answers(all_triples, R)
    queries = np.concatenate([triples[:, [0, 1]], np.stack([triples[:, 2], triples[:, 1] + R], 1)]).astype(np.int64)
    targets = np.concatenate([triples[:, 2], triples[:, 0]]).astype(np.int64)
    t0 = time.perf_counter()
    if query_vectors is not None:
        qvecs = torch.as_tensor(np.asarray(query_vectors, dtype=np.float32))
    elif len(queries):
        qtexts = [text.hr_view(texts.entities[q], texts.relations[r]) for q, r in queries.tolist()]
        qvecs = torch.as_tensor(encode_texts(encoder, qtexts, batch_size, progress, "queries"))
    else:
        qvecs = torch.zeros((0, vectors.shape[1]))
    t1 = time.perf_counter()
    if progress:
        progress("rank", 0, len(queries))
    ranks = np.empty(len(queries))
    k = min(top, n_ent)
    top_ids = np.zeros((len(queries), k), dtype=np.int64)
    top_scores = np.zeros((len(queries), k), dtype=np.float32)
    for start in range(0, len(queries), chunk):
        sl = slice(start, start + chunk)
        scores = qvecs[sl] @ vectors.T
        if fusion is not None:
            scores += torch.as_tensor(fusion.extra(queries[sl], R, n_ent))
        mask = answer_mask(queries[sl].tolist(), answers, n_ent)
        tgt = torch.as_tensor(targets[sl])
        ranks[sl] = filtered_ranks(scores, tgt, mask)
        # the filtered view of the candidates, as the rank sees them: other true answers removed
        rows = torch.arange(len(tgt))
        mask[rows, tgt] = False
        scores[mask] = float("-inf")
        best = scores.topk(k, dim=1)
        top_ids[sl], top_scores[sl] = best.indices.numpy(), best.values.numpy()
        if progress:
            progress("rank", min(start + chunk, len(queries)), len(queries))
    t2 = time.perf_counter()
    return {"ranks": ranks, "queries": queries, "targets": targets, "top_ids": top_ids, "top_scores": top_scores,
            "query_vectors": qvecs.numpy(), "query_encoding_s": t1 - t0, "ranking_s": t2 - t1}


def encode_texts(encoder, texts: list[str], batch_size: int, progress=None, stage: str = "encode") -> np.ndarray:
    """[n, D] float32 vectors of `texts` in input order, encoded in length-sorted chunks of 16 batches
    (little padding; `progress(stage, done, n)` after each chunk)."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    step = max(1, 16 * batch_size)
    out = None
    if progress:
        progress(stage, 0, len(texts))
    for start in range(0, len(order), step):
        idx = order[start:start + step]
        vecs = np.asarray(encoder.encode([texts[i] for i in idx], batch_size), dtype=np.float32)
        if out is None:
            out = np.empty((len(texts), vecs.shape[1]), dtype=np.float32)
        out[idx] = vecs
        if progress:
            progress(stage, min(start + step, len(texts)), len(texts))
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


def rank_queries(model, tokenizer, texts, triples: np.ndarray, all_triples: np.ndarray, *, device: str = "cpu",
                 batch_size: int = 64, prefix=None, shard=None) -> dict:
    """Training's validation: encode every entity and the queries of `triples` with the model being
    trained (`prefix`: with the run's kept frozen-layer states), then `rank_with_vectors`; summaries
    per direction and for both, plus the raw ranks.

    `shard` (several processes): (the slice of the entities this process encodes, a function that joins
    every process's vectors in entity order); each process then ranks the queries with all of them."""
    from kalmkg.encode import TorchEncoder

    encoder = TorchEncoder(model, tokenizer, device, prefix)
    share, join = shard if shard is not None else (slice(None), None)
    vectors = encode_texts(encoder, [text.tail_view(t) for t in texts.entities[share]], batch_size)
    if join is not None:
        vectors = join(vectors)
    ranks = rank_with_vectors(encoder, texts, triples, all_triples, vectors, batch_size=batch_size)["ranks"]
    return {**by_direction(ranks), "ranks": ranks}


def by_direction(ranks: np.ndarray) -> dict:
    """Metrics of the ranks `rank_with_vectors` returns (n tail queries, then n head queries) for tail,
    head and both directions."""
    n = len(ranks) // 2
    return {"tail": summarize(ranks[:n]), "head": summarize(ranks[n:]), "both": summarize(ranks)}
