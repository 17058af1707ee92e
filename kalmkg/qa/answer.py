"""The answer chosen from the graph: of every 1- and 2-hop path retrieval found from the entities a question
names, the one whose relations the question asks about; its far entity is the answer.

A language model of 135M parameters given the right facts still names the wrong entity ("Marie Curie's
spouse is Poland"), so the entity is chosen here and the model only writes the sentence around it
(`ask` checks that sentence and falls back to a plain one).

Scoring, pure and testable without a model:
- **Coverage.** Each content word of the question (the words naming the linked entities left out) counts
  once, by its best match among the path's relations: 1.0 in a relation's label, 0.3 in its description
  (descriptions name the answer's type: "The city where the subject person was born"). A path is as good
  as the question words it explains, so "the nationality of Marie Curie's spouse" prefers
  spouse -> nationality (2 words) to nationality alone (1 word).
- **The last relation must be asked about**: in a 2-hop path it explains a question word the bridge does
  not, or the path is no answer ("Which country did Angela Merkel lead?" must not walk on from Germany
  through `country of origin` because "country" is in that label). A hop costs HOP_COST, and a bridge
  that explains nothing of its own costs BRIDGE_COST ("the capital of the country Angela Merkel led":
  through `nationality` to Germany, then `capital of`).
- **Similarity breaks ties**, when an embedder is given: the question against a templated question of the
  path ("nationality of spouse of Marie Curie"), standardised over the paths compared.
- Paths with the same start and the same relations, walked in the same directions, are one **answer
  group** (several founders): all their far entities are the answer.
- **The answer's type must fit** a question that names it ("Which continent ...", "In which city ..."):
  a relation's description names its head's type after "subject" and its tail's type before it ("The
  city where the subject person was born"), so a path whose last hop, in the direction walked, ends in
  another type costs TYPE_MISMATCH.
- The far entity must be new: never an entity the question names, never the path's start or bridge.
- Below MIN_SCORE nothing is chosen: no relation of the graph is asked about, and `ask` says so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from kalmkg.encode import Encoder
from kalmkg.prompts import join_names
from kalmkg.qa.retrieve import STOPWORDS, Fact, Link, Path, content_words, far_end, same_word, select_facts, standardize, words
from kalmkg.text import normalize

LABEL_MATCH = 1.0        # a question word in a relation's label
DESCRIPTION_MATCH = 0.3  # ... in its description only
HOP_COST = 0.15          # what a second hop must earn to beat one
BRIDGE_COST = 0.5        # ... when its bridge relation explains no question word of its own
TYPE_MISMATCH = 1.0      # "Which continent ...?" answered by a relation whose answers are cities
MIN_SCORE = 0.3          # at least one description word: below, the graph does not answer the question
SIMILARITY_WEIGHT = 0.1  # standardised similarity: orders paths of equal coverage, rarely more
SIMILARITY_PATHS = 24    # answer groups embedded per question (llama.cpp on a CPU: ~25 ms each)
MAX_SENTENCE = 300       # characters: a longer "sentence" is the model rambling
# a sentence that denies or doubts is not the chosen answer said ("Paris is not the capital of France")
_DENIES = re.compile(r"\b(not|no|never|none|neither|nor|unknown|cannot)\b|n't\b|don'?t know")


@dataclass(frozen=True)
class RelationWords:
    """A relation's label and description as words (from `Store.relation_labels`)."""

    label: tuple[str, ...]
    description: tuple[str, ...]


@dataclass
class AnswerGroup:
    """Paths with one start and one relation sequence, and the entities they end at."""

    start: int
    relations: tuple[int, ...]
    paths: list[Path] = field(default_factory=list)
    answers: list[tuple[int, str, str]] = field(default_factory=list)  # (id, key, label), in path order
    ways: tuple[bool, ...] = ()  # per hop: walked from head to tail
    coverage: float = 0.0  # the question words the relations explain
    lexical: float = 0.0  # coverage less the hops' cost
    similarity: float | None = None
    score: float = 0.0
    chosen_by: str = "words"  # the question's words matched the relations, or "model": the model read it

    @property
    def hops(self) -> int:
        return len(self.relations)

    @property
    def start_label(self) -> str:
        first = self.paths[0].facts[0]
        return first.head_label if first.head == self.start else first.tail_label

    @property
    def facts(self) -> list[Fact]:
        """Every fact of the group's paths, each once (a symmetric pair such as two `spouse` edges counts
        once), a bridge before its second hop: retrieval's `select_facts` with room for all of them."""
        return select_facts(self.paths, max_facts=2 * len(self.paths))


