"""Which relation a question asks, read by the language model when the question's words name none: "What
money do people use in India?" asks `currency`, "Who started Tesla?" `founded by`, "Albert Einstein's
hometown" `born in`. Word matching (`qa.answer`) cannot see these; the model that answers can.

**Noisy-channel scoring.** Every slot the linked entity could fill is a candidate: a relation walked from
the entity forwards (ENTITY relation ?) or backwards (? relation ENTITY), when the entity has facts of it or
when the relations it has are those the relation's heads (tails) have (`prediction.slot_fit`). For each
slot the graph's own question forms (`training.questions.question_forms`: "What is the currency of
India?", "What is India's currency?", ...) are written about the entity, and the model scores the user's
question as a rewording of each: the mean log-probability of the question's tokens after "Question: FORM
\\nThe same question in other words:", the best form per slot. The scored text is the user's question for
every slot, so slots compare without the prior that makes short or common labels win when the model
writes the label itself (the channel direction of Min et al., 2022, "Noisy Channel Language Model
Prompting for Few-Shot Text Classification").

**The decision.** The best slot is the question's. When the entity has facts of it, they answer; when it has
none, the graph does not know ("Who is Nelson Mandela's wife?": `spouse` wins, Mandela has no spouse in
the graph) and `ask` says so, or lets the link predictor answer that slot. A slot whose answers have
another type than the question names ("Which continent ...") is no candidate.

Measured on the sample graph's 48 fixture questions that name one entity (one-hop and unanswerable), the
untrained embedded model: the right slot for 46 (first form only: 41).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol, Sequence

import numpy as np

from kalmkg.prediction import slot_fit
from kalmkg.qa.answer import (
    LABEL_MATCH,
    AnswerGroup,
    RelationWords,
    answer_groups,
    answer_type,
    asked_type,
    relation_words,
    type_fits,
    word_matches,
)
from kalmkg.qa.retrieve import STOPWORDS, Link, Path, same_word, words
from kalmkg.training.questions import question_forms

FIT_MIN = 0.5      # an entity with no fact of a slot is a candidate when it fits this well (a share, 0-1)
# slots without facts are weighed (three scans of the triples each) only for graphs with at most this
# many relations; above, only the entity's own slots are candidates (an "I don't know" then rests on
# the words alone)
MAX_FIT_RELATIONS = 64
MAX_SLOTS = 24     # candidates per question, the entity's own slots first (each costs ~3 scored rows)
PROMPT = "Question: {form}\nThe same question in other words:"
# "Where is SAP from?" asks something although every word is a stopword; "Who is Marie Curie?" does not
_ASKING = frozenset({"where", "when", "which", "whom", "whose", "how"})


class Scorer(Protocol):
    """`kalmkg.llamacpp.likelihood.LikelihoodScorer`, or a fake in tests."""

    def mean_logprobs(self, prefixes: Sequence[str], target: str) -> list[float]: ...


@dataclass(frozen=True)
class Slot:
    """A relation walked from a linked entity: what a question may ask of it."""

    entity: Link
    relation: int
    forward: bool  # ENTITY relation ? (the entity is the head); False: ? relation ENTITY
    present: bool  # the graph has facts of it
    relation_label: str = ""
    fit: float = 1.0  # how well the entity fits the slot when it has no fact of it
    score: float = float("-inf")  # the question's mean log-probability as a rewording of the slot's best form
    form: str = ""  # that form


def asks_something(question: str, links: Sequence[Link]) -> bool:
    """Whether the question asks more than who or what the entity is: a content word besides the entity's
    name, or a question word such as "where"."""
    named = {w for lk in links for w in lk.mention.split()}
    tokens = [w for w in words(question) if w not in named]
    return any(w not in STOPWORDS or w in _ASKING for w in tokens)


def names_a_relation(question_words: Sequence[str], relations: Mapping[int, RelationWords]) -> bool:
    """Whether a word of the question is in a relation's label: then the words decide ("Who is the spouse
    of Angela Merkel?" asks `spouse`, which the graph lacks for her; no reading makes it another)."""
    return any(LABEL_MATCH in word_matches(question_words, r).values() for r in relations.values())


