"""`kalmkg evaluate`: a run's (or a base's) model, its entity vectors (the index, or encoded here), the
filtered ranking of `ranking.py`, and the eval files (metrics and per-query predictions)."""

from __future__ import annotations

import numpy as np

from kalmkg import text as verbalize
from kalmkg.evaluation.metrics import summarize
from kalmkg.evaluation.ranking import encode_texts, rank_with_vectors, sample_triples


def eval_dir(workspace, loaded):
    """Where a model's evaluation files go: its run folder, or `<workspace>/evals/base-<name>/`."""
    from kalmkg.loaded import safe_name

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
        from kalmkg.loaded import load_model

        loaded = load_model(workspace, run=run, base=base, device=device, tables=tables)
    if encoder is None:
        from kalmkg.loaded import torch_encoder

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
