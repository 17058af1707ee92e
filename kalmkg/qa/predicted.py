"""Answers beyond the graph, said as such: when no fact answers a question that names an entity and a
relation clearly, the run's link predictor answers, labelled a prediction, with the precision such
predictions had on held-out triples (`kalmkg.evaluation.calibration`); below the precision asked for,
"I don't know".

What makes a question clear, pure and testable without a model:
- **One relation is asked about**: of every relation of the graph, one explains more of the question's
  words than any other, and at least one by its label (a description word alone is too weak a sign).
- **The slot is known**: the entity fills the relation's head or its tail, read from the graph (the
  relations it has are those the relation's heads have, or its tails', `prediction.likely_direction`),
  else from the relation's description ("The city where the subject person was born": a person is the
  head), and the type the question asks for fits.
- **The graph has no answer** for that slot: a fact it holds is never re-predicted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol, Sequence

import numpy as np

from kalmkg.evaluation.calibration import Calibration, CurvePoint
from kalmkg.prediction import likely_direction
from kalmkg.qa.answer import LABEL_MATCH, RelationWords, answer_type, asked_type, type_fits, word_matches
from kalmkg.qa.retrieve import Link, same_word, words

PREDICTED = "Not in the graph; predicted: {name} (probability {score:.2f}: {precision:.0%} of held-out " \
            "predictions this probable were right)."


class LinkPredictor(Protocol):
    """What `ask` needs of `kalmkg.prediction.Predictor`."""

    def query(self, entity: int, relation: int, direction: str = "tail", k: int = 10,
              filter_known: bool = False, temperature: float | None = None): ...


@dataclass(frozen=True)
class Asked:
    """What a question asks of the graph: the slot of (entity, relation) it wants filled."""

    entity: Link
    relation: int
    direction: str  # "tail": ENTITY RELATION ?, "head": ? RELATION ENTITY


@dataclass
class Prediction:
    """The link predictor's first answer to an asked slot, and whether it is reliable enough to say."""

    asked: Asked
    relation_label: str
    key: str
    label: str
    score: float  # the model's probability of this answer (what the calibration is measured on)
    point: CurvePoint | None  # the held-out precision at this probability (None: below every measured one)
    threshold: float | None  # the lowest probability said at the precision asked for (None: none is)
    said: bool
    cosine: float = 0.0

    def text(self) -> str:
        return PREDICTED.format(name=self.label, score=self.score, precision=self.point.precision)

    def to_json(self) -> dict:
        return {"entity": {"key": self.key, "label": self.label}, "from": self.asked.entity.label,
                "relation": self.relation_label, "direction": self.asked.direction,
                "probability": round(self.score, 4), "cosine": round(self.cosine, 4), "threshold": None if self.threshold is None else round(self.threshold, 4),
                "held_out_precision": None if self.point is None else self.point.precision,
                "held_out_support": None if self.point is None else self.point.support,
                "said": self.said, "source": "prediction"}


def asked_relation(question_words: Sequence[str], relations: Mapping[int, RelationWords]) -> int | None:
    """The one relation the question's words point to (one label word at least), or None: no relation,
    or two that explain as much."""
    scored = []
    for rid, rel in relations.items():
        matches = word_matches(question_words, rel)
        if any(v == LABEL_MATCH for v in matches.values()):
            scored.append((sum(matches.values()), rid))
    scored.sort(reverse=True)
    if not scored or (len(scored) > 1 and scored[1][0] == scored[0][0]):
        return None
    return scored[0][1]


def direction_from_types(description: str | None, relation: RelationWords) -> str | None:
    """The slot an entity fills, from its description naming the relation's head or tail type ("a city
    in France" fills the tail of `born in`); None when it names neither or both."""
    said = words(description or "")
    fits = {d for d, forward in (("tail", False), ("head", True))
            if any(same_word(w, t) for t in answer_type(relation, forward) for w in said)}
    return fits.pop() if len(fits) == 1 else None


def asked_slot(question: str, question_words: Sequence[str], links: Sequence[Link],
               relations: Mapping[int, RelationWords], triples: np.ndarray) -> Asked | None:
    """The slot the question asks to fill, when it is clear (see the module's rules); None otherwise."""
    if not links:
        return None
    relation = asked_relation(question_words, relations)
    if relation is None:
        return None
    entity = links[0]
    direction = likely_direction(triples, entity.id, relation) or \
        direction_from_types(entity.description, relations[relation])
    if direction is None or not type_fits(asked_type(question), relations[relation], direction == "tail"):
        return None
    column = 0 if direction == "tail" else 2
    has = triples[(triples[:, 1] == relation) & (triples[:, column] == entity.id)]
    return None if len(has) else Asked(entity, relation, direction)


def predict_slot(asked: Asked, predictor: LinkPredictor, calibration: Calibration,
                 min_precision: float) -> Prediction | None:
    """The predictor's first new answer for the slot, said when the model's probability of it reaches the
    calibrated threshold for `min_precision`; None when it has no answer to give."""
    result = predictor.query(asked.entity.id, asked.relation, asked.direction, k=1, filter_known=True,
                             temperature=calibration.temperature)
    if not result.candidates:
        return None
    best = result.candidates[0]
    threshold = calibration.threshold(min_precision)
    said = threshold is not None and best.probability >= threshold
    return Prediction(asked, result.relation.label, best.key, best.label, best.probability,
                      calibration.precision_at(best.probability), threshold, said, best.score)
