"""Question -> the graph facts that answer it: entity linking, a 1-2 hop neighbourhood, relevance ranking.

Three steps, each testable on its own:

1. **Link** the entities a question mentions: word n-grams of the question are matched against entity labels
   and IRI local names in DuckDB (case-, accent- and punctuation-insensitive, longest match first); the
   words left over are matched fuzzily (Jaro-Winkler) so a typo still links, and capitalised words left
   after that may name an entity by the first or last words of its label ("Apple" for "Apple Inc.",
   "Einstein" for "Albert Einstein"). A name several entities share
   is disambiguated by embedding similarity of the question with each candidate's text (the same GGUF that
   answers), when an embedder is given.
2. **Collect** candidate facts: every triple touching a linked entity (hop 1) and, through the neighbours of
   the most relevant hop-1 facts, the triples touching those (hop 2). A hop-2 fact is kept as a *path*
   with the hop-1 fact that bridges to it, so a prompt never gets a second hop without its first.
3. **Rank** paths by relevance to the question. Every relation gets a score: word overlap of the question
   with its label (strong) and description (weak) plus embedding similarity of the question with the
   label; that score also decides which facts of a hub entity are read at all. A fact adds the far
   entity's name; the best few are then re-ranked by embedding similarity of the question with the
   fact's text. Scoring functions are pure; embeddings come from the same GGUF that answers.

Nothing here imports torch: `kalmkg ask` runs on DuckDB and llama.cpp only.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from kalmkg.encode import Encoder
from kalmkg.errors import KalmkgError
from kalmkg.prompts import fact_text
from kalmkg.text import entity_text, normalize, strip_accents

# Words that carry no meaning for matching relations or names (question words, auxiliaries, articles).
STOPWORDS = frozenset("""
a an the of in on at to for from by with as and or is are was were be been being do does did has have had
what which who whom whose where when why how that this these those it its there their they them he she his
her him i me my you your we our us s about into than then also any some all can could would should will
shall may might must not no yes name tell give list much many one ones ever
""".split())

MAX_NGRAM = 8          # longest entity name (in words) looked for in a question
FUZZY_MIN = 0.92       # Jaro-Winkler similarity for a fuzzy name match
FUZZY_MIN_CHARS = 5    # shorter spans are never matched fuzzily (too many false friends)
AMBIGUOUS_KEEP = 3     # candidates kept for a name several entities share, without an embedder
MAX_CANDIDATES = 20    # entities looked at per name (a name many entities share is settled among these)
HOP1_CAP = 1000        # hop-1 triples read per linked entity, most relevant relations first (hubs)
HOP2_FANOUT = 100      # hop-2 triples read per bridge entity, likewise
RELATION_EMBED_MAX = 256  # relation labels embedded per question (more: words alone score relations)
RELATION_EMBED_WEIGHT = 0.05  # a tie-breaker between relations: base-model similarities are noisy
HOP2_BRIDGES = 12      # hop-1 facts whose far entity is expanded into hop 2
HOP_PENALTY = 0.15     # a 2-hop path must be more relevant than a 1-hop fact to outrank it
EMBED_WEIGHT = 0.25    # weight of the (standardised) embedding similarity: a tie-breaker more than a judge
RERANK = 24            # candidates whose texts are embedded (llama.cpp on a CPU: ~25 ms a fact)


@dataclass(frozen=True)
class Link:
    """An entity the question mentions."""

    id: int
    key: str
    label: str
    description: str | None
    mention: str       # the words of the question that matched
    match: str         # 'exact' | 'fuzzy' | 'partial'
    score: float       # 1.0 for exact, the Jaro-Winkler similarity for fuzzy, 0.9 for partial


@dataclass(frozen=True)
class Fact:
    head: int
    relation: int
    tail: int
    head_label: str
    relation_label: str
    tail_label: str
    head_key: str = ""
    relation_key: str = ""
    tail_key: str = ""

    @property
    def ids(self) -> tuple[int, int, int]:
        return (self.head, self.relation, self.tail)

    def text(self) -> str:
        """How a fact is written in a prompt and embedded."""
        return fact_text(self.head_label, self.relation_label, self.tail_label)

    def as_dict(self) -> dict:
        return {"head": self.head_label, "relation": self.relation_label, "tail": self.tail_label,
                "head_key": self.head_key, "relation_key": self.relation_key, "tail_key": self.tail_key}


@dataclass
class Path:
    """One or two facts from a linked entity outwards; `facts[-1]` is the one the path is about."""

    facts: tuple[Fact, ...]
    lexical: float = 0.0
    similarity: float | None = None
    score: float = 0.0

    @property
    def hops(self) -> int:
        return len(self.facts)


@dataclass
class Retrieval:
    question: str
    links: list[Link]
    facts: list[Fact]                        # the ones to put in the prompt, in citation order
    paths: list[Path] = field(default_factory=list)  # every path considered, best first

    @property
    def candidates(self) -> int:
        return len(self.paths)

    @property
    def matched(self) -> bool:
        return bool(self.links)


# ------------------------------------------------------------------------------------------------ text


def words(text: str) -> list[str]:
    return normalize(text).split()


def capitalized(text: str) -> list[bool]:
    """For each of `words(text)`, whether the user wrote it with a capital (a proper-noun hint)."""
    return [w[0].isupper() for w in re.split(r"[\W_]+", strip_accents(text)) if w]


def content_words(text: str) -> list[str]:
    return [w for w in words(text) if w not in STOPWORDS and len(w) > 1]


def same_word(a: str, b: str) -> bool:
    """A crude stemmer good enough for relation names: equal, or sharing a prefix of >= 4 letters that
    covers most of the shorter word ("founded"/"founder", "border"/"borders", "lead"/"leader")."""
    if a == b:
        return True
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n >= 4 and n >= 0.75 * min(len(a), len(b))


def overlap(question_words: Sequence[str], text: str) -> float:
    """How much of `text`'s content the question mentions: matched words / sqrt(content words)."""
    terms = content_words(text)
    if not terms:
        return 0.0
    hits = sum(1 for t in terms if any(same_word(t, q) for q in question_words))
    return hits / math.sqrt(len(terms))


