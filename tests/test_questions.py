"""Questions written from the graph for training: forms for every relation in both directions, the
queries they ask, the draw per batch, and the chat example `ask --no-context` would send."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import SAMPLE_TTL
from kalmkg.store import Store
from kalmkg.training.questions import (MAX_ANSWERS, QuestionQuery, QuestionWriter, RelationTypes, answer_text, question_forms,
                                       question_queries, relation_types, sample_questions)
from kalmkg.workspace import Workspace


@pytest.fixture(scope="module")
def relations(tmp_path_factory):
    from kalmkg.ingestion import ingest, resolve_sources

    ws = Workspace(tmp_path_factory.mktemp("questions") / "ws")
    with Store.open(ws, create=True) as store:
        ingest(store, resolve_sources([SAMPLE_TTL]))
        return store.relation_labels()


@pytest.mark.parametrize("description, head, tail", [
    ("The city where the subject person was born.", "person", "city"),
    ("An official or de facto national language of the subject country.", "country", "language"),
    ("The official currency used in the subject country.", "country", "currency"),
    ("A notable award or prize received by the subject person.", "person", "prize"),
    ("Something without the word.", None, None), (None, None, None),
])
def test_relation_types_come_from_the_description(description, head, tail):
    assert relation_types(description) == RelationTypes(head, tail)


def test_every_relation_is_asked_in_both_directions(relations):
    for _, label, description in relations:
        for inverse, entity in ((False, "Xavier Quux"), (True, "Yvonne Zed")):
            forms = question_forms(label, description, entity, inverse)
            assert len(forms) >= 2, (label, inverse)
            assert all(f.endswith("?") and entity in f for f in forms), forms
            assert len(set(forms)) == len(forms)


@pytest.mark.parametrize("label, description, inverse, expected", [
    ("born in", "The city where the subject person was born.", False, "What is the city where Marie Curie was born?"),
    ("born in", "The city where the subject person was born.", False, "Which city is Marie Curie born in?"),
    ("born in", "The city where the subject person was born.", True, "Which person is born in Marie Curie?"),
    ("spouse", "A person to whom the subject person is or was married.", False, "Who is Marie Curie's spouse?"),
    ("spouse", "A person to whom the subject person is or was married.", True,
     "Which person has Marie Curie as their spouse?"),
    ("currency", "The official currency used in the subject country.", True, "Which country has Marie Curie as its currency?"),
    ("shares border with", "A country with which the subject country shares a land border.", False,
     "Marie Curie shares border with what?"),
    ("shares border with", "A country with which the subject country shares a land border.", True,
     "Which country shares border with Marie Curie?"),
    ("capital", None, False, "What is the capital of Marie Curie?"),  # no description: label forms only
])
def test_question_forms_read_as_people_ask(label, description, inverse, expected):
    assert expected in question_forms(label, description, "Marie Curie", inverse)


def test_queries_are_both_directions_with_their_answers_and_lists_left_out():
    many = [[9, 1, t] for t in range(10, 10 + MAX_ANSWERS + 1)]  # one head with too many answers
    train = np.array([[0, 0, 1], [0, 0, 2], [3, 0, 1]] + many)
    queries = question_queries(train, num_relations=2)
    assert QuestionQuery(0, 0, (1, 2)) in queries and QuestionQuery(1, 2, (0, 3)) in queries
    assert QuestionQuery(3, 0, (1,)) in queries and QuestionQuery(10, 3, (9,)) in queries
    assert not any(q.entity == 9 and q.relation == 1 for q in queries)


def test_a_writer_answers_with_every_known_answer():
    writer = QuestionWriter(["Apple", "Steve Jobs", "Steve Wozniak"], ["founded by"],
                            ["A person who founded or co-founded the subject company."])
    q, a = writer.pair(QuestionQuery(0, 0, (1, 2)), pick=0)
    assert q == "Who is Apple founded by?" and a == "Steve Jobs and Steve Wozniak."
    q, a = writer.pair(QuestionQuery(1, 1, (0,)), pick=1)
    assert q == "Which company is founded by Steve Jobs?" and a == "Apple."
    assert answer_text(["A", "B", "C."]) == "A, B and C."


def test_the_draw_depends_on_seed_and_batch_only():
    assert sample_questions(100, 8, 0, 5) == sample_questions(100, 8, 0, 5)
    assert sample_questions(100, 8, 0, 5) != sample_questions(100, 8, 0, 6)
    assert sample_questions(100, 8, 1, 5) != sample_questions(100, 8, 0, 5)
    assert all(0 <= i < 100 for i, _ in sample_questions(100, 50, 0, 0))
    assert sample_questions(0, 8, 0, 0) == [] and sample_questions(10, 0, 0, 0) == []


def test_a_chat_example_is_asks_no_context_prompt_and_the_reply(tiny_model):
    from kalmkg.models import load_tokenizer
    from kalmkg.prompts import SYSTEM_NO_CONTEXT, no_context_messages
    from kalmkg.training.data import chat_example

    tokenizer = load_tokenizer(str(tiny_model), "tiny")
    prompt, reply = chat_example(tokenizer, no_context_messages("What is the capital of France?"), "Paris.")
    text = tokenizer.decode(prompt)
    assert SYSTEM_NO_CONTEXT in text and text.rstrip().endswith("assistant:")
    assert tokenizer.decode(reply).strip().startswith("Paris.")
