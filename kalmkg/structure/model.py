"""A trained structure model: one row per entity and per relation (forward, then reciprocal), the keys
they belong to, and how it was trained; kept as `structure.npz` in the run folder.

Entity and relation ids are the store's, which only grow (a later ingest appends): rows stay valid for
the entities they were trained on, and the keys' hash says whether they still are. Entities added
after training get rows folded in from their facts (`with_new_entities`).
"""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kalmkg.errors import KalmkgError
from kalmkg.files import atomic_path
from kalmkg.structure import complex as cx

FILE = "structure.npz"


def keys_hash(keys) -> str:
    return hashlib.sha256("\n".join(keys).encode("utf-8")).hexdigest()[:16]


@dataclass
class StructureModel:
    entities: np.ndarray  # [N, 2k] float32
    relations: np.ndarray  # [2R, 2k] float32: the R relations, then their reciprocals
    entity_keys: str  # keys_hash of the N entities' keys, by id
    relation_keys: str  # keys_hash of the R relations' keys
    info: dict = field(default_factory=dict)  # how it was trained: settings, epochs, valid MRR, seconds
    has_row: np.ndarray | None = None  # [N] bool; None: all (with_new_entities leaves some without)

    @property
    def num_entities(self) -> int:
        return self.entities.shape[0]

    @property
    def num_relations(self) -> int:
        return self.relations.shape[0] // 2

    def fits(self, entity_keys, relation_keys) -> bool:
        """Whether this model's rows are still the graph's first entities and relations."""
        n, r = self.num_entities, self.num_relations
        return (len(entity_keys) >= n and len(relation_keys) >= r and keys_hash(entity_keys[:n]) == self.entity_keys
                and keys_hash(relation_keys[:r]) == self.relation_keys)

    def scores(self, queries: np.ndarray, num_relations: int,
               num_entities: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """([B, num_entities] scores, [B] bool: whether the model knows the query) for queries [B, 2]
        (entity, relation) in the caller's numbering: relation >= num_relations is the inverse of
        relation - num_relations. Candidates without a row (ingested after training and not folded in)
        get the query's mean over those with one; rows of unknown queries are 0. num_entities: the
        caller's candidates (default: this model's N)."""
        queries = np.asarray(queries, dtype=np.int64).reshape(-1, 2)
        width = self.num_entities if num_entities is None else num_entities
        entity, relation = queries[:, 0], queries[:, 1]
        inverse = relation >= num_relations
        base = np.where(inverse, relation - num_relations, relation)
        known = (entity < self.num_entities) & (base < self.num_relations)
        known[known] = self.row_mask()[entity[known]]
        rows = np.where(inverse, base + self.num_relations, base)
        out = np.zeros((len(queries), width), dtype=np.float32)
        n = min(self.num_entities, width)
        with_row = self.row_mask()[:n]
        if known.any():
            out[known, :n] = cx.scores(self.entities[entity[known]], self.relations[rows[known]], self.entities[:n])
        rowless = np.concatenate([np.flatnonzero(~with_row), np.arange(n, width)])
        if len(rowless):
            out[:, rowless] = out[:, :n][:, with_row].mean(axis=1, keepdims=True)
        return out, known

    def ranks(self, queries: np.ndarray, targets: np.ndarray, answers: dict, num_relations: int,
              num_entities: int, chunk: int = 1024) -> np.ndarray:
        """Filtered realistic ranks of the targets by this model alone (queries it does not know tie
        every candidate); answers: metrics.known_answers of every split."""
        from kalmkg.evaluation.metrics import answer_mask, filtered_ranks

        out = [filtered_ranks(self.scores(queries[a:a + chunk], num_relations, num_entities)[0],
                              targets[a:a + chunk], answer_mask(queries[a:a + chunk].tolist(), answers, num_entities))
               for a in range(0, len(queries), chunk)]
        return np.concatenate(out) if out else np.zeros(0)

    def with_new_entities(self, triples: np.ndarray, num_entities: int, num_relations: int) -> "StructureModel":
        """This model with a row for each entity ingested after training (ids N .. num_entities - 1) that
        has facts with entities it knows: folded in, not trained. A ComplEx score is linear in each of
        its entities, so the row that scores an entity's facts (h, r, e) highest at a given norm is the
        direction of the sum of their query factors h * r (facts (e, r, o) through the reciprocal:
        o * r^-1), at the median norm of the trained rows. Entities without such facts get no row
        (`has_row` False: fusion leaves them to the text model). Triples are in the caller's numbering
        (relations < num_relations)."""
        n, r = self.num_entities, self.num_relations
        if num_entities <= n:
            return self
        t = np.asarray(triples, dtype=np.int64).reshape(-1, 3)
        h, rel, o = t[:, 0], t[:, 1], t[:, 2]
        known_rel = rel < r
        into = known_rel & (h < n) & (o >= n)  # (known, r, new): the new one as the tail
        out_of = known_rel & (o < n) & (h >= n)  # (new, r, known): as the tail of the reciprocal
        sums = np.zeros((num_entities - n, self.entities.shape[1]), dtype=np.float64)
        np.add.at(sums, o[into] - n, cx.query_factors(self.entities[h[into]], self.relations[rel[into]]))
        np.add.at(sums, h[out_of] - n, cx.query_factors(self.entities[o[out_of]], self.relations[rel[out_of] + r]))
        norms = np.linalg.norm(sums, axis=1)
        has = norms > 0
        scale = float(np.median(np.linalg.norm(self.entities, axis=1))) if n else 1.0
        rows = np.zeros_like(sums, dtype=np.float32)
        rows[has] = (sums[has] / norms[has, None] * scale).astype(np.float32)
        return StructureModel(np.concatenate([self.entities, rows]), self.relations, self.entity_keys,
                              self.relation_keys, self.info, np.concatenate([self.row_mask(), has]))

    def row_mask(self) -> np.ndarray:
        """[N] whether each entity has a row (trained, or folded in from its facts)."""
        return self.has_row if self.has_row is not None else np.ones(self.num_entities, dtype=bool)

    def save(self, folder: Path) -> Path:
        path = folder / FILE
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, entities=self.entities, relations=self.relations,
                     meta=np.array(json.dumps({"entity_keys": self.entity_keys, "relation_keys": self.relation_keys,
                                               "info": self.info})))
        return path

    @classmethod
    def load(cls, folder: Path) -> "StructureModel | None":
        """The folder's structure model; None when it has none."""
        path = folder / FILE
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                meta = json.loads(str(data["meta"]))
                return cls(np.asarray(data["entities"], dtype=np.float32),
                           np.asarray(data["relations"], dtype=np.float32),
                           str(meta["entity_keys"]), str(meta["relation_keys"]), dict(meta.get("info", {})))
        except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
            raise KalmkgError(f"{path} cannot be read ({type(exc).__name__}); delete it to rank by text "
                              "alone, or train the run again") from None