def ngrams(tokens: Sequence[str], max_n: int = MAX_NGRAM) -> list[tuple[int, int, str]]:
    """Every (start, end, text) span of up to max_n tokens that is not only stopwords."""
    out = []
    for i in range(len(tokens)):
        for j in range(i + 1, min(len(tokens), i + max_n) + 1):
            span = tokens[i:j]
            if all(t in STOPWORDS for t in span):
                continue
            out.append((i, j, " ".join(span)))
    return out


def choose_spans(matches: dict[tuple[int, int], list[dict]]) -> list[tuple[int, int]]:
    """Longest spans first, never two overlapping (so "New Delhi" wins over "Delhi")."""
    taken: set[int] = set()
    chosen = []
    for (i, j) in sorted(matches, key=lambda s: (-(s[1] - s[0]), s[0])):
        if taken.isdisjoint(range(i, j)):
            chosen.append((i, j))
            taken.update(range(i, j))
    return sorted(chosen)


# ------------------------------------------------------------------------------------------------ linking


def link_entities(store, question: str, embedder: Encoder | None = None) -> list[Link]:
    """The entities the question names, in the order they are mentioned."""
    tokens = words(question)
    if not tokens:
        return []
    spans = ngrams(tokens)
    caps = capitalized(question)
    if len(caps) != len(tokens):  # tokenization disagreed (should not happen): no capitalisation hints
        caps = [False] * len(tokens)

    def fuzzy_ok(s) -> bool:
        # a single lower-case word is too often a near-miss of some label ("domain" ~ "domino"): multi-word
        # spans, and single words only when capitalised
        return tokens[s[0]] not in STOPWORDS and tokens[s[1] - 1] not in STOPWORDS and (s[1] - s[0] > 1 or caps[s[0]])

    def partial_ok(s) -> bool:
        return all(caps[k] for k in range(s[0], s[1])) and s[2] not in STOPWORDS

    # each stage looks only at the words earlier stages left unlinked
    chosen: dict[tuple[int, int], list[dict]] = {}
    for find, eligible in ((_exact_matches, None), (_fuzzy_matches, fuzzy_ok), (_partial_matches, partial_ok)):
        covered = {k for i, j in chosen for k in range(i, j)}
        found = find(store, [s for s in spans if covered.isdisjoint(range(s[0], s[1]))
                             and (eligible is None or eligible(s))])
        for span in choose_spans(found):
            chosen[span] = found[span]
    links: list[Link] = []
    seen: set[int] = set()
    for i, j in sorted(chosen):
        for row in _pick(chosen[(i, j)], question, embedder):
            if row["id"] not in seen:
                seen.add(row["id"])
                links.append(Link(row["id"], row["key"], row["label"], row["description"], " ".join(tokens[i:j]),
                                  row["match"], row["score"]))
    return links


