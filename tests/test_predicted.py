"""Answers beyond the graph: the calibration curve, which slot a question asks to fill, and `ask` saying a
link prediction (or not) with a fake predictor over the sample graph."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest

from kalmkg.evaluation.answers import grade, is_abstention
from kalmkg.evaluation.calibration import (MIN_SUPPORT, Calibration, CurvePoint, calibrate, first_answers,
                                           first_probability, precision_curve, read_calibration, write_calibration)
from kalmkg.prediction import Candidate, likely_direction, role_profile
from kalmkg.qa.answer import relation_words
from kalmkg.qa.ask import NO_ANSWER, AskConfig, ask
from kalmkg.qa.predicted import asked_relation, asked_slot, direction_from_types
from kalmkg.qa.retrieve import link_entities


# --------------------------------------------------------------------------------------------- calibration
def test_the_precision_curve_counts_first_answers_at_or_above_each_score():
    scores = np.array([0.9, 0.8, 0.8, 0.5, -np.inf])
    right = np.array([True, False, True, False, True])
    curve = precision_curve(scores, right)
    # the two 0.8s are one point (a threshold cannot split a tie); the -inf query had no answer
    assert curve == [CurvePoint(0.9, 1.0, 1), CurvePoint(0.8, 0.6667, 3), CurvePoint(0.5, 0.5, 4)]


def test_a_threshold_needs_enough_support_and_precision():
    # 30 queries, best first: the top 5 right, then alternating
    right = np.array([True] * 5 + [i % 2 == 0 for i in range(25)])
    cal = calibrate("run:x", "w", "valid", np.linspace(1.0, 0.1, 30), right, 0.05)
    assert cal.queries == 30 and cal.hit_rate == pytest.approx(right.mean(), abs=1e-4)
    t = cal.threshold(0.7)
    point = cal.precision_at(t)
    assert point.support >= MIN_SUPPORT and point.precision >= 0.7
    # every lower score with enough support is below 0.7
    assert all(p.precision < 0.7 for p in cal.curve if p.score < t and p.support >= MIN_SUPPORT)
    assert cal.threshold(0.99) is None  # 5 perfect answers are fewer than MIN_SUPPORT
    assert cal.precision_at(t + 0.01).score == t and cal.precision_at(t + 0.05).score > t
    assert cal.precision_at(0.0) is None


def test_the_first_probability_is_the_softmax_at_the_best_score():
    assert first_probability(np.array([0.5, 0.5, -np.inf]), 0.05) == pytest.approx(0.5)
    assert first_probability(np.array([0.9, 0.5]), 0.1) == pytest.approx(1 / (1 + np.exp(-4)))
    assert first_probability(np.array([-np.inf]), 0.05) == 0.0


def test_first_answers_leave_out_known_answers_and_the_query_entity_unless_it_loops():
    entities = np.eye(4, dtype=np.float32)
    # query 0: (entity 0, relation 0), target 2; entity 1 a known answer, entity 0 itself the closest
    # query 1: (entity 0, relation 1) with self-loops: entity 0 may answer; target 0
    queries, targets = np.array([[0, 0], [0, 1]]), np.array([2, 0])
    qvecs = np.array([[0.9, 0.8, 0.5, 0.0], [0.9, 0.8, 0.5, 0.0]], dtype=np.float32)
    known = {(0, 0): {1, 2}}
    prob, cosine, right = first_answers(qvecs, entities, queries, targets, known, {1}, num_relations=2,
                                        temperature=0.1)
    assert right.tolist() == [True, True] and cosine.tolist() == pytest.approx([0.5, 0.9])
    assert prob[0] == pytest.approx(first_probability(np.array([0.5, 0.0]), 0.1))
    assert prob[1] == pytest.approx(first_probability(np.array([0.9, 0.8, 0.5, 0.0]), 0.1))


def test_a_calibration_is_kept_in_the_run_folder(tmp_path):
    cal = Calibration("run:x", "w", "valid", 3, 0.5, 0.05, [CurvePoint(0.9, 1.0, 1)])
    write_calibration(tmp_path, cal)
    assert read_calibration(tmp_path) == cal
    (tmp_path / "calibration.json").write_text("{broken")
    assert read_calibration(tmp_path) is None and read_calibration(tmp_path / "none") is None


# --------------------------------------------------------------------------------------------- the slot
# `store`: the sample graph (conftest)
def ids(store, *keys):
    table = store.entity_table()
    by_key = {k.rsplit("/", 1)[-1]: i for i, k in enumerate(table["key"].to_pylist())}
    return [by_key[k] for k in keys]


def rel_id(store, name):
    return next(i for i, label, _ in store.relation_labels() if label == name)


def without(triples, drop):
    return triples[~np.array([tuple(t) in drop for t in triples.tolist()])]


def test_role_profile_is_the_share_of_entities_per_relation_and_role():
    t = np.array([[0, 0, 1], [2, 0, 1], [0, 1, 3]])
    assert role_profile(t, np.array([0, 2]), skip_relation=-1) == {(0, "out"): 1.0, (1, "out"): 0.5}
    assert role_profile(t, np.array([1]), skip_relation=0) == {}


def test_the_slot_an_entity_fills_is_read_from_the_graph(store):
    triples = store.triples_array()
    capital, born = rel_id(store, "capital of"), rel_id(store, "born in")
    paris, france, curie, warsaw = ids(store, "Paris", "France", "Marie_Curie", "Warsaw")
    # France without its capital: its facts are a country's, the tails of `capital of` -> a head query
    dropped = without(triples, {(paris, capital, france)})
    assert likely_direction(dropped, france, capital) == "head"
    # Paris without it: a city, a head of `capital of` -> a tail query
    assert likely_direction(dropped, paris, capital) == "tail"
    # Marie Curie without her birthplace: a person, a head of `born in`
    assert likely_direction(without(triples, {(curie, born, warsaw)}), curie, born) == "tail"
    # a symmetric relation: either slot is the same question
    assert likely_direction(triples, ids(store, "Angela_Merkel")[0], rel_id(store, "spouse")) == "tail"
    # an entity with no other fact: the graph does not tell
    assert likely_direction(np.array([[0, 0, 1], [2, 1, 3]]), 4, 0) is None


def test_an_entity_description_naming_the_head_or_tail_type_gives_the_slot(store):
    rels = relation_words(store.relation_labels())
    born = rels[rel_id(store, "born in")]
    assert direction_from_types("A German physicist and person of note", born) == "tail"
    assert direction_from_types("A city in Poland", born) == "head"
    assert direction_from_types("A river", born) is None


@pytest.mark.parametrize("words, relation", [
    (["capital"], "capital of"), (["born"], "born in"), (["hometown"], None),  # a description word alone
    (["spouse", "born"], None),  # two relations explain as much
])
def test_the_asked_relation_is_one_label_that_explains_the_most(store, words, relation):
    rels = relation_words(store.relation_labels())
    got = asked_relation(words, rels)
    assert (None if got is None else next(lbl for i, lbl, _ in store.relation_labels() if i == got)) == relation


def test_a_slot_the_graph_already_fills_is_not_asked(store):
    rels = relation_words(store.relation_labels())
    question = "What is the capital of France?"
    links = link_entities(store, question)
    assert asked_slot(question, ["capital"], links, rels, store.triples_array()) is None
    paris, france = ids(store, "Paris", "France")
    dropped = without(store.triples_array(), {(paris, rel_id(store, "capital of"), france)})
    asked = asked_slot(question, ["capital"], links, rels, dropped)
    assert (asked.entity.id, asked.relation, asked.direction) == (france, rel_id(store, "capital of"), "head")
    # the type asked for must fit: a continent is no head of `capital of`
    assert asked_slot("Which continent is the capital of France?", ["capital"], links, rels, dropped) is None


# --------------------------------------------------------------------------------------------- ask
@dataclass
class _Result:
    candidates: list
    relation: object


@dataclass
class _Rel:
    label: str


class FakePredictor:
    def __init__(self, label="Joachim Sauer", score=0.8):
        self.label, self.score, self.calls = label, score, []

    def query(self, entity, relation, direction="tail", k=10, filter_known=False, temperature=None):
        self.calls.append((entity, relation, direction, k, filter_known, temperature))
        return _Result([Candidate(1, 999, f"ex:{self.label}", self.label, 0.91, False, self.score)], _Rel("spouse"))


class NoModel:
    def stream(self, messages, **kw):
        raise AssertionError("no generation for an answer the graph does not hold")


CALIBRATION = Calibration("run:x", "w", "valid", 40, 0.4, 0.05, [CurvePoint(0.9, 0.9, 10), CurvePoint(0.7, 0.6, 20),
                                                            CurvePoint(0.2, 0.4, 40)])
QUESTION = "Who is the spouse of Angela Merkel?"  # the graph has no spouse of hers


def test_a_clear_question_no_fact_answers_gets_a_prediction_said_as_such(store):
    predictor = FakePredictor(score=0.75)
    answer = ask(store, QUESTION, NoModel(), beyond=lambda: (predictor, CALIBRATION))
    merkel = ids(store, "Angela_Merkel")[0]
    assert predictor.calls == [(merkel, rel_id(store, "spouse"), "tail", 1, True, 0.05)]
    assert answer.text == ("Not in the graph; predicted: Joachim Sauer (probability 0.75: 60% of held-out "
                           "predictions this probable were right).")
    out = answer.to_json()
    assert out["chosen"] is None and out["predicted"]["said"] and out["predicted"]["source"] == "prediction"
    assert out["predicted"]["held_out_precision"] == 0.6 and out["predicted"]["threshold"] == 0.7
    json.dumps(out)
    # graded as what it is: not an answer from the graph
    assert is_abstention(answer.text) and not grade(answer.text, ["Joachim Sauer"])


def test_a_prediction_below_the_threshold_is_not_said(store):
    answer = ask(store, QUESTION, NoModel(), beyond=lambda: (FakePredictor(score=0.5), CALIBRATION))
    assert answer.text == NO_ANSWER.format(names="Angela Merkel")
    assert answer.predicted is not None and not answer.predicted.said
    assert "(probability 0.50); below 0.70, where held-out predictions were right 50%" in answer.notes[0]
    stricter = ask(store, QUESTION, NoModel(), config=AskConfig(min_precision=0.95),
                   beyond=lambda: (FakePredictor(score=0.95), CALIBRATION))
    assert not stricter.predicted.said and "no probability reached 95% precision" in stricter.notes[0]


def test_no_prediction_without_a_clear_question_a_predictor_or_the_wish(store):
    def never():
        raise AssertionError("the predictor is opened only for a clear question")

    # no relation is asked about clearly ("wife" is no label word)
    assert ask(store, "Who is Angela Merkel's wife?", NoModel(), beyond=never).predicted is None
    unavailable = ask(store, QUESTION, NoModel(), beyond=lambda: "run r is not calibrated")
    assert unavailable.text == NO_ANSWER.format(names="Angela Merkel")
    assert unavailable.notes == ["no prediction beyond the graph: run r is not calibrated"]
    assert ask(store, QUESTION, NoModel(), config=AskConfig(predict=False), beyond=never).predicted is None


def test_min_precision_must_be_a_share():
    from kalmkg.errors import KalmkgError

    for bad in (0, 1.5):
        with pytest.raises(KalmkgError, match="--min-precision"):
            AskConfig(min_precision=bad)


def test_calibration_leaves_out_held_out_facts_another_fact_already_answers():
    """Paris capital_of France held out, France capital Paris still in the graph: ask would answer it from
    that fact, never from the predictor, so it is not a query the predictor's precision is measured on."""
    from kalmkg.evaluation.calibration import unconnected

    triples = np.array([[0, 0, 1], [1, 1, 0], [2, 0, 3], [4, 2, 5], [5, 2, 4]])  # 0-1 twice, 2-3 once
    queries = np.array([[0, 0], [1, 3], [2, 0], [3, 3], [4, 2]])
    targets = np.array([1, 0, 3, 2, 6])
    assert unconnected(queries, targets, triples).tolist() == [False, False, True, True, True]