def within(group: AnswerGroup, max_facts: int) -> AnswerGroup:
    """The group cut to its first paths whose facts fit in `max_facts` (the prompt's budget), with the
    answers those paths reach; at least one path."""
    kept: list[Path] = []
    for p in group.paths:
        if kept and len(AnswerGroup(group.start, group.relations, kept + [p]).facts) > max_facts:
            break
        kept.append(p)
    reached = {walk(p, {group.start})[1][-1] for p in kept}
    answers = [a for a in group.answers if a[0] in reached]
    return AnswerGroup(group.start, group.relations, kept, answers, group.ways, group.coverage, group.lexical,
                       group.similarity, group.score, group.chosen_by)


def relation_words(rows: Sequence[tuple[int, str, str | None]]) -> dict[int, RelationWords]:
    """By relation id, from `Store.relation_labels()` rows (id, label, description)."""
    return {rid: RelationWords(tuple(words(label)), tuple(words(description or ""))) for rid, label, description
            in rows}


def word_matches(question_words: Sequence[str], relation: RelationWords) -> dict[str, float]:
    """The question words a relation explains, each with its match (label or description)."""
    out = {}
    for q in dict.fromkeys(question_words):
        if any(same_word(q, w) for w in relation.label):
            out[q] = LABEL_MATCH
        elif any(same_word(q, w) for w in relation.description):
            out[q] = DESCRIPTION_MATCH
    return out


def path_score(question_words: Sequence[str], relations: Sequence[RelationWords]) -> tuple[float, float]:
    """(coverage, score) of a path's relations: each question word counts once, by its best match; the
    score is the coverage less the cost of the hops beyond the first (-inf: the last relation explains
    nothing the others do not)."""
    matches = [word_matches(question_words, r) for r in relations]
    best: dict[str, float] = {}
    for m in matches:
        for q, value in m.items():
            best[q] = max(best.get(q, 0.0), value)
    covered = sum(best.values())
    if len(relations) == 1:
        return covered, covered
    own = [set(m) - set().union(*(o for j, o in enumerate(matches) if j != i)) for i, m in enumerate(matches)]
    if not own[-1]:
        return covered, float("-inf")
    return covered, covered - (HOP_COST if all(own) else BRIDGE_COST) * (len(relations) - 1)


def walk(path: Path, linked: set[int]) -> tuple[int, list[int]] | None:
    """(start, [entities reached, in order]) of a path read from its linked entity; None when it cannot be
    read that way (its first fact touches no linked entity)."""
    first = path.facts[0]
    start = first.head if first.head in linked else first.tail if first.tail in linked else None
    if start is None:
        return None
    reached, at = [], start
    for f in path.facts:
        if at not in (f.head, f.tail):
            return None
        at = far_end(f, at)
        reached.append(at)
    return start, reached


def asked_type(question: str) -> str | None:
    """The word a question names its answer's type with: "continent" in "Which continent is Brazil part
    of?", "city" in "In which city ..."; None for "What is ...", "Who ...", "Where ..."."""
    tokens = words(question)
    for i, w in enumerate(tokens[:-1]):
        if w in ("which", "what"):
            return tokens[i + 1] if tokens[i + 1] not in STOPWORDS else None
    return None


def answer_type(relation: RelationWords, forward: bool) -> set[str]:
    """The words a relation's description gives the type of its tail (forward) or head with; empty when
    the description does not say ("subject" marks the head)."""
    d = relation.description
    if "subject" not in d:
        return set()
    at = d.index("subject")
    if forward:
        return {w for w in d[:at] if w not in STOPWORDS}
    return {d[at + 1]} if at + 1 < len(d) else set()


def type_fits(asked: str | None, relation: RelationWords, forward: bool) -> bool:
    types = answer_type(relation, forward)
    return asked is None or not types or any(same_word(asked, w) for w in types)


def answer_groups(paths: Sequence[Path], linked: set[int], question_words: Sequence[str],
                  relations: Mapping[int, RelationWords], asked: str | None = None) -> list[AnswerGroup]:
    """Every path whose far entity is new, grouped by (start, relations, the direction of each hop), scored
    by coverage less hop cost."""
    groups: dict[tuple[int, tuple[int, ...], tuple[bool, ...]], AnswerGroup] = {}
    for p in paths:
        read = walk(p, linked)
        if read is None:
            continue
        start, reached = read
        answer = reached[-1]
        if answer in linked or answer == start or answer in reached[:-1]:
            continue
        rels = tuple(f.relation for f in p.facts)
        # each hop's direction too: the children of X and the parents of X are not one answer
        ways = tuple(f.head == at for f, at in zip(p.facts, [start] + reached[:-1]))
        group = groups.setdefault((start, rels, ways), AnswerGroup(start, rels, ways=ways))
        group.paths.append(p)
        last = p.facts[-1]
        entry = (last.tail, last.tail_key, last.tail_label) if last.tail == answer else \
            (last.head, last.head_key, last.head_label)
        if entry not in group.answers:
            group.answers.append(entry)
    empty = RelationWords((), ())
    for g in groups.values():
        g.coverage, g.lexical = path_score(question_words, [relations.get(r, empty) for r in g.relations])
        if not type_fits(asked, relations.get(g.relations[-1], empty), g.ways[-1]):
            g.lexical -= TYPE_MISMATCH
        g.score = g.lexical
    return sorted(groups.values(), key=_order)