def _matches(store, spans, match: str, min_similarity: float = 0.0) -> dict[tuple[int, int], list[dict]]:
    """For each span, the entities whose name it matches (`Store.entities_named`), as link candidates."""
    rows = store.entities_named([t for _, _, t in spans], match, per_text=MAX_CANDIDATES,
                                min_similarity=min_similarity)
    by_text: dict[str, list[dict]] = {}
    for t, i, k, lbl, d, sc in rows:
        by_text.setdefault(t, []).append({"id": i, "key": k, "label": lbl, "description": d, "match": match,
                                          "score": 1.0 if sc is None else round(float(sc), 3)})
    return {(i, j): by_text[t] for i, j, t in spans if t in by_text}


def _exact_matches(store, spans) -> dict[tuple[int, int], list[dict]]:
    return _matches(store, spans, "exact")


def _fuzzy_matches(store, spans) -> dict[tuple[int, int], list[dict]]:
    spans = [s for s in spans if len(s[2].replace(" ", "")) >= FUZZY_MIN_CHARS]
    found = _matches(store, spans, "fuzzy", FUZZY_MIN)
    # only the best-scoring entities of a span: a near-miss of a typo is not a second mention
    return {span: [r for r in rows if r["score"] == rows[0]["score"]] for span, rows in found.items()}


def _partial_matches(store, spans) -> dict[tuple[int, int], list[dict]]:
    """Spans that are the first or last words of a longer label: "Apple" -> "Apple Inc.", "Einstein" ->
    "Albert Einstein" (shorter labels first)."""
    spans = [s for s in spans if len(s[2]) >= 2]
    return _matches(store, spans, "partial")


def _pick(rows: list[dict], question: str, embedder: Encoder | None) -> list[dict]:
    """One entity for a name, or, for a name several share, the one whose text is closest to the question."""
    if len(rows) == 1:
        return rows
    if embedder is None:
        return rows[:AMBIGUOUS_KEEP]
    vecs = embedder.encode([question] + [entity_text(r["label"], r["description"]) for r in rows])
    best = int(np.argmax(vecs[1:] @ vecs[0]))
    return [rows[best]]


# ------------------------------------------------------------------------------------------------ facts


def _neighbour_facts(store, entities: Sequence[int], relation_scores: np.ndarray, cap: int) -> dict[int, list[Fact]]:
    """For each entity, the distinct triples (any split) it is the head or tail of: at most `cap`, the ones
    with the most relevant relations first (then by ids, so the choice is deterministic)."""
    out: dict[int, list[Fact]] = {}
    for near, *fact in store.neighbour_triples(entities, relation_scores, cap):
        out.setdefault(near, []).append(Fact(*fact))
    return out


def relation_scores(store, question_words: Sequence[str], question: str, embedder: Encoder | None) -> np.ndarray:
    """Relevance of every relation to the question, indexed by relation id: word overlap with its label
    (1.0) and description (0.3), plus, with an embedder and a graph of at most RELATION_EMBED_MAX
    relations, the standardised similarity of the question with the label as a tie-breaker (weight
    RELATION_EMBED_WEIGHT: words are the stronger evidence; similarity orders relations no word matched)."""
    rows = store.relation_labels()
    scores = np.zeros(max((r[0] for r in rows), default=-1) + 1)
    for rid, label, description in rows:
        scores[rid] = overlap(question_words, label) + 0.3 * overlap(question_words, description)
    if embedder is not None and 1 < len(rows) <= RELATION_EMBED_MAX:
        vecs = embedder.encode([question] + [label for _, label, _ in rows])
        z = standardize((vecs[1:] @ vecs[0]).astype(np.float64))
        for (rid, _, _), zz in zip(rows, z):
            scores[rid] += RELATION_EMBED_WEIGHT * float(zz)
    return scores


def far_end(fact: Fact, entity: int) -> int:
    return fact.tail if fact.head == entity else fact.head


def far_label(fact: Fact, entity: int) -> str:
    return fact.tail_label if fact.head == entity else fact.head_label