def candidate_slots(triples: np.ndarray, links: Sequence[Link], relations: Mapping[int, RelationWords],
                    asked: str | None = None) -> list[Slot]:
    """The slots the linked entities could fill, the ones with facts first, then by fit; at most MAX_SLOTS."""
    out: list[Slot] = []
    weigh_absent = len(relations) <= MAX_FIT_RELATIONS
    for link in links:
        heads = set(triples[triples[:, 0] == link.id, 1].tolist())
        tails = set(triples[triples[:, 2] == link.id, 1].tolist())
        for rid in sorted(relations):
            fit = None
            for forward, has in ((True, rid in heads), (False, rid in tails)):
                if not type_fits(asked, relations[rid], forward):
                    continue
                if has:
                    out.append(Slot(link, rid, forward, True))
                    continue
                if not weigh_absent:
                    continue
                fit = slot_fit(triples, link.id, rid) if fit is None else fit
                share = 0.0 if fit is None else fit["tail" if forward else "head"]
                if share >= FIT_MIN:
                    out.append(Slot(link, rid, forward, False, fit=share))
    out.sort(key=lambda s: (not s.present, -s.fit))
    return out[:MAX_SLOTS]


def known_type(asked: str | None, relations: Mapping[int, RelationWords]) -> str | None:
    """The type a question names when the graph's descriptions know it as one ("Which continent ..."); None
    for a word they do not ("What money ...": the model reads that one)."""
    types = {w for r in relations.values() for forward in (True, False) for w in answer_type(r, forward)}
    return asked if asked is not None and any(same_word(asked, w) for w in types) else None


def slot_forms(slot: Slot, labels: Mapping[int, tuple[str, str | None]]) -> list[str]:
    """The graph's question forms of a slot about its entity (`labels`: id -> (label, description))."""
    label, description = labels[slot.relation]
    return question_forms(label, description, slot.entity.label, inverse=not slot.forward)


def score_slots(question: str, slots: Sequence[Slot], labels: Mapping[int, tuple[str, str | None]],
                scorer: Scorer) -> list[Slot]:
    """The slots with their scores, best first: each its best form's mean log-probability of `question`."""
    forms = [slot_forms(s, labels) for s in slots]
    prompts = [PROMPT.format(form=f) for fs in forms for f in fs]
    if not prompts:
        return []
    scores = iter(scorer.mean_logprobs(prompts, " " + question))
    out = []
    for slot, fs in zip(slots, forms):
        scored = [(next(scores), f) for f in fs]
        best, form = max(scored) if scored else (float("-inf"), "")
        out.append(Slot(slot.entity, slot.relation, slot.forward, slot.present, labels[slot.relation][0], slot.fit,
                        best, form))
    return sorted(out, key=lambda s: -s.score)


def read_slot(question: str, links: Sequence[Link], triples: np.ndarray,
              rows: Sequence[tuple[int, str, str | None]], scorer: Scorer) -> Slot | None:
    """The slot the question asks, or None when the linked entities have no candidate slot (`rows`:
    `Store.relation_labels()`)."""
    relations = relation_words(rows)
    slots = candidate_slots(triples, links, relations, known_type(asked_type(question), relations))
    ranked = score_slots(question, slots, {rid: (label, d) for rid, label, d in rows}, scorer)
    return ranked[0] if ranked else None


def slot_group(slot: Slot, paths: Sequence[Path], linked: set[int],
               relations: Mapping[int, RelationWords]) -> AnswerGroup | None:
    """The one-hop answer group of a slot the graph has facts of (None: retrieval did not reach them, or
    their far ends are entities the question names)."""
    for g in answer_groups([p for p in paths if p.hops == 1], linked, [], relations):
        if (g.start, g.relations, g.ways) == (slot.entity.id, (slot.relation,), (slot.forward,)):
            g.score, g.chosen_by = slot.score, "model"
            return g
    return None
