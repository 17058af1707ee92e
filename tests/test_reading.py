"""Fact-reading turns written from the graph for training: `ask`'s own prompts, replies that `ask` would
keep, distractors that are never answers, 2-hop paths with their bridge, and draws from (seed, step)."""

from __future__ import annotations

import re

import numpy as np
import pytest

from kalmkg.prompts import SYSTEM, SYSTEM_ANSWER, build_messages, join_names
from kalmkg.qa.answer import AnswerGroup, usable_sentence
from kalmkg.qa.retrieve import Fact, Path
from kalmkg.store import Store
from kalmkg.training.questions import QuestionQuery, QuestionWriter, question_queries
from kalmkg.training.reading import KINDS, N_FACTS, ReadingWriter, Said, fact_sentence


@pytest.fixture(scope="module")
def writer(world) -> ReadingWriter:
    with Store.open(world) as store:
        train, entities, relations = store.triples_array(), store.entity_table(), store.relation_table()
    questions = QuestionWriter(entities["label"].to_pylist(), relations["label"].to_pylist(),
                               relations["description"].to_pylist())
    return ReadingWriter(questions, train, question_queries(train, relations.num_rows))


def query_of(writer: ReadingWriter, entity: str, relation: str, inverse: bool = False) -> QuestionQuery:
    e = writer.questions.entity_labels.index(entity)
    r = writer.questions.relation_labels.index(relation) + (len(writer.questions.relation_labels) if inverse else 0)
    return next(q for q in writer.queries if q.entity == e and q.relation == r)


def fact_lines(turn) -> list[str]:
    return re.findall(r"^\[\d+\] (.+)$", turn.messages[-1]["content"], flags=re.M)


def group_of(writer: ReadingWriter, turn, paths: list[tuple[int, ...]], start: int, answers: list[int]) -> AnswerGroup:
    """The AnswerGroup `ask` would have chosen for these fact paths (indices into the turn's facts)."""
    labels = writer.questions.entity_labels
    ids = {label: i for i, label in enumerate(labels)}
    facts = []
    for line in fact_lines(turn):
        h, r, t = line.split(" — ")
        facts.append(Fact(ids[h], writer.questions.relation_labels.index(r), ids[t], h, r, t))
    return AnswerGroup(start, (), [Path(tuple(facts[i] for i in p)) for p in paths],
                       [(a, "", labels[a]) for a in answers])


@pytest.mark.parametrize("label, sentence", [
    ("currency", "The currency of France is Euro"),
    ("capital of", "France is capital of Euro"),
    ("shares border with", "France shares border with Euro"),
])
def test_a_fact_is_said_as_its_label_reads(label, sentence):
    assert fact_sentence("France", label, "Euro") == sentence


def test_an_answer_turn_is_asks_chosen_answer_prompt_and_a_sentence_ask_keeps(writer):
    query = query_of(writer, "Apple Inc.", "founded by")
    turn = writer.answer_turn(query, pick=0, rng=np.random.default_rng(0))
    labels = writer.questions.entity_labels
    founders = [labels[a] for a in query.answers]
    assert len(founders) == 3 and turn.kind == "answer"
    assert turn.messages[0]["content"] == SYSTEM_ANSWER
    facts = [Said(*line.split(" — ")) for line in fact_lines(turn)]
    assert sorted(f.tail for f in facts) == sorted(founders) and {f.head for f in facts} == {"Apple Inc."}
    question = turn.messages[-1]["content"].split("\nQuestion: ")[1].split("\nAnswer: ")[0]
    answer = turn.messages[-1]["content"].rsplit("\nAnswer: ", 1)[1]
    assert turn.messages == build_messages(question, facts, answer=answer)  # exactly what ask sends
    assert turn.reply.endswith("[1][2][3].") and all(name in turn.reply for name in founders)
    group = group_of(writer, turn, [(0,), (1,), (2,)], query.entity, list(query.answers))
    assert usable_sentence(turn.reply, group, ["Microsoft", "Bill Gates"]) == turn.reply


def test_an_inverse_answer_turn_says_the_fact_in_its_stored_direction(writer):
    query = query_of(writer, "France", "capital of", inverse=True)  # "Which city is capital of France?"
    turn = writer.answer_turn(query, pick=0, rng=np.random.default_rng(0))
    assert turn.reply == "Paris is capital of France [1]."
    assert fact_lines(turn) == ["Paris — capital of — France"]


def test_a_read_turn_hides_the_facts_among_distractors_that_are_no_answers(writer):
    query = query_of(writer, "Marie Curie", "born in")
    relation = writer.questions.relation_labels.index("born in")
    for seed in range(20):
        turn = writer.read_turn(query, pick=seed, rng=np.random.default_rng(seed))
        assert turn.messages[0]["content"] == SYSTEM and "\nAnswer: " not in turn.messages[-1]["content"]
        lines = fact_lines(turn)
        assert len(lines) == N_FACTS and len(set(lines)) == N_FACTS
        right = [n + 1 for n, line in enumerate(lines) if line == "Marie Curie — born in — Warsaw"]
        assert len(right) == 1 and turn.reply == f"Marie Curie is born in Warsaw [{right[0]}]."
        # the entity's own facts come first among distractors; none is another answer of the query
        assert sum("Marie Curie" in line for line in lines) >= 3
        assert not any(line.split(" — ")[1] == "born in" and "Marie Curie" in line
                       for n, line in enumerate(lines) if n + 1 not in right)
    assert relation >= 0


def test_a_two_hop_turn_names_its_bridge(writer):
    turns = [t for t in (writer.two_hop_turn(np.random.default_rng(s)) for s in range(40)) if t is not None]
    assert len(turns) >= 30
    for turn in turns:
        assert turn.kind == "two-hop" and turn.messages[0]["content"] == SYSTEM_ANSWER
        lines = fact_lines(turn)
        first = Said(*lines[0].split(" — "))
        e = writer.questions.entity_labels.index(first.head)
        question = turn.messages[-1]["content"].split("\nQuestion: ")[1].split("\nAnswer: ")[0]
        assert f"{first.head}'s {first.relation}" in question and question.endswith("?")
        assert turn.reply.startswith(fact_sentence(first.head, first.relation, first.tail) + " [1], and ")
        onward = [Said(*line.split(" — ")) for line in lines[1:]]
        far = [f.tail if f.head == first.tail else f.head for f in onward]  # the far end of each second hop
        assert turn.messages[-1]["content"].endswith("\nAnswer: " + join_names(far))
        answers = [writer.questions.entity_labels.index(a) for a in far]
        group = group_of(writer, turn, [(0, i) for i in range(1, len(lines))], e, answers)
        group.relations = (0, 0)  # two hops
        assert usable_sentence(turn.reply, group, []) == turn.reply, turn


def test_turns_are_drawn_from_seed_and_step_alone(writer):
    assert writer.turn(0, 5, 1) == writer.turn(0, 5, 1)
    drawn = [writer.turn(0, step, j) for step in range(20) for j in range(4)]
    assert {t.kind for t in drawn} == set(KINDS)
    assert writer.turn(0, 5, 1) != writer.turn(0, 6, 1) or writer.turn(0, 5, 2) != writer.turn(1, 5, 2)
