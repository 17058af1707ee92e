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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

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
    if not texts:
        return []
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for text, ids, offsets in zip(texts, enc["input_ids"], enc["offset_mapping"]):
        if len(ids) <= max_tokens:
            out.append(text)
            continue
        # A character split over several tokens keeps its full span: cut before it instead.
        end = offsets[max_tokens - 1][1] if offsets[max_tokens][0] >= offsets[max_tokens - 1][1] \
            else offsets[max_tokens][0]
        out.append(text[:end].rstrip())
    return out


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
