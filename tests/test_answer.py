"""Choosing the answer from the graph (`kalmkg.qa.answer`): the pure scoring, answer groups, the sentence
check, and the sample graph's question fixture answered by path choice alone (no model)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import TESTS
from kalmkg.evaluation.answers import grade, load_questions
from kalmkg.qa.answer import (BRIDGE_COST, DESCRIPTION_MATCH, HOP_COST, AnswerGroup, RelationWords, answer_groups,
                              choose_answer, path_question, path_score, plain_sentence, relation_words,
                              usable_sentence, walk)
from kalmkg.qa.retrieve import Fact, Link, Path, retrieve

QUESTIONS = TESTS / "data" / "world_questions.jsonl"


def rel(label: str, description: str = "") -> RelationWords:
    return RelationWords(tuple(label.split()), tuple(description.split()))


def link(i: int, label: str) -> Link:
    return Link(i, f"k{i}", label, None, label.lower(), "exact", 1.0)


def fact(h, r, t) -> Fact:
    return Fact(h, r, t, f"e{h}", f"r{r}", f"e{t}", f"k{h}", f"r{r}", f"k{t}")


# ------------------------------------------------------------------------------------------- scoring
def test_a_question_word_counts_once_by_its_best_match():
    born = rel("born in", "the city where the subject person was born")
    assert path_score(["born", "city"], [born]) == (1.0 + DESCRIPTION_MATCH, 1.0 + DESCRIPTION_MATCH)
    assert path_score(["born", "born"], [born]) == (1.0, 1.0)
    assert path_score(["capital"], [born]) == (0.0, 0.0)


def test_a_second_hop_costs_and_must_explain_a_word_of_its_own():
    spouse, nationality = rel("spouse"), rel("nationality", "a country")
    covered, score = path_score(["nationality", "spouse"], [spouse, nationality])
    assert covered == 2.0 and score == pytest.approx(2.0 - HOP_COST)
    # the last relation explains only what the first already does: no answer
    leader, origin = rel("leader of", "a country"), rel("country of origin", "the country")
    assert path_score(["country", "lead"], [leader, origin])[1] == float("-inf")
    # a bridge that explains nothing of its own costs more
    capital = rel("capital of", "the country of which the city is the capital")
    covered, score = path_score(["capital", "country"], [nationality, capital])
    assert score == pytest.approx(covered - BRIDGE_COST)


def test_a_path_is_read_from_its_linked_entity():
    assert walk(Path((fact(1, 0, 2), fact(3, 1, 2))), {1}) == (1, [2, 3])
    assert walk(Path((fact(2, 0, 1),)), {1}) == (1, [2])
    assert walk(Path((fact(2, 0, 3),)), {1}) is None


def test_answer_groups_join_the_paths_of_one_relation_and_never_answer_a_named_entity():
    rels = {0: rel("founded by"), 1: rel("spouse")}
    paths = [Path((fact(1, 0, 2),)), Path((fact(1, 0, 3),)), Path((fact(1, 0, 4),)),
             Path((fact(1, 0, 2), fact(2, 1, 1)))]  # back to the named entity: not an answer
    groups = answer_groups(paths, {1, 4}, ["founded"], rels)
    assert [(g.relations, [a[0] for a in g.answers]) for g in groups] == [((0,), [2, 3])]


def test_the_children_of_an_entity_and_its_parents_are_not_one_answer():
    rels = {0: rel("child")}
    marie, irene, bronislawa = 1, 2, 3
    paths = [Path((Fact(marie, 0, irene, "Marie", "child", "Irene"),)),
             Path((Fact(bronislawa, 0, marie, "Bronislawa", "child", "Marie"),))]
    groups = answer_groups(paths, {marie}, ["child"], rels)
    assert sorted([a[2] for a in g.answers] for g in groups) == [["Bronislawa"], ["Irene"]]


def test_similarity_orders_groups_of_equal_coverage():
    class Embedder:  # "married" and "spouse" point one way, the rest another
        def encode(self, texts, batch_size=64):
            return np.array([[1.0, 0.0] if "married" in t or "spouse" in t else [0.0, 1.0] for t in texts],
                            dtype=np.float32)

    f1 = Fact(1, 0, 2, "Ann", "partner", "Bob")
    f2 = Fact(1, 1, 3, "Ann", "spouse", "Carl")
    rels = {0: rel("partner", "married person"), 1: rel("spouse", "married person")}
    plain = choose_answer("Who was Ann married to?", [link(1, "Ann")], [Path((f1,)), Path((f2,))], rels)
    assert plain.answers[0][2] == "Bob"  # equal coverage: retrieval's order
    chosen = choose_answer("Who was Ann married to?", [link(1, "Ann")], [Path((f1,)), Path((f2,))], rels,
                           embedder=Embedder())
    assert chosen.answers[0][2] == "Carl" and chosen.similarity is not None
    assert path_question(chosen) == "spouse of Ann"


def test_nothing_is_chosen_when_no_relation_is_asked_about():
    rels = {0: rel("born in", "the city")}
    assert choose_answer("What does Ann like?", [link(1, "Ann")], [Path((fact(1, 0, 2),))], rels) is None


# ------------------------------------------------------------------------------------------- the sentence
def group_of(*answers: str) -> AnswerGroup:
    paths = [Path((Fact(1, 0, 10 + i, "Apple", "founded by", a),)) for i, a in enumerate(answers)]
    return AnswerGroup(1, (0,), paths, [(10 + i, f"k{i}", a) for i, a in enumerate(answers)])


def test_a_group_is_cut_to_the_prompts_fact_budget():
    from kalmkg.qa.answer import within

    group = group_of("Steve Jobs", "Steve Wozniak", "Ronald Wayne")
    cut = within(group, 2)
    assert [a[2] for a in cut.answers] == ["Steve Jobs", "Steve Wozniak"] and len(cut.facts) == 2
    assert [a[2] for a in within(group, 0).answers] == ["Steve Jobs"]  # never less than one path
    assert within(group, 8).answers == group.answers


def test_the_plain_sentence_names_every_answer_and_cites_every_fact():
    assert plain_sentence(group_of("Steve Jobs", "Steve Wozniak", "Ronald Wayne")) == \
        "Steve Jobs, Steve Wozniak and Ronald Wayne [1][2][3]."


@pytest.mark.parametrize("text, others, expected", [
    ("Apple was founded by Steve Jobs and Steve Wozniak [1][2].", [], "same"),
    ("Steve Jobs and Steve Wozniak founded it.", [], "Steve Jobs and Steve Wozniak founded it [1][2]."),
    ("Steve Jobs founded Apple [1].", [], None),                                   # an answer missing
    ("Steve Jobs and Steve Wozniak, with Bill Gates [1][2].", ["Bill Gates"], None),  # another entity
    ("Steve Jobs and Steve Wozniak [1][2].", ["Steve"], "same"),    # a name inside an answer is no other entity
    ("", [], None),
    ("Steve Jobs and Steve Wozniak [1][2]. Steve Jobs and Steve Wozniak [1][2]. Bill Gates.", ["Bill Gates"],
     "Steve Jobs and Steve Wozniak [1][2]."),                      # cut after the sentence that answers
    ("Steve Jobs and " + "very " * 80 + "Steve Wozniak.", [], None),  # rambling
    ("Steve Jobs and Steve Wozniak did not found Apple.", [], None),  # a denial
    ("I don't know. Steve Jobs and Steve Wozniak.", [], None),
    ("Steve Jobs and Steve Wozniak, with Steven [1][2].", ["Steve"], "same"),
    ("Steve Jobs and Steve Wozniak, with Ste [1][2].", ["Ste"], None),  # "Ste" is not a word of an answer
])
def test_the_models_sentence_is_used_only_when_it_gives_the_answer(text, others, expected):
    group = group_of("Steve Jobs", "Steve Wozniak")
    assert usable_sentence(text, group, others) == (text if expected == "same" else expected)


# ------------------------------------------------------------------------------------------- the fixture
def test_the_sample_graph_fixture_is_answered_by_path_choice_alone(store):
    """Every answerable question of the fixture gets its expected entity from the graph, and every
    unanswerable one gets none (no link, or no path the question asks about). No model: words only."""
    relations = relation_words(store.relation_labels())
    wrong = []
    for row in load_questions(QUESTIONS):
        found = retrieve(store, row["question"])
        chosen = choose_answer(row["question"], found.links, found.paths, relations) if found.links else None
        names = ", ".join(label for _, _, label in chosen.answers) if chosen else ""
        if not (grade(names, row["answers"]) if row.get("answers") else chosen is None):
            wrong.append((row["id"], names))
    assert wrong == []


def test_a_two_hop_sentence_must_name_the_bridge():
    paths = [Path((Fact(1, 0, 2, "Marie Curie", "spouse", "Pierre Curie"),
                   Fact(2, 1, 3, "Pierre Curie", "nationality", "France")))]
    group = AnswerGroup(1, (0, 1), paths, [(3, "k3", "France")])
    assert usable_sentence("Marie Curie's spouse is France.", group, []) is None
    assert usable_sentence("Her husband Pierre Curie was a citizen of France.", group, []) == \
        "Her husband Pierre Curie was a citizen of France [1][2]."


def test_a_name_with_a_full_stop_does_not_end_the_sentence():
    paths = [Path((Fact(1, 0, 2, "Washington, D.C.", "capital of", "United States"),))]
    group = AnswerGroup(2, (0,), paths, [(1, "k1", "Washington, D.C.")])
    assert usable_sentence("Washington, D.C. is capital of United States [1].", group, ["Canada"]) == \
        "Washington, D.C. is capital of United States [1]."
    assert usable_sentence("Washington, D.C. is the capital. Canada is not.", group, ["Canada"]) == \
        "Washington, D.C. is the capital [1]."


def test_the_question_names_its_answers_type_and_relations_give_theirs():
    from kalmkg.qa.answer import answer_type, asked_type, type_fits

    assert asked_type("Which continent is Brazil part of?") == "continent"
    assert asked_type("In which city was Alan Turing born?") == "city"
    assert asked_type("What is the capital of France?") is None and asked_type("Who founded Apple?") is None
    located = rel("located in", "the country in which the subject city is located")
    assert answer_type(located, forward=True) == {"country"} and answer_type(located, forward=False) == {"city"}
    assert answer_type(rel("spouse"), forward=True) == set()  # no description: any type fits
    assert type_fits("country", located, True) and not type_fits("continent", located, False)
    assert type_fits(None, located, False) and type_fits("anything", rel("spouse"), True)


def test_a_path_ending_in_another_type_than_asked_loses(store):
    relations = relation_words(store.relation_labels())
    question = "Which continent is Germany located in?"
    found = retrieve(store, question)
    chosen = choose_answer(question, found.links, found.paths, relations)
    assert [label for _, _, label in chosen.answers] == ["Europe"]  # not the cities located in Germany
