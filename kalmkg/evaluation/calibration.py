"""How far to trust the link predictor's first answer: a precision curve measured on held-out triples.

`ask` answers from the graph when a path explains the question. When none does but the question names an
entity and a relation clearly, the link predictor can answer instead, said as a prediction. Whether it
should depends on how sure the model is: `kalmkg evaluate --split valid` (which `kalmkg train` runs at
its end) ranks held-out triples the model never trained on (those no other fact of the graph answers,
see `unconnected`), and for each query keeps the model's
probability of the first answer the predictor would give (known answers and the query's own entity left
out, as `predict` leaves them out) and whether it was the held-out one. Sorted by probability, that is
a precision curve: of the held-out queries whose first answer was at least that probable, the share
that was right. `ask` says a prediction only where the curve stays above the precision it is asked for
(`--min-precision`), and says that precision.

The probability (softmax over the candidates at the run's temperature), not the cosine: on UMLS (a
135-step run, 1,304 valid queries) it orders right first answers before wrong ones with an AUROC of .70
against the cosine's .57.

Pure functions over arrays, and the run folder's `calibration.json`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from kalmkg.files import atomic_write_text

FILE = "calibration.json"
MIN_SUPPORT = 10  # held-out queries at or above a threshold before its precision means anything
MAX_POINTS = 200  # curve points kept in the file (quantiles of the scores)


@dataclass(frozen=True)
class CurvePoint:
    score: float  # a threshold: first answers of at least this probability ...
    precision: float  # ... were right this often ...
    support: int  # ... over this many held-out queries


@dataclass
class Calibration:
    """The precision curve of a model's first answers on held-out queries, most probable first."""

    model: str  # the model fingerprint ("run:<id>")
    weights: str  # the weight hash it was measured with (a resumed run makes it stale)
    split: str
    queries: int
    hit_rate: float  # share of held-out queries whose first answer was right (Hits@1 as predict sees it)
    temperature: float  # the softmax temperature of the probabilities (the run's tau)
    curve: list[CurvePoint] = field(default_factory=list)

    def threshold(self, min_precision: float) -> float | None:
        """The lowest score whose first answers were right at least `min_precision` of the time, over at
        least MIN_SUPPORT queries; None when no score is that reliable."""
        ok = [p.score for p in self.curve if p.support >= MIN_SUPPORT and p.precision >= min_precision]
        return min(ok) if ok else None

    def precision_at(self, score: float) -> CurvePoint | None:
        """The point a first answer of `score` falls in: the highest threshold it reaches (None: below all)."""
        reached = [p for p in self.curve if p.score <= score]
        return max(reached, key=lambda p: p.score) if reached else None

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "Calibration":
        curve = [CurvePoint(float(p["score"]), float(p["precision"]), int(p["support"])) for p in data.get("curve", [])]
        return cls(str(data["model"]), str(data["weights"]), str(data["split"]), int(data["queries"]),
                   float(data["hit_rate"]), float(data["temperature"]), curve)


def probabilities(scores: np.ndarray, of: np.ndarray, temperature: float) -> np.ndarray:
    """The model's probabilities of the candidates scoring `of`: softmax(scores / temperature) over the
    candidates left (excluded ones at -inf). KaLM trains exactly this distribution (InfoNCE over
    entities at temperature tau), and it tells a confident answer from a guess far better than the
    cosine does: a first answer at .93 among many at .92 is a guess."""
    finite = scores[np.isfinite(scores)]
    if len(finite) == 0:
        return np.zeros(len(of))
    best = finite.max()
    return np.exp((np.asarray(of, dtype=np.float64) - best) / temperature) / np.exp((finite - best) / temperature).sum()


def first_probability(scores: np.ndarray, temperature: float) -> float:
    """The probability of the best-scoring candidate (0 when none is left)."""
    finite = scores[np.isfinite(scores)]
    return float(probabilities(scores, finite.max(keepdims=True), temperature)[0]) if len(finite) else 0.0


class FirstAnswers(NamedTuple):
    """Per held-out query, the first answer `predict` gives: its probability, its cosine, whether right."""

    probability: np.ndarray
    cosine: np.ndarray
    right: np.ndarray


