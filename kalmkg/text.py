"""Every text the model sees, built in one place from store rows.

Views (KaLM's dual view):
  head-relation view  `Complete the triple: [ <head text>, <relation text> ] =>`
  tail view           `{ <entity text> }`
  triple completion   head-relation view + ` ` + tail view + EOS, loss on the tail part only.

The completion target is the tail view itself, so the model learns to write entities in the form it
embeds them, and the head-relation view is a token-identical prefix of the completion sequence: one
causal forward pass gives both the hr embedding (at the prefix's last token) and the LM loss.
Both views end in a fixed token (`=>`, `}`) so last-token pooling reads a position the model can learn
to summarise into.

Names: `normalize` is how names are compared (linking, answer grading); its variants say in their
docstrings why they differ; `local_name` and `LOCAL_NAME_PATTERN` are the one definition of an IRI's
local name (the store's SQL is built from the same pattern).
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Protocol, Sequence
from urllib.parse import unquote

HR_TEMPLATE = "Complete the triple: [ {head}, {relation} ] =>"
TAIL_TEMPLATE = "{{ {entity} }}"
INVERSE_TEMPLATE = "inverse of {relation}"


class Tokenizer(Protocol):
    def __call__(self, texts, add_special_tokens: bool = ...) -> dict: ...
    def decode(self, ids, skip_special_tokens: bool = ...) -> str: ...


def entity_text(label: str, description: str | None) -> str:
    """"name, description" (the paper's entity text); just the name when there is no description."""
    description = (description or "").strip()
    return f"{label}, {description}" if description else label


def relation_text(label: str, inverse: bool = False) -> str:
    return INVERSE_TEMPLATE.format(relation=label) if inverse else label


def hr_view(head_text: str, relation_text_: str) -> str:
    return HR_TEMPLATE.format(head=head_text, relation=relation_text_)


def tail_view(entity_text_: str) -> str:
    return TAIL_TEMPLATE.format(entity=entity_text_)


def completion_target(entity_text_: str) -> str:
    """What follows the hr view in a triple-completion sequence (EOS is added by the tokenizing code)."""
    return " " + tail_view(entity_text_)


def truncate_texts(texts: Sequence[str], tokenizer: Tokenizer, max_tokens: int) -> list[str]:
    """Cut each text to `max_tokens` tokens (the paper's ~50-token entity text).

    The cut is made in the original string at the end of the last kept token (the tokenizer's
    character offsets), so a byte-level token that splits a multi-byte character never leaves a
    replacement character behind.
    """
    texts = list(texts)
    out = []
    # in chunks: the tokenizer's ids and offsets of a million descriptions at once take gigabytes
    for start in range(0, len(texts), TRUNCATE_CHUNK):
        part = texts[start:start + TRUNCATE_CHUNK]
        enc = tokenizer(part, add_special_tokens=False, return_offsets_mapping=True)
        for text, ids, offsets in zip(part, enc["input_ids"], enc["offset_mapping"]):
            if len(ids) <= max_tokens:
                out.append(text)
                continue
            # A character split over several tokens keeps its full span: cut before it instead.
            end = offsets[max_tokens - 1][1] if offsets[max_tokens][0] >= offsets[max_tokens - 1][1] \
                else offsets[max_tokens][0]
            out.append(text[:end].rstrip())
    return out


TRUNCATE_CHUNK = 16384


@dataclass
class GraphTexts:
    """Entity and relation texts by id, as the views use them (entity texts already cut)."""

    entities: list[str]
    relations: list[str]  # 2R: the R relations, then their inverses

    @property
    def num_relations(self) -> int:
        return len(self.relations) // 2


def store_entity_texts(entity_table) -> list[str]:
    """Per entity id, its text uncut, from the store's entity table (Arrow, ordered by id)."""
    return [entity_text(lbl, desc) for lbl, desc in
            zip(entity_table["label"].to_pylist(), entity_table["description"].to_pylist())]


def store_relation_texts(relation_table) -> list[str]:
    """Per relation id, its text: the R relations of the store's relation table, then their R inverses."""
    labels = relation_table["label"].to_pylist()
    return [relation_text(lb) for lb in labels] + [relation_text(lb, True) for lb in labels]


def graph_texts(entity_table, relation_table, tokenizer: Tokenizer, max_entity_tokens: int) -> GraphTexts:
    """The texts training and prediction use, from the store's tables: entity texts cut to
    `max_entity_tokens` tokens."""
    texts = store_entity_texts(entity_table)
    return GraphTexts(truncate_texts(texts, tokenizer, max_entity_tokens), store_relation_texts(relation_table))


# ------------------------------------------------------------------------------------------------ names
# How names are compared and what an IRI's local name is: one definition each, used by linking
# (qa/retrieve.py), name resolution (names.py), grading (evaluation/) and, through their SQL twins in
# store.py, by the store.

# An IRI's last segment (or a TSV id entire): what ingest makes a fallback label of. Python's `re` and
# DuckDB's RE2 read this pattern alike, so store.py builds its SQL from the same string.
LOCAL_NAME_PATTERN = r"([^/#:]+)[/#]*$"


def local_name(key: str) -> str:
    """An IRI's last segment, percent-decoded, '_' as spaces (what ingest makes a fallback label of)."""
    m = re.search(LOCAL_NAME_PATTERN, key)
    name = _percent_decoded(m.group(1)).replace("_", " ").strip() if m else ""
    return name or key


def _percent_decoded(name: str) -> str:
    """`Caf%C3%A9` -> `Café`; a name whose escapes are no UTF-8 (`%AA`) as written."""
    try:
        return unquote(name, errors="strict")
    except UnicodeDecodeError:
        return name


def strip_accents(text: str) -> str:
    """`Brasília` -> `Brasilia`: compatibility decomposition, combining marks dropped (any script)."""
    return "".join(ch for ch in unicodedata.normalize("NFKD", text) if not unicodedata.combining(ch))


def normalize(text: str) -> str:
    """Lower case, accents and punctuation removed, single spaces: how names are compared (any script)."""
    return " ".join(re.sub(r"[\W_]+", " ", strip_accents(text).lower()).split())


def normalize_label(text: str) -> str:
    """`normalize`, and a leading article dropped: a generated answer ("the Eiffel Tower") is graded
    against an entity's label ("Eiffel Tower"), which never carries the article."""
    return re.sub(r"^(the|a|an) ", "", normalize(text))


def normalize_typed_name(text: str) -> str:
    """Lower case, '_' as spaces, single spaces; accents and punctuation kept. A name typed on the
    command line resolves by the rule `Store.find_entities` applies to entities in SQL (`lower`, '_' as
    ' '), so an entity and a relation name are matched alike, and punctuation that tells two relations
    apart in a graph still does."""
    return " ".join(text.replace("_", " ").lower().split())


def normalize_sentence(text: str) -> str:
    """Lower case, a typographic apostrophe as ', single spaces; punctuation kept: phrases such as
    "don't know" are read with their apostrophes, which `normalize` would turn into spaces."""
    return " ".join(text.lower().replace("’", "'").split())
