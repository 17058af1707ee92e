"""Link prediction by name: `HEAD RELATION ?` (tail prediction) and `? RELATION TAIL` (head prediction).

A head query is the tail query of the inverse relation (relation id + R, verbalised "inverse of ..."),
as the model was trained and as evaluation ranks it. The query's head-relation view is encoded and
searched against the entity index; every result is marked "known" when the triple is already in the
graph (any split), and `filter_known` hides those to show only new links. The query's own entity is
left out (a head-relation view is most similar to its own head's tail view, which says nothing), unless
the relation has self-loops in the graph.

`Predictor` keeps the model, encoder, index vectors and the graph's triples in memory, so repeated
queries in one process (benchmarks, a REPL, a server) pay only query encoding and search.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from kalmkg.errors import KalmkgError
from kalmkg.evaluation.calibration import probabilities
from kalmkg.evaluation.metrics import self_loop_relations
from kalmkg.index import RERANK_POOL, EntityIndex
from kalmkg.loaded import BACKENDS, gguf_first_encoder, load_model, make_encoder
from kalmkg.names import EntityRef, RelationRef, resolve_entity, resolve_relation
from kalmkg.store import Store
from kalmkg.structure.fusion import open_fusion
from kalmkg.text import hr_view
from kalmkg.workspace import Workspace

WILDCARD = "?"


@dataclass
class Candidate:
    rank: int
    id: int
    key: str
    label: str
    score: float
    known: bool
    probability: float | None = None  # the model's, over the candidates left (with `temperature`)


@dataclass
class PredictionResult:
    direction: str  # "tail" (HEAD REL ?) or "head" (? REL TAIL)
    entity: EntityRef  # the given entity
    relation: RelationRef
    candidates: list[Candidate]
    hidden_known: int  # known answers left out by filter_known
    model: str
    encode_ms: float
    search_ms: float
    warnings: list[str] = field(default_factory=list)
    excluded_self: bool = False  # the query's entity was left out (its relation has no self-loops)
    structure_weight: float | None = None  # the structure model's weight in the scores (None: text alone)

    def to_json(self) -> dict:
        query = ([self.entity.label, self.relation.label, WILDCARD] if self.direction == "tail"
                 else [WILDCARD, self.relation.label, self.entity.label])
        return {
            "query": query, "direction": self.direction, "entity": asdict(self.entity),
            "relation": asdict(self.relation), "model": self.model,
            "results": [{k: v for k, v in asdict(c).items() if v is not None} for c in self.candidates], "hidden_known": self.hidden_known,
            "excluded_self": self.excluded_self, "structure_weight": self.structure_weight,
            "timing_ms": {"encode": round(self.encode_ms, 2), "search": round(self.search_ms, 2)},
        }


def parse_query(head: str, relation: str, tail: str) -> tuple[str, str, str]:
    """(direction, entity name, relation name) from the three CLI words; exactly one must be '?'."""
    if relation == WILDCARD and WILDCARD not in (head, tail):
        raise KalmkgError("relation prediction is not supported; name the relation")
    if (head == WILDCARD) == (tail == WILDCARD):
        raise KalmkgError("give exactly one '?': `kalmkg predict HEAD RELATION ?` or `kalmkg predict ? RELATION TAIL`")
    return ("head", tail, relation) if head == WILDCARD else ("tail", head, relation)


def role_profile(triples: np.ndarray, entities: np.ndarray, skip_relation: int) -> dict[tuple[int, str], float]:
    """For a set of entities: the share of them that is the head ("out") or the tail ("in") of each
    relation, `skip_relation` left out."""
    entities = np.unique(entities)
    if len(entities) == 0:
        return {}
    out: dict[tuple[int, str], float] = {}
    keep = triples[:, 1] != skip_relation
    for column, role in ((0, "out"), (2, "in")):
        rows = triples[keep & np.isin(triples[:, column], entities)]
        pairs = np.unique(rows[:, [column, 1]], axis=0)  # (entity, relation) once each
        rels, counts = np.unique(pairs[:, 1], return_counts=True)
        out.update({(int(r), role): float(c) / len(entities) for r, c in zip(rels.tolist(), counts.tolist())})
    return out


def slot_fit(triples: np.ndarray, entity: int, relation: int) -> dict[str, float] | None:
    """How well an entity fits each slot of `relation`, from the relations it has (`relation` left out):
    "tail" (it is like the relation's heads: ENTITY RELATION ?) and "head" (like its tails), each the mean
    share of the relation's heads (tails) that have each of the entity's relations in the same role.
    None when the graph does not tell (the relation has no facts, or the entity no other ones)."""
    rel = triples[triples[:, 1] == relation]
    own = set(role_profile(triples, np.array([entity]), relation))
    if len(rel) == 0 or not own:
        return None
    return {side: sum(profile.get(key, 0.0) for key in own) / len(own)
            for side, profile in (("tail", role_profile(triples, rel[:, 0], relation)),
                                  ("head", role_profile(triples, rel[:, 2], relation)))}


def likely_direction(triples: np.ndarray, entity: int, relation: int, margin: float = 0.1) -> str | None:
    """Which slot of `relation` an entity with no fact of it would fill, from the graph alone: "tail"
    (the entity is a head: ENTITY RELATION ?) when the relations it has are those the relation's heads
    have, "head" when they are those of its tails; None when the graph does not tell (the entity has no
    other facts, or both sides fit within `margin`, unless the relation is symmetric). A country asked about `capital of` is a tail (its
    facts are continent, currency, ... like the other countries'), so the capital is a head query."""
    fit = slot_fit(triples, entity, relation)
    if fit is None:
        return None
    if abs(fit["tail"] - fit["head"]) >= margin:
        return max(fit, key=fit.get)
    # a symmetric relation (spouse, borders): either slot is the same question; ask for the tail
    rel = triples[triples[:, 1] == relation]
    pairs = set(map(tuple, rel[:, [0, 2]].tolist()))
    mirrored = sum((t, h) in pairs for h, t in pairs) / len(pairs)
    return "tail" if mirrored >= 0.5 else None


class Predictor:
    """One model, its encoder and its fresh entity index, ready for many queries."""

    def __init__(self, loaded, encoder, index, triples: np.ndarray, fusion=None):
        self.loaded = loaded
        self.encoder = encoder
        self.index = index
        self.triples = triples  # [n, 3] (head, relation, tail), every split
        self.num_relations = len(loaded.relation_keys)
        self.self_loop_relations = self_loop_relations(triples)
        # the run's structure model, fitted (structure/fusion.py): its share is added to the cosines
        self.fusion = fusion if fusion is not None and fusion.weight is not None else None

    @classmethod
    def open(cls, workspace: Workspace, *, run: str | None = None, base: str | None = None,
             backend: str = "torch", device: str = "cpu", loaded=None, encoder=None,
             triples: np.ndarray | None = None, tables: tuple | None = None, gguf: str | None = None,
             precision: str = "auto") -> "Predictor":
        """`gguf` picks one of a run's exports in models/ for the gguf backend (default: the newest);
        `precision` the torch backend's weights (`device.inference_precision`)."""
        if backend not in BACKENDS:
            raise KalmkgError(f"unknown backend '{backend}'; use one of: {', '.join(BACKENDS)}")
        if triples is None or (loaded is None and tables is None):
            with Store.open(workspace) as store:
                triples = store.triples_array() if triples is None else triples
                if loaded is None and tables is None:
                    tables = (store.entity_table(), store.relation_table(), store.fingerprint())
        if loaded is None and encoder is None and backend == "gguf":
            # the GGUF's own tokenizer cuts the texts: no torch, no transformers
            encoder = gguf_first_encoder(workspace, run=run, base=base, gguf=gguf)
            if encoder is not None:
                loaded = load_model(workspace, run=run, base=base, device=device, tables=tables,
                                    tokenizer=encoder.text_tokenizer())
        if loaded is None:
            loaded = load_model(workspace, run=run, base=base, device=device, tables=tables, precision=precision)
        index = EntityIndex.open(workspace, loaded)  # raises when missing or stale: never search stale vectors
        if encoder is None:
            encoder = make_encoder(loaded, backend, gguf=gguf)
        if index.ann is None:
            index.vectors()  # exact search: read the vectors now, not inside the first query's timing
        fusion, note = open_fusion(loaded, triples)
        if note:
            loaded.warnings.append(note)
        return cls(loaded, encoder, index, triples, fusion)

    def known(self, entity_id: int, relation_id: int, direction: str) -> np.ndarray:
        """Ids of the answers the graph already has for the query."""
        t = self.triples
        if direction == "tail":
            return np.unique(t[(t[:, 0] == entity_id) & (t[:, 1] == relation_id), 2])
        return np.unique(t[(t[:, 2] == entity_id) & (t[:, 1] == relation_id), 0])

    def query_text(self, entity_id: int, relation_id: int, direction: str) -> str:
        rel = relation_id if direction == "tail" else relation_id + self.num_relations
        return hr_view(self.loaded.entity_text(entity_id), self.loaded.relation_texts[rel])

    def query(self, entity: EntityRef | int, relation: RelationRef | int, direction: str = "tail", k: int = 10,
              filter_known: bool = False, temperature: float | None = None) -> PredictionResult:
        """The top `k` candidates; with `temperature`, each with the model's probability: softmax of the
        scores over every candidate left (exact search; with an ANN index, over the best 256)."""
        if direction not in ("tail", "head"):
            raise KalmkgError(f"unknown direction '{direction}'; use tail or head")
        if k < 1:
            raise KalmkgError("-k must be at least 1")
        entity = entity if isinstance(entity, EntityRef) else self._entity(entity)
        relation = relation if isinstance(relation, RelationRef) else self._relation(relation)
        t0 = time.perf_counter()
        qvec = self.encoder.encode([self.query_text(entity.id, relation.id, direction)], 1)
        t1 = time.perf_counter()
        known = self.known(entity.id, relation.id, direction)
        exclude_self = relation.id not in self.self_loop_relations
        exclude = (known.tolist() if filter_known else []) + ([entity.id] if exclude_self else [])
        extra = self._extra(entity.id, relation.id, direction)
        ids, scores = self.index.search(qvec, k, exclude=[exclude], extra=extra)
        t2 = time.perf_counter()
        known_set = set(known.tolist())
        keys, labels = self.loaded.entity_keys, self.loaded.entity_labels
        candidates = [Candidate(r + 1, int(i), keys[i], labels[i], float(s), int(i) in known_set)
                      for r, (i, s) in enumerate(zip(ids[0].tolist(), scores[0].tolist())) if i >= 0]
        if temperature is not None and candidates:
            self._add_probabilities(candidates, qvec, exclude, temperature, extra)
        return PredictionResult(direction, entity, relation, candidates, len(known_set) if filter_known else 0,
                                self.loaded.fingerprint, 1000 * (t1 - t0), 1000 * (t2 - t1),
                                list(self.loaded.warnings), exclude_self,
                                self.fusion.weight if self.fusion is not None else None)

    def _extra(self, entity_id: int, relation_id: int, direction: str) -> np.ndarray | None:
        """[1, rows] the structure model's share of every candidate's score (None: text alone)."""
        if self.fusion is None:
            return None
        rel = relation_id if direction == "tail" else relation_id + self.num_relations
        return self.fusion.extra(np.array([[entity_id, rel]]), self.num_relations, self.index.rows)

    def _add_probabilities(self, candidates: list[Candidate], qvec: np.ndarray, exclude: list[int],
                           temperature: float, extra: np.ndarray | None = None) -> None:
        q = np.asarray(qvec, dtype=np.float32).reshape(-1)
        q = q / max(float(np.linalg.norm(q)), 1e-12)
        if self.index.ann is None:
            scores = self.index.vectors() @ q + (extra[0] if extra is not None else 0.0)
            scores[exclude] = -np.inf
        else:
            scores = self.index.search(q[None], RERANK_POOL, exclude=[exclude], extra=extra)[1][0]
        for c, p in zip(candidates, probabilities(scores, np.array([c.score for c in candidates]), temperature)):
            c.probability = float(p)

    def _entity(self, i: int) -> EntityRef:
        return EntityRef(int(i), self.loaded.entity_keys[i], self.loaded.entity_labels[i])

    def _relation(self, i: int) -> RelationRef:
        return RelationRef(int(i), self.loaded.relation_keys[i], self.loaded.relation_labels[i])


def predict(workspace: Workspace, head: str, relation: str, tail: str, *, k: int = 10, filter_known: bool = False,
            run: str | None = None, base: str | None = None, backend: str = "torch", device: str = "cpu",
            gguf: str | None = None, predictor: Predictor | None = None, precision: str = "auto") -> PredictionResult:
    """Resolve the names, then rank every entity for the open slot. Names are resolved before the model
    loads, so a typo fails in a fraction of a second."""
    direction, entity_name, relation_name = parse_query(head, relation, tail)
    if backend not in BACKENDS:  # before any loading
        raise KalmkgError(f"unknown backend '{backend}'; use one of: {', '.join(BACKENDS)}")
    with Store.open(workspace) as store:
        relation_table = store.relation_table()
        rel = resolve_relation(store, relation_name, relation_table)
        ent = resolve_entity(store, entity_name)
        if predictor is None:
            triples = store.triples_array()
            tables = (store.entity_table(), relation_table, store.fingerprint())
    if predictor is None:
        predictor = Predictor.open(workspace, run=run, base=base, backend=backend, device=device,
                                   triples=triples, tables=tables, gguf=gguf, precision=precision)
    return predictor.query(ent, rel, direction, k, filter_known)