def fact_lexical(question_words: Sequence[str], fact: Fact, near: int, rel_scores: np.ndarray,
                 linked: set[int]) -> float:
    """Relevance of a fact seen from entity `near`: its relation's score, plus the far entity's name
    (0.5 x word overlap), or +1 when the far entity is itself named in the question."""
    score = float(rel_scores[fact.relation]) if fact.relation < len(rel_scores) else 0.0
    far = far_end(fact, near)
    score += 1.0 if far in linked and far != near else 0.5 * overlap(question_words, far_label(fact, near))
    return score


def path_lexical(scores: Sequence[float]) -> float:
    """A 2-hop path is as relevant as the mean of its facts, less a penalty for the extra hop."""
    return sum(scores) / len(scores) - HOP_PENALTY * (len(scores) - 1)


def standardize(values: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance (all zeros when the values do not vary)."""
    if len(values) == 0:
        return values
    std = float(values.std())
    return (values - values.mean()) / std if std > 1e-9 else np.zeros_like(values)


def select_facts(paths: Sequence[Path], max_facts: int) -> list[Fact]:
    """Facts of the best paths in order, a path's bridge before its second hop, each fact once (a symmetric
    pair such as two `spouse` edges counts once), and never a second hop whose bridge no longer fits."""
    out: list[Fact] = []
    seen: set[tuple[int, int, int]] = set()
    for p in paths:
        new = [f for f in p.facts if f.ids not in seen and (f.tail, f.relation, f.head) not in seen]
        if not new:
            continue
        if len(out) + len(new) > max_facts:
            continue
        out.extend(new)
        seen.update(f.ids for f in new)
        if len(out) >= max_facts:
            break
    return out


def retrieve(store, question: str, *, hops: int = 2, max_facts: int = 8, embedder: Encoder | None = None,
             links: list[Link] | None = None) -> Retrieval:
    """Link, collect and rank; the best `max_facts` facts for the prompt."""
    if hops not in (1, 2):
        raise KalmkgError(f"--hops must be 1 or 2, not {hops}")
    links = link_entities(store, question, embedder) if links is None else links
    if not links:
        return Retrieval(question, [], [])
    linked = {lk.id for lk in links}
    # the words naming the linked entities say which entity, not which fact: "Curie" in a question about
    # Marie Curie must not make every fact about Pierre Curie relevant
    named = {w for lk in links for w in lk.mention.split()}
    qwords = [w for w in content_words(question) if w not in named]
    rel_scores = relation_scores(store, qwords, question, embedder)

    paths: list[Path] = []
    seen: set[tuple[int, int, int]] = set()
    for near, facts in _neighbour_facts(store, sorted(linked), rel_scores, HOP1_CAP).items():
        for f in facts:
            if f.ids not in seen:  # a fact between two linked entities comes once
                seen.add(f.ids)
                paths.append(Path((f,), fact_lexical(qwords, f, near, rel_scores, linked)))
    if hops == 2:
        bridges: dict[int, list[Path]] = {}
        for p in sorted(paths, key=lambda p: -p.lexical)[:HOP2_BRIDGES]:
            f = p.facts[0]
            bridge = f.tail if f.head in linked else f.head
            if bridge not in linked:
                bridges.setdefault(bridge, []).append(p)
        for bridge, facts in _neighbour_facts(store, sorted(bridges), rel_scores, HOP2_FANOUT).items():
            for f2 in facts:
                if f2.ids in seen:
                    continue
                s2 = fact_lexical(qwords, f2, bridge, rel_scores, linked)
                for p in bridges[bridge]:
                    paths.append(Path((p.facts[0], f2), path_lexical([p.lexical, s2])))

    paths.sort(key=lambda p: -p.lexical)
    if embedder is not None and paths:
        top = paths[:RERANK]
        vecs = embedder.encode([question] + [p.facts[-1].text() for p in top])
        sims = vecs[1:] @ vecs[0]
        z = standardize(sims.astype(np.float64))
        for p, s, zz in zip(top, sims, z):
            p.similarity = float(s)
            p.score = p.lexical + EMBED_WEIGHT * float(zz)
        for p in paths[RERANK:]:
            p.score = p.lexical - 10.0  # below every re-ranked path
    else:
        for p in paths:
            p.score = p.lexical
    paths.sort(key=lambda p: (-p.score, p.hops))
    return Retrieval(question, links, select_facts(paths, max_facts), paths)
