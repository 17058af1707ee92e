"""Text and structure scores, fused: a product of experts. The text model's probabilities are
softmax(cosine / tau) (what KaLM trains), the structure model's softmax(score); their product, renormalised,
ranks by

    cosine / tau + weight * structure score,

and `predict`, `evaluate` and `ask` take this in cosine units, cosine + tau * weight * score, so that
every probability stays softmax(score / tau). The one weight is fitted on the valid split (`kalmkg
evaluate --split valid`, which `kalmkg train` ends with): the filtered MRR of a grid of weights, best
kept, in the run folder's `fusion.json` with the text model's weight hash and the structure model's id
(a resumed or retrained run is fitted again).

Entities ingested after training get a row folded in from their facts with known entities
(`StructureModel.with_new_entities`, when the caller passes the graph's triples). A query whose entity
or relation still has no row is scored by text alone; a candidate without one gets the query's mean
structure score.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kalmkg.files import atomic_write_text
from kalmkg.structure.model import StructureModel

FILE = "fusion.json"
# weights tried, in logit units (cosine / tau + weight * score): 0 is the text model alone, the largest
# let the structure model decide all but its ties (a text model that has learned little)
WEIGHTS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0, 100.0, 1000.0)


@dataclass
class Fusion:
    """A run's structure model and the weight its scores are added with (None: not fitted yet)."""

    structure: StructureModel
    weight: float | None
    temperature: float  # the text model's tau: the cosine's unit
    fitted: dict = field(default_factory=dict)  # what fusion.json says of the fit

    def extra(self, queries: np.ndarray, num_relations: int, num_entities: int,
              weight: float | None = None) -> np.ndarray:
        """[B, num_entities] what fusion adds to the cosines of queries [B, 2] (entity, relation;
        >= num_relations: inverse), in cosine units."""
        w = self.weight if weight is None else weight
        return self.structure.scores(queries, num_relations, num_entities)[0] * np.float32(self.temperature * (w or 0.0))


def fit_weight(text_scores, structure: StructureModel, queries: np.ndarray, targets: np.ndarray, answers: dict,
               num_relations: int, temperature: float, weights=WEIGHTS, chunk: int = 1024) -> dict:
    """The weight of `weights` with the best filtered MRR on held-out queries (ties: the smaller), and
    every weight's MRR, with the structure model's alone. `text_scores(start, stop)` gives the [B, N]
    cosines of queries[start:stop]; answers: metrics.known_answers of every split."""
    from kalmkg.evaluation.metrics import answer_mask, filtered_ranks

    reciprocal = {w: [] for w in weights}
    n = 0
    for start in range(0, len(queries), chunk):
        q, tgt = queries[start:start + chunk], targets[start:start + chunk]
        cos = np.asarray(text_scores(start, start + len(q)), dtype=np.float32)
        n = cos.shape[1]
        mask = answer_mask(q.tolist(), answers, n)
        per_unit = structure.scores(q, num_relations, n)[0]  # in logit units
        for w in weights:
            reciprocal[w].append(1.0 / filtered_ranks(cos / temperature + w * per_unit, tgt, mask))
    mrr = {w: float(np.concatenate(v).mean()) if v else float("nan") for w, v in reciprocal.items()}
    best = max(weights, key=lambda w: (round(mrr[w], 6) if np.isfinite(mrr[w]) else -1.0, -w))
    alone = structure.ranks(queries, targets, answers, num_relations, n)
    return {"weight": best, "mrr": {str(w): round(v, 4) for w, v in mrr.items()},
            "structure_alone_mrr": round(float((1.0 / alone).mean()), 4) if len(alone) else None,
            "queries": int(len(queries))}


def write_fusion(folder: Path, fit: dict, *, model: str, weights: str, structure_id: str, temperature: float) -> Path:
    path = folder / FILE
    record = {"model": model, "weights": weights, "structure": structure_id, "temperature": temperature, **fit}
    atomic_write_text(path, json.dumps(record, indent=1) + "\n")
    return path


def open_fusion(loaded, triples: np.ndarray | None = None) -> tuple[Fusion | None, str | None]:
    """(the run's fusion, None), or (None, why the structure model is not used: one line; None when
    the run has none). A fusion with weight None has a structure model that is not fitted yet.
    `triples` (the graph's, every split): entities added since training get rows folded in from them."""
    if loaded.run_dir is None:
        return None, None
    structure = StructureModel.load(loaded.run_dir)
    if structure is None:
        return None, None
    if not structure.fits(loaded.entity_keys, loaded.relation_keys):
        return None, ("the run's structure model was trained on other entities or relations than the graph has "
                      "now; ranking by text alone (train a new run to use it)")
    from kalmkg.runs import read_config
    from kalmkg.training.config import saved_train_config

    tau = saved_train_config(read_config(loaded.run_dir)).temperature
    if triples is not None:
        structure = structure.with_new_entities(triples, len(loaded.entity_keys), len(loaded.relation_keys))
    fitted = _read(loaded.run_dir)
    if (fitted is None or fitted.get("weights") != loaded.weights
            or fitted.get("structure") != structure.info.get("id")):
        return Fusion(structure, None, tau), ("the run's structure model is not fitted to its text model yet; "
                                              f"ranking by text alone (`kalmkg evaluate --split valid --run "
                                              f"{loaded.name}` fits it)")
    return Fusion(structure, float(fitted["weight"]), float(fitted.get("temperature", tau)), fitted), None


def _read(folder: Path) -> dict | None:
    try:
        return json.loads((folder / FILE).read_text())
    except (OSError, ValueError):
        return None
