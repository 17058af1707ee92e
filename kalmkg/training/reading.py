"""Fact-reading turns, for training: `kalmkg ask`'s own prompts (numbered facts, a question) written from
the train graph, answered with a sentence that gives the answer and cites its facts.

A base model handed the right facts still names the wrong entity or writes a sentence `ask` cannot use
(it misses the answer, names another entity, leaves out a 2-hop bridge). Three kinds of turns teach what
`ask` needs, in the exact chat `ask` sends (`kalmkg.prompts.build_messages`):

- **answer, one hop**: the facts of a train query and the answer the graph gave ("Answer: Paris"), as
  `ask` sends a chosen answer; the reply says it: "The capital of France is Paris [1]."
- **answer, two hops**: a path e -r1-> b -r2-> a asked as "What is the r2 of e's r1?", both facts given;
  the reply names the bridge: "The spouse of Marie Curie is Pierre Curie [1], and the nationality of
  Pierre Curie is France [2]."
- **read**: the query's facts among distractors (the entity's other facts first, as retrieval finds
  them, then any), shuffled, no answer given; the reply picks the right facts and cites them.

Everything is drawn from (seed, step, example) alone, so a resumed run writes what a straight run does.
Nothing here knows about tokenizers or models.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

from kalmkg.prompts import build_messages, fact_text, join_names
from kalmkg.training.questions import MAX_ANSWERS, QuestionQuery, QuestionWriter, label_kind, question_forms

N_FACTS = 8  # as many facts as `ask` gives by default (--max-facts)
KINDS = ("answer", "two-hop", "read")
KIND_SHARES = (0.4, 0.3, 0.3)


@dataclass(frozen=True)
class Said:
    """A fact as a prompt writes it (labels, stored direction)."""

    head: str
    relation: str
    tail: str

    def text(self) -> str:
        return fact_text(self.head, self.relation, self.tail)


def fact_sentence(head: str, label: str, tail: str) -> str:
    """A fact said as a sentence: "The currency of France is Euro", "Paris is capital of France",
    "Germany shares border with France"."""
    label = " ".join(label.split())
    kind = label_kind(label)
    if kind == "finite":
        return f"{head} {label} {tail}"
    if kind == "phrase":
        return f"{head} is {label} {tail}"
    return f"The {label} of {head} is {tail}"


def _cite(numbers: list[int]) -> str:
    return "".join(f"[{n}]" for n in sorted(numbers))


@dataclass(frozen=True)
class ReadingTurn:
    """One training turn: `ask`'s messages and the reply to learn."""

    kind: str
    messages: list[dict]
    reply: str