def first_answers(query_vectors: np.ndarray, entity_vectors: np.ndarray, queries: np.ndarray, targets: np.ndarray,
                  known: dict, self_loop_relations: set[int], num_relations: int, temperature: float,
                  chunk: int = 1024, fusion=None) -> FirstAnswers:
    """The probability, cosine and rightness of the first answer `predict` gives for each held-out query: every known answer
    but the target left out (the held-out fact is unknown to `ask`), and the query's own entity unless
    its relation has self-loops. Queries [n, 2] (entity, relation; >= num_relations: inverse), targets
    [n], vectors L2-normalised; `known`: (entity, relation) -> known answers (metrics.known_answers);
    `fusion` (fitted): the structure model's share added to the cosines, as predict adds it."""
    confidence = np.zeros(len(queries), dtype=np.float64)
    cosine = np.zeros(len(queries), dtype=np.float64)
    right = np.zeros(len(queries), dtype=bool)
    for start in range(0, len(queries), chunk):
        scores = np.asarray(query_vectors[start:start + chunk], dtype=np.float32) @ entity_vectors.T
        if fusion is not None:
            scores += fusion.extra(queries[start:start + chunk], num_relations, scores.shape[1])
        for j, row in enumerate(scores):
            i = start + j
            (q, r), target = queries[i].tolist(), int(targets[i])
            out = [a for a in known.get((q, r), ()) if a != target]
            if r % num_relations not in self_loop_relations:
                out.append(q)
            row[out] = -np.inf
            first = int(np.argmax(row))
            confidence[i], cosine[i], right[i] = first_probability(row, temperature), row[first], first == target
    return FirstAnswers(confidence, cosine, right)


def unconnected(queries: np.ndarray, targets: np.ndarray, triples: np.ndarray) -> np.ndarray:
    """[n] bool: which held-out queries no other fact of `triples` answers: no triple but the held-out one
    joins the query's entity and its target, in any relation or direction. `ask` asks the predictor only
    when no fact answers the question, so these are the queries its predictions are like. Calibrating on
    the others would be calibrating on the easy case: a graph with paired relations (`capital` beside
    `capital of`, `spouse` both ways) holds most of a held-out fact a second time."""
    pairs: dict[tuple[int, int], int] = {}
    for h, _, t in triples.tolist():
        key = (h, t) if h <= t else (t, h)
        pairs[key] = pairs.get(key, 0) + 1
    out = np.ones(len(queries), dtype=bool)
    for i, ((q, _), t) in enumerate(zip(queries.tolist(), targets.tolist())):
        out[i] = pairs.get((q, t) if q <= t else (t, q), 0) <= 1  # the held-out triple itself is one
    return out


def precision_curve(scores: np.ndarray, right: np.ndarray, max_points: int = MAX_POINTS) -> list[CurvePoint]:
    """Precision of the first answers scoring at least s, for s at (at most `max_points`) of the scores,
    best first. Ties share one point (a threshold cannot split them)."""
    ok = np.isfinite(scores)
    scores, right = scores[ok], right[ok]
    if len(scores) == 0:
        return []
    order = np.argsort(-scores, kind="stable")
    s, hits = scores[order], np.cumsum(right[order])
    # the last position of each distinct score: a threshold at s takes every query scoring s
    last = np.flatnonzero(np.append(s[1:] != s[:-1], True))
    if len(last) > max_points:
        last = last[np.unique(np.linspace(0, len(last) - 1, max_points).round().astype(int))]
    return [CurvePoint(round(float(s[i]), 6), round(float(hits[i] / (i + 1)), 4), int(i + 1)) for i in last]


def calibrate(model: str, weights: str, split: str, scores: np.ndarray, right: np.ndarray,
              temperature: float) -> Calibration:
    n = int(np.isfinite(scores).sum())
    hit_rate = float(right[np.isfinite(scores)].mean()) if n else 0.0
    return Calibration(model, weights, split, n, round(hit_rate, 4), temperature, precision_curve(scores, right))


def write_calibration(folder: Path, calibration: Calibration) -> Path:
    path = folder / FILE
    atomic_write_text(path, json.dumps(calibration.to_json(), indent=1) + "\n")
    return path


def read_calibration(folder: Path) -> Calibration | None:
    """The folder's calibration, or None when there is none or it cannot be read."""
    try:
        return Calibration.from_json(json.loads((folder / FILE).read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None
