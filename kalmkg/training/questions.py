"""Questions written from the graph itself, for training: every relation asked in both directions, in the
forms people ask (what/who/which, possessives, the relation's label and its description's words).

`kalmkg ask --no-context` asks the model alone; a model trained only on triple completions has never
seen a question. These forms turn each train (entity, relation) query into questions whose answers are
its known answers, so the LM loss can teach the chat format `ask` uses. They are templates over the
graph's labels and descriptions, never the question fixtures (which stay held out).

A relation's description, when it has one, says what its head and tail are ("The city where the
subject person was born": a person's birthplace is a city): "subject" marks the head's type, the noun
before the first linking word the tail's. Labels ending in a preposition ("capital of", "born in",
"founded by") read as verbs ("Which city is capital of France?"), others as nouns ("What is the
currency of France?", "Which country has the euro as its currency?").
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from kalmkg.evaluation.metrics import known_answers
from kalmkg.prompts import join_names

_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")
_LINKING = {"of", "in", "where", "which", "who", "whom", "with", "to", "by", "that", "from", "for", "on", "at",
            "whose"}
_ARTICLES = {"a", "an", "the"}
_PREPOSITION_END = {"of", "in", "by", "to", "from", "with", "at", "on", "for"}
_PEOPLE = {"person", "people", "human", "man", "woman", "author", "artist", "scientist"}


@dataclass(frozen=True)
class RelationTypes:
    """What a relation's head and tail are, as its description names them (None: it does not say)."""

    head: str | None
    tail: str | None


def relation_types(description: str | None) -> RelationTypes:
    """The head's type (the word after "subject") and the tail's (the noun before the first linking word)."""
    words = _WORD.findall((description or "").lower())
    if "subject" not in words:
        return RelationTypes(None, None)
    at = words.index("subject")
    head = words[at + 1] if at + 1 < len(words) else None
    lead = []
    for w in words[:at]:
        if w in _LINKING or (lead and w.endswith("ed")):  # "The official currency used in ...": currency
            break
        lead.append(w)
    lead = [w for w in lead if w not in _ARTICLES]
    return RelationTypes(head, lead[-1] if lead else None)


def _wh(kind: str | None) -> str:
    return "Who" if kind in _PEOPLE else "What"


def _description_question(description: str | None, entity: str) -> str | None:
    """"The city where the subject person was born." about Marie Curie -> "What is the city where Marie
    Curie was born?" (tail questions only: the description describes the tail)."""
    text = " ".join((description or "").split()).rstrip(". ")
    m = re.search(r"\bthe subject(?: \w+)?\b", text)
    if not text or m is None:
        return None
    said = text[:m.start()] + entity + text[m.end():]
    return f"{_wh(relation_types(description).tail)} is {said[0].lower()}{said[1:]}?"


def label_kind(label: str) -> str:
    """How a relation's label reads: "finite" ("shares border with": a verb of its own), "phrase" ("born
    in", "capital of": read with "is") or "noun" ("currency", "spouse")."""
    words = label.lower().split()
    if not words or words[-1] not in _PREPOSITION_END:
        return "noun"
    return "finite" if len(words) > 1 and words[0].endswith("s") and not words[0].endswith("ss") else "phrase"


def question_forms(label: str, description: str | None, entity: str, inverse: bool) -> list[str]:
    """Questions asking for the tail of (entity, label) or, `inverse`, for the head of (?, label, entity);
    distinct, in a fixed order."""
    types = relation_types(description)
    label = " ".join(label.split())
    words = label.lower().split()
    reading = label_kind(label)
    phrase, finite = reading != "noun", reading == "finite"
    kind = types.tail if not inverse else types.head
    kind = kind if kind and kind not in words else None  # "Which currency is the currency of X?" says nothing
    wh = _wh(types.tail if not inverse else types.head)
    forms: list[str] = []
    if not inverse:
        if finite:
            forms += [f"{entity} {label} what?", f"{wh} does {entity} {words[0][:-1]} {' '.join(words[1:])}?"]
        elif phrase:
            forms += [f"{wh} is {entity} {label}?", f"{entity} is {label} what?"]
            forms += [f"Which {kind} is {entity} {label}?"] if kind else []
        else:
            forms += [f"{wh} is the {label} of {entity}?", f"{wh} is {entity}'s {label}?", f"{entity}'s {label}?"]
            forms += [f"Which {kind} is the {label} of {entity}?"] if kind else []
        described = _description_question(description, entity)
        forms += [described] if described else []
    else:
        if finite or phrase:
            verb = label if finite else f"is {label}"
            forms += [f"{wh} {verb} {entity}?"] + ([f"Which {kind} {verb} {entity}?"] if kind else [])
        else:
            whom = "whom" if types.head in _PEOPLE else "what"
            forms += [f"Whose {label} is {entity}?", f"{entity} is the {label} of {whom}?"]
            if kind:
                its = "their" if kind in _PEOPLE else "its"
                forms += [f"Which {kind} has {entity} as {its} {label}?", f"Of which {kind} is {entity} the {label}?"]
    return list(dict.fromkeys(forms))


def answer_text(labels: list[str]) -> str:
    """The reply a question is trained to get: "Paris.", "Steve Jobs, Steve Wozniak and Ronald Wayne."."""
    return join_names(labels).rstrip(".") + "."


MAX_ANSWERS = 5  # a query with more answers ("Which country is member of the EU?") makes a list, not a reply


@dataclass(frozen=True)
class QuestionQuery:
    """A train query asked as a question: (entity, relation; >= R: the inverse) and its known answers."""

    entity: int
    relation: int
    answers: tuple[int, ...]


def question_queries(train: np.ndarray, num_relations: int) -> list[QuestionQuery]:
    """Every (entity, relation) query of the train triples, both directions, with at most MAX_ANSWERS
    answers, in a stable order."""
    return [QuestionQuery(q, r, tuple(sorted(a))) for (q, r), a in sorted(known_answers(train, num_relations).items())
            if len(a) <= MAX_ANSWERS]


@dataclass(frozen=True)
class QuestionWriter:
    """Writes a query's questions from the graph's labels and descriptions."""

    entity_labels: list[str]
    relation_labels: list[str]  # the R relations (not their inverses)
    relation_descriptions: list[str | None]

    @classmethod
    def from_tables(cls, entity_labels: list[str], relations) -> "QuestionWriter":
        """From the entities' labels and the store's relation table (its label and description columns)."""
        return cls(entity_labels, relations["label"].to_pylist(), relations["description"].to_pylist())

    def forms(self, query: QuestionQuery) -> list[str]:
        R = len(self.relation_labels)
        rel, inverse = query.relation % R, query.relation >= R
        return question_forms(self.relation_labels[rel], self.relation_descriptions[rel],
                              self.entity_labels[query.entity], inverse)

    def pair(self, query: QuestionQuery, pick: int) -> tuple[str, str]:
        """(question, reply): the query's `pick`-th form (modulo their number) and its answers."""
        forms = self.forms(query)
        return forms[pick % len(forms)], answer_text([self.entity_labels[a] for a in query.answers])


def sample_questions(n_queries: int, k: int, seed: int, step: int) -> list[tuple[int, int]]:
    """(query index, form pick) for the `k` question examples of optimizer step `step`: drawn from
    (seed, step) alone, so a resumed run draws what a straight run draws."""
    if n_queries == 0 or k <= 0:
        return []
    rng = np.random.default_rng([seed, step, 7])
    return list(zip(rng.integers(n_queries, size=k).tolist(), rng.integers(1 << 16, size=k).tolist()))
