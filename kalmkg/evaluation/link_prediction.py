"""`kalmkg evaluate`: a run's (or a base's) model, its entity vectors (the index, or encoded here), the
filtered ranking of `ranking.py`, and the eval files (metrics and per-query predictions)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone

import numpy as np

from kalmkg import text
from kalmkg.errors import KalmkgError
from kalmkg.evaluation.calibration import (Calibration, FirstAnswers, calibrate, first_answers, unconnected,
                                          write_calibration)
from kalmkg.evaluation.ranking import by_direction, encode_texts, rank_with_vectors, sample_triples
from kalmkg.loaded import LoadedModel, load_model, safe_name, torch_encoder
from kalmkg.evaluation.charts import write_charts
from kalmkg.evaluation.metrics import by_relation, known_answers, self_loop_relations
from kalmkg.files import atomic_write_text
from kalmkg.runs import read_config
from kalmkg.structure.fusion import Fusion, fit_weight, open_fusion, write_fusion
from kalmkg.training.config import saved_train_config
from kalmkg.store import SPLITS, Store
from kalmkg.workspace import Workspace

PROTOCOL = ("filtered (train/valid/test answers other than the target removed), realistic tie-aware ranks; "
            "head prediction = tail prediction of the inverse query")


@dataclass
class EntityVectors:
    """Every entity's tail-view vector, and where it came from ("index" or "encoded")."""

    vectors: np.ndarray
    source: str
    seconds: float
    index_not_used: str | None = None  # why the index was not used, when it was asked for


def eval_dir(workspace: Workspace, loaded: LoadedModel):
    """Where a model's evaluation files go: its run folder, or `<workspace>/evals/base-<name>/`."""
    if loaded.run_dir is not None:
        return loaded.run_dir
    return workspace.root / "evals" / f"base-{safe_name(loaded.name)}"