def path_question(group: AnswerGroup) -> str:
    """The question a group answers, written from its relations: "nationality of spouse of Marie Curie"."""
    p = group.paths[0]
    label = {f.head: f.head_label for f in p.facts} | {f.tail: f.tail_label for f in p.facts}
    text = label[group.start]
    for f in p.facts:  # "capital of" + "France" -> "capital of France", not "capital of of France"
        text = f"{f.relation_label} {text}" if f.relation_label.endswith(" of") else f"{f.relation_label} of {text}"
    return text


def add_similarity(groups: list[AnswerGroup], question: str, embedder: Encoder) -> list[AnswerGroup]:
    """Re-score the best SIMILARITY_PATHS groups with the question's similarity to their path question."""
    top = groups[:SIMILARITY_PATHS]
    if len(top) < 2:
        return groups
    vecs = np.asarray(embedder.encode([question] + [path_question(g) for g in top]), dtype=np.float64)
    vecs /= np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
    sims = vecs[1:] @ vecs[0]
    for g, s, z in zip(top, sims, standardize(sims)):
        g.similarity = float(s)
        g.score = g.lexical + SIMILARITY_WEIGHT * float(z)
    return sorted(top, key=_order) + groups[SIMILARITY_PATHS:]


def asked_words(question: str, links: Sequence[Link]) -> list[str]:
    """The question's content words less those naming its linked entities: what it asks about them."""
    named = {w for lk in links for w in lk.mention.split()}
    return [w for w in content_words(question) if w not in named]


def choose_answer(question: str, links: Sequence[Link], paths: Sequence[Path],
                  relations: Mapping[int, RelationWords], embedder: Encoder | None = None) -> AnswerGroup | None:
    """The best answer group, or None when no path explains enough of the question (MIN_SCORE)."""
    linked = {lk.id for lk in links}
    groups = answer_groups(paths, linked, asked_words(question, links), relations, asked_type(question))
    groups = [g for g in groups if g.coverage >= MIN_SCORE and g.lexical > float("-inf")]
    if embedder is not None and groups:
        groups = add_similarity(groups, question, embedder)
    return groups[0] if groups else None


def _order(g: AnswerGroup) -> tuple:
    # best score, then fewer hops, then the path retrieval ranked higher
    return (-round(g.score, 9), g.hops, -max(p.score for p in g.paths))


# ------------------------------------------------------------------------------------------- the sentence


def citations(group: AnswerGroup) -> str:
    """[1][2]...: every fact of the group, numbered as the prompt numbers them."""
    return "".join(f"[{i + 1}]" for i in range(len(group.facts)))


def answer_names(group: AnswerGroup) -> str:
    """"A", "A and B", "A, B and C"."""
    return join_names([label for _, _, label in group.answers])


def plain_sentence(group: AnswerGroup) -> str:
    """The answer when the model's sentence cannot be used: the names and their citations."""
    return f"{answer_names(group)} {citations(group)}."


def usable_sentence(text: str, group: AnswerGroup, others: Sequence[str]) -> str | None:
    """The model's sentence, cut after the sentence that completes the answer and given citations when it
    has none; None when it misses an answer, names one of `others` (entities of the graph the answer is
    not), leaves out the bridge of a 2-hop answer, or runs long."""
    # a sentence ends at . ! ? before a word that does not go on in lower case ("Washington, D.C. is ...")
    sentences = [s for s in re.split(r"(?<=[.!?])\s+(?![a-z])|\n+", text.strip()) if s.strip()]
    names = [label for _, _, label in group.answers]
    kept = ""
    for s in sentences:
        kept = f"{kept} {s}".strip()
        if all(_says(kept, n) for n in names):
            break
    else:
        return None
    if len(kept) > MAX_SENTENCE or _DENIES.search(kept.lower().replace("’", "'")):
        return None
    if any(_says(kept, o) for o in others if not any(_says(n, o) for n in names)):
        return None
    if group.hops == 2 and not any(_says(kept, b) for b in _bridges(group)):
        return None
    return kept if "[" in kept else f"{kept.rstrip('.')} {citations(group)}."


def _says(text: str, name: str) -> bool:
    """Whether `name` is in `text` as whole words (case, accents and punctuation ignored)."""
    name = normalize(name)
    return bool(name) and f" {name} " in f" {normalize(text)} "


def _bridges(group: AnswerGroup) -> list[str]:
    """The labels of the entities a 2-hop group passes through."""
    out = []
    for p in group.paths:
        f = p.facts[0]
        out.append(f.tail_label if f.head == group.start else f.head_label)
    return out