@dataclass
class ReadingWriter:
    """Writes reading turns from the train triples and the graph's labels."""

    questions: QuestionWriter
    train: np.ndarray  # [n, 3] train triples
    queries: list[QuestionQuery]  # the train queries (both directions) with at most MAX_ANSWERS answers

    @cached_property
    def _by_entity(self) -> tuple[np.ndarray, np.ndarray]:
        """Train triple indices grouped by entity (as head and as tail): (order, offsets)."""
        n = len(self.questions.entity_labels)
        ends = np.concatenate([self.train[:, 0], self.train[:, 2]])
        rows = np.concatenate([np.arange(len(self.train))] * 2)
        order = rows[np.argsort(ends, kind="stable")]
        offsets = np.concatenate([[0], np.cumsum(np.bincount(ends, minlength=n))])
        return order, offsets

    def touching(self, entity: int) -> np.ndarray:
        """Indices of the train triples `entity` is in."""
        order, offsets = self._by_entity
        return order[offsets[entity]:offsets[entity + 1]]

    def said(self, i: int) -> Said:
        h, r, t = self.train[i].tolist()
        e = self.questions.entity_labels
        return Said(e[h], self.questions.relation_labels[r], e[t])

    def _slot(self, query: QuestionQuery) -> tuple[int, bool]:
        """(relation, whether the query asks for its head)."""
        R = len(self.questions.relation_labels)
        return query.relation % R, query.relation >= R

    def _query_triples(self, query: QuestionQuery) -> list[int]:
        """The train triples that answer `query`, in its answers' order."""
        rel, inverse = self._slot(query)
        want = {(a, rel, query.entity) if inverse else (query.entity, rel, a) for a in query.answers}
        found = {tuple(self.train[i].tolist()): int(i) for i in self.touching(query.entity)}
        return [found[t] for t in sorted(want)]

    def _sentence(self, query: QuestionQuery) -> str:
        e = self.questions.entity_labels
        rel, inverse = self._slot(query)
        answers = join_names([e[a] for a in query.answers])
        head, tail = (answers, e[query.entity]) if inverse else (e[query.entity], answers)
        return fact_sentence(head, self.questions.relation_labels[rel], tail)

    def answer_turn(self, query: QuestionQuery, pick: int, rng: np.random.Generator) -> ReadingTurn:
        facts = [self.said(i) for i in rng.permutation(self._query_triples(query)).tolist()]
        question = self.questions.pair(query, pick)[0]
        answer = join_names([self.questions.entity_labels[a] for a in query.answers])
        reply = f"{self._sentence(query)} {_cite(list(range(1, len(facts) + 1)))}."
        return ReadingTurn("answer", build_messages(question, facts, answer=answer), reply)

    def read_turn(self, query: QuestionQuery, pick: int, rng: np.random.Generator) -> ReadingTurn:
        right = self._query_triples(query)
        rel, _ = self._slot(query)
        taken = set(right)

        def distractor(i: int) -> bool:
            # never the asked relation at the entity: it could be another true answer
            h, r, t = self.train[i].tolist()
            return i not in taken and not (r == rel and query.entity in (h, t))

        room = max(N_FACTS - len(right), 0)
        picked = [i for i in rng.permutation(self.touching(query.entity)).tolist() if distractor(i)][:room]
        taken.update(picked)
        for i in rng.integers(len(self.train), size=4 * room).tolist():
            if len(picked) >= room:
                break
            if distractor(i):
                picked.append(i)
                taken.add(i)
        order = rng.permutation(len(right) + len(picked)).tolist()
        rows = [(right + picked)[j] for j in order]
        cited = [n + 1 for n, i in enumerate(rows) if i in right]
        question = self.questions.pair(query, pick)[0]
        reply = f"{self._sentence(query)} {_cite(cited)}."
        return ReadingTurn("read", build_messages(question, [self.said(i) for i in rows]), reply)

    def two_hop_turn(self, rng: np.random.Generator, tries: int = 20) -> ReadingTurn | None:
        """A path e -r1-> b -r2-> a with r1 a noun ("spouse": "e's spouse"), a new far end and at most
        MAX_ANSWERS of them; None when `tries` draws find none."""
        labels, rel_labels = self.questions.entity_labels, self.questions.relation_labels
        for _ in range(tries):
            first = int(rng.integers(len(self.train)))
            e, r1, b = self.train[first].tolist()
            if label_kind(rel_labels[r1]) != "noun" or e == b:
                continue
            hops = [int(i) for i in self.touching(b) if i != first]
            if not hops:
                continue
            second = hops[int(rng.integers(len(hops)))]
            h2, r2, t2 = self.train[second].tolist()
            inverse = t2 == b and h2 != b  # walked from b backwards: (a, r2, b)
            same = [int(i) for i in hops if self.train[i, 1] == r2 and
                    (self.train[i, 2] == b if inverse else self.train[i, 0] == b)]
            far = [int(self.train[i, 0] if inverse else self.train[i, 2]) for i in same]
            if not 1 <= len(far) <= MAX_ANSWERS or e in far or b in far:
                continue
            asked = f"{labels[e]}'s {' '.join(rel_labels[r1].split())}"
            forms = question_forms(rel_labels[r2], self.questions.relation_descriptions[r2], asked, inverse)
            question = forms[int(rng.integers(len(forms)))]
            facts = [self.said(first)] + [self.said(i) for i in same]
            answer = join_names([labels[a] for a in far])
            head, tail = (answer, labels[b]) if inverse else (labels[b], answer)
            bridge = fact_sentence(labels[e], rel_labels[r1], labels[b])
            onward = fact_sentence(head, rel_labels[r2], tail)
            onward = onward[0].lower() + onward[1:] if onward.startswith("The ") else onward
            reply = f"{bridge} [1], and {onward} {_cite(list(range(2, len(facts) + 1)))}."
            return ReadingTurn("two-hop", build_messages(question, facts, answer=answer), reply)
        return None

    def turn(self, seed: int, step: int, j: int) -> ReadingTurn:
        """Example `j` of optimizer step `step`: its kind, query and draws from (seed, step, j) alone."""
        rng = np.random.default_rng([seed, step, 11, j])
        kind = KINDS[int(rng.choice(len(KINDS), p=KIND_SHARES))]
        if kind == "two-hop":
            found = self.two_hop_turn(rng)
            if found is not None:
                return found
            kind = "answer"
        query = self.queries[int(rng.integers(len(self.queries)))]
        pick = int(rng.integers(1 << 16))
        return (self.answer_turn if kind == "answer" else self.read_turn)(query, pick, rng)
