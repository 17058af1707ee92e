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


# ------------------------------------------------------------------ `kalmkg evaluate`
def rank_with_vectors(encoder, texts, triples: np.ndarray, all_triples: np.ndarray, entity_vectors, *,
                      batch_size: int = 64, top: int = 3, chunk: int = 1024, progress=None) -> dict:
    """Filtered realistic ranks of `triples` in both directions against given entity vectors, by exact
    search (one matrix product per `chunk` queries), with the filtered top-`top` of every query.

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
    qtexts = [verbalize.hr_view(texts.entities[q], texts.relations[r]) for q, r in queries.tolist()]
    qvecs = torch.as_tensor(encode_texts(encoder, qtexts, batch_size, progress, "queries")) if len(qtexts) \
        else torch.zeros((0, vectors.shape[1]))
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
            "query_encoding_s": t1 - t0, "ranking_s": t2 - t1}


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


def eval_dir(workspace, loaded):
    """Where a model's evaluation files go: its run folder, or `<workspace>/evals/base-<name>/`."""
    from kalmkg.run_model import safe_name

    if loaded.run_dir is not None:
        return loaded.run_dir
    return workspace.root / "evals" / f"base-{safe_name(loaded.name)}"


def evaluate_run(workspace, *, run: str | None = None, base: str | None = None, split: str = "test",
                 limit: int = 0, seed: int = 0, batch_size: int = 64, device: str = "cpu", use_index: bool = True,
                 loaded=None, encoder=None, progress=None) -> dict:
    """The paper's protocol on `split`: filtered, tie-aware ranks of head and tail prediction against every
    entity; MR, MRR, Hits@1/3/10 for tail, head and both. Writes `eval-<split>.json` and
    `predictions-<split>.jsonl` (query, target, rank, filtered top-3) into the run folder (for `base`:
    `<workspace>/evals/base-<name>/`) and returns the summary with the paths.

    Entity vectors come from the entity index when it is fresh for this model (`kalmkg embed`), else
    they are encoded here. `limit` > 0 evaluates a fixed-seed sample of that many triples.
    `progress(stage, done, total)` reports the stages "entities" (when encoded here), "queries", "rank".
    """
    import json
    import time
    from datetime import datetime, timezone

    from kalmkg.errors import KalmkgError
    from kalmkg.runs import atomic_write_text
    from kalmkg.store import SPLITS, Store

    if split not in SPLITS:
        raise KalmkgError(f"unknown split '{split}'; use one of: {', '.join(SPLITS)}")
    t_start = time.perf_counter()
    with Store.open(workspace) as store:
        split_triples = store.triples_array((split,))
        all_triples = store.triples_array()
        tables = None if loaded is not None else (store.entity_table(), store.relation_table(), store.fingerprint())
    if len(split_triples) == 0:
        raise KalmkgError(f"the {split} split is empty (ingest one, or run `kalmkg split`)")
    if loaded is None:
        from kalmkg.run_model import load_model

        loaded = load_model(workspace, run=run, base=base, device=device, tables=tables)
    if encoder is None:
        from kalmkg.run_model import torch_encoder

        encoder = torch_encoder(loaded)
    sample = sample_triples(split_triples, limit, seed)

    t0 = time.perf_counter()
    source, why_not = "encoded", None
    vectors = None
    if use_index:
        from kalmkg.index import EntityIndex

        index, why_not = EntityIndex.try_open(workspace, loaded)
        if index is not None:
            vectors, source = index.vectors(), "index"
    if vectors is None:
        vectors = encode_texts(encoder, [verbalize.tail_view(t) for t in loaded.texts.entities], batch_size,
                               progress, "entities")
    entity_s = time.perf_counter() - t0

    ranked = rank_with_vectors(encoder, loaded.texts, sample, all_triples, vectors, batch_size=batch_size,
                               progress=progress)
    ranks, n = ranked["ranks"], len(sample)
    metrics = {"tail": summarize(ranks[:n]), "head": summarize(ranks[n:]), "both": summarize(ranks)}
    out_dir = eval_dir(workspace, loaded)
    summary = {
        "model": loaded.fingerprint, "name": loaded.name, "split": split, "triples": int(n),
        "queries": int(2 * n), "entities": int(len(loaded.texts.entities)), "limit": int(limit), "seed": int(seed),
        "protocol": "filtered (train/valid/test answers other than the target removed), realistic tie-aware "
                    "ranks; head prediction = tail prediction of the inverse query",
        "metrics": metrics,
        "timing": {"entity_vectors": source, "entity_encoding_s": round(entity_s, 4),
                   "query_encoding_s": round(ranked["query_encoding_s"], 4),
                   "ranking_s": round(ranked["ranking_s"], 4),
                   "total_s": round(time.perf_counter() - t_start, 4)},
        "graph_fingerprint": loaded.graph_fingerprint,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if why_not and use_index:
        summary["index_not_used"] = why_not
    if loaded.warnings:
        summary["warnings"] = list(loaded.warnings)
    eval_path = out_dir / f"eval-{split}.json"
    pred_path = out_dir / f"predictions-{split}.jsonl"
    atomic_write_text(pred_path, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                         for r in _prediction_records(loaded, ranked, n)))
    atomic_write_text(eval_path, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    return {**summary, "eval_path": str(eval_path), "predictions_path": str(pred_path)}


def _prediction_records(loaded, ranked: dict, n: int):
    """One record per query: the triple by keys, the query as text, the target, its rank, the top-3."""
    keys, labels = loaded.entity_keys, loaded.entity_labels
    rkeys, rlabels = loaded.relation_keys, loaded.relation_labels
    R = len(rkeys)
    for i, ((q, r), target, rank) in enumerate(zip(ranked["queries"].tolist(), ranked["targets"].tolist(),
                                                    ranked["ranks"].tolist())):
        tail = i < n
        rel = r if tail else r - R
        head_id, tail_id = (q, target) if tail else (target, q)
        yield {
            "direction": "tail" if tail else "head",
            "triple": [keys[head_id], rkeys[rel], keys[tail_id]],
            "query": [labels[q], rlabels[rel], "?"] if tail else ["?", rlabels[rel], labels[q]],
            "target": {"key": keys[target], "label": labels[target]},
            "rank": rank,
            "top": [{"key": keys[j], "label": labels[j], "score": round(float(s), 6)}
                    for j, s in zip(ranked["top_ids"][i].tolist(), ranked["top_scores"][i].tolist())
                    if np.isfinite(s)],
        }