def evaluate_run(workspace: Workspace, *, run: str | None = None, base: str | None = None, split: str = "test",
                 limit: int = 0, seed: int = 0, batch_size: int = 64, device: str = "cpu", use_index: bool = True,
                 loaded: LoadedModel | None = None, encoder=None, progress=None) -> dict:
    """The paper's protocol on `split`: filtered, tie-aware ranks of head and tail prediction against every
    entity; MR, MRR, Hits@1/3/10 for tail, head and both. Writes `eval-<split>.json` and
    `predictions-<split>.jsonl` (query, target, rank, filtered top-3) into the run folder (for `base`:
    `<workspace>/evals/base-<name>/`) and returns the summary with the paths.

    Entity vectors come from the entity index when it is fresh for this model (`kalmkg embed`), else
    they are encoded here. `limit` > 0 evaluates a fixed-seed sample of that many triples.
    `progress(stage, done, total)` reports the stages "entities" (when encoded here), "queries", "rank".
    """
    t_start = time.perf_counter()
    # the split and the filter (every known triple), and the model's tables in the same store session
    split_triples, all_triples, tables = _read_triples(workspace, split, need_tables=loaded is None)
    if loaded is None:
        loaded = load_model(workspace, run=run, base=base, device=device, tables=tables)
    encoder = encoder if encoder is not None else torch_encoder(loaded)
    sample = sample_triples(split_triples, limit, seed)
    # entity vectors, then the queries encoded and ranked against them
    entities = _entity_vectors(workspace, loaded, encoder, use_index, batch_size, progress)
    ranked = rank_with_vectors(encoder, loaded.texts, sample, all_triples, entities.vectors,
                               batch_size=batch_size, progress=progress)
    out_dir = eval_dir(workspace, loaded)
    # the run's structure model: fitted to the text model on valid, then ranking with it
    fusion, fusion_note = open_fusion(loaded, all_triples)
    components = None
    if fusion is not None:
        R = len(loaded.relation_keys)
        answers = known_answers(all_triples, R)
        if split == "valid":
            fusion, fusion_note = _fit_fusion(loaded, fusion, ranked, answers, entities.vectors), None
        if fusion.weight is not None:
            text_ranks = ranked["ranks"]
            ranked = {**rank_with_vectors(None, loaded.texts, sample, all_triples, entities.vectors, fusion=fusion,
                                          query_vectors=ranked["query_vectors"]),
                      "query_encoding_s": ranked["query_encoding_s"]}
            alone = fusion.structure.ranks(ranked["queries"], ranked["targets"], answers, R, len(loaded.entity_keys))
            components = {"text": by_direction(text_ranks), "structure": by_direction(alone)}
    summary = {
        "model": loaded.fingerprint, "name": loaded.name, "split": split, "triples": int(len(sample)),
        "queries": int(2 * len(sample)), "entities": int(len(loaded.texts.entities)), "limit": int(limit),
        "seed": int(seed), "protocol": PROTOCOL, "metrics": by_direction(ranked["ranks"]),
        "timing": {"entity_vectors": entities.source, "entity_encoding_s": round(entities.seconds, 4),
                   "query_encoding_s": round(ranked["query_encoding_s"], 4),
                   "ranking_s": round(ranked["ranking_s"], 4),
                   "total_s": round(time.perf_counter() - t_start, 4)},
        "graph_fingerprint": loaded.graph_fingerprint,
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if components is not None:  # what ranked: text and structure fused, and each alone
        summary["fusion"] = {"weight": fusion.weight, "fitted_on": fusion.fitted.get("split", "valid"),
                             "fitted_queries": fusion.fitted.get("queries")}
        summary["components"] = components
    per_relation = by_relation(ranked["ranks"], ranked["queries"][:, 1] % len(loaded.relation_keys))
    summary["relations"] = [{"key": loaded.relation_keys[r], "label": loaded.relation_labels[r], **m}
                            for r, m in per_relation.items()]
    if entities.index_not_used:
        summary["index_not_used"] = entities.index_not_used
    warnings = list(loaded.warnings) + ([fusion_note] if fusion_note else [])
    if warnings:
        summary["warnings"] = warnings
    # the predictions first, the summary last: an eval-<split>.json always has its predictions beside it
    eval_path, pred_path = out_dir / f"eval-{split}.json", out_dir / f"predictions-{split}.jsonl"
    atomic_write_text(pred_path, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                         for r in _prediction_records(loaded, ranked)))
    summary["charts"] = write_charts(out_dir, split, ranked["ranks"], summary["relations"])
    atomic_write_text(eval_path, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    if split == "valid" and loaded.run_dir is not None:  # held-out triples: how far to trust a prediction
        calibration = _calibration(loaded, ranked, all_triples, entities.vectors, fusion)
        summary["calibration_path"] = str(write_calibration(out_dir, calibration))
    return {**summary, "eval_path": str(eval_path), "predictions_path": str(pred_path)}


def first_answer_confidence(loaded: LoadedModel, ranked: dict, all_triples: np.ndarray,
                            entity_vectors, fusion=None) -> tuple[FirstAnswers, float]:
    """The first answer `predict` would give for each ranked query (`calibration.first_answers`; with
    the structure model's share when `fusion` is fitted), and the run's temperature its probabilities
    are taken at."""
    R = len(loaded.relation_keys)
    tau = saved_train_config(read_config(loaded.run_dir)).temperature
    unit = lambda x: x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # noqa: E731
    first = first_answers(unit(ranked["query_vectors"]), unit(np.asarray(entity_vectors, dtype=np.float32)),
                          ranked["queries"], ranked["targets"], known_answers(all_triples, R),
                          self_loop_relations(all_triples), R, tau,
                          fusion=fusion if fusion is not None and fusion.weight is not None else None)
    return first, tau


def _fit_fusion(loaded: LoadedModel, fusion: Fusion, ranked: dict, answers: dict, entity_vectors) -> Fusion:
    """The weight of the structure model's scores with the best MRR on these held-out queries, written
    to the run folder (`fusion.json`) for predict, evaluate and ask."""
    vectors = np.asarray(entity_vectors, dtype=np.float32)
    qvecs = ranked["query_vectors"]
    fit = fit_weight(lambda a, b: qvecs[a:b] @ vectors.T, fusion.structure, ranked["queries"], ranked["targets"],
                     answers, len(loaded.relation_keys), fusion.temperature)
    fit["split"] = "valid"
    write_fusion(loaded.run_dir, fit, model=loaded.fingerprint, weights=loaded.weights,
                 structure_id=str(fusion.structure.info.get("id")), temperature=fusion.temperature)
    return Fusion(fusion.structure, float(fit["weight"]), fusion.temperature, fit)


def _calibration(loaded: LoadedModel, ranked: dict, all_triples: np.ndarray, entity_vectors,
                 fusion=None) -> Calibration:
    first, tau = first_answer_confidence(loaded, ranked, all_triples, entity_vectors, fusion)
    like_ask = unconnected(ranked["queries"], ranked["targets"], all_triples)
    return calibrate(loaded.fingerprint, loaded.weights, "valid", first.probability[like_ask], first.right[like_ask],
                     tau)


def _read_triples(workspace: Workspace, split: str, need_tables: bool) -> tuple:
    """(the split's triples, all triples, the model's tables or None), in one short store session."""
    if split not in SPLITS:
        raise KalmkgError(f"unknown split '{split}'; use one of: {', '.join(SPLITS)}")
    with Store.open(workspace) as store:
        split_triples = store.triples_array((split,))
        all_triples = store.triples_array()
        tables = (store.entity_table(), store.relation_table(), store.fingerprint()) if need_tables else None
    if len(split_triples) == 0:
        raise KalmkgError(f"the {split} split is empty (ingest one, or run `kalmkg split`)")
    return split_triples, all_triples, tables


def _entity_vectors(workspace: Workspace, loaded: LoadedModel, encoder, use_index: bool, batch_size: int,
                    progress) -> EntityVectors:
    """The entity index's vectors when it is fresh for this model, else every tail view encoded here."""
    from kalmkg.index import EntityIndex

    t0 = time.perf_counter()
    why_not = None
    if use_index:
        index, why_not = EntityIndex.try_open(workspace, loaded)
        if index is not None:
            return EntityVectors(index.vectors(), "index", time.perf_counter() - t0)
    vectors = encode_texts(encoder, [text.tail_view(t) for t in loaded.texts.entities], batch_size,
                           progress, "entities")
    return EntityVectors(vectors, "encoded", time.perf_counter() - t0, why_not)


def _prediction_records(loaded: LoadedModel, ranked: dict):
    """One record per query: the triple by keys, the query as text, the target, its rank, the top-3."""
    keys, labels = loaded.entity_keys, loaded.entity_labels
    rkeys, rlabels = loaded.relation_keys, loaded.relation_labels
    R, n = len(rkeys), len(ranked["ranks"]) // 2
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
