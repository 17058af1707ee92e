"""The graph store: DuckDB schema, migrations and every SQL statement of the project.

Ids are dense integers assigned in key order per ingest, so embedding matrices can be indexed by them.
Uniqueness (of keys, of triples) is enforced by the merge statements, not by index constraints: ART
indexes make bulk loads slow and their memory grows with the graph.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from kalmkg.errors import KalmkgError, WorkspaceBusy
from kalmkg.workspace import Workspace

if TYPE_CHECKING:
    import duckdb
    import pyarrow as pa

SPLITS = ("train", "valid", "test")

# Each migration brings the schema from version i to i + 1. Append; never edit a released one.
MIGRATIONS: list[list[str]] = [
    [
        "CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR)",
        """CREATE TABLE entities (
            id INTEGER NOT NULL, key VARCHAR NOT NULL, label VARCHAR NOT NULL, description VARCHAR,
            label_lang VARCHAR, description_lang VARCHAR, updated_at TIMESTAMP NOT NULL)""",
        """CREATE TABLE relations (
            id INTEGER NOT NULL, key VARCHAR NOT NULL, label VARCHAR NOT NULL, description VARCHAR,
            label_lang VARCHAR, description_lang VARCHAR)""",
        """CREATE TABLE triples (
            head INTEGER NOT NULL, relation INTEGER NOT NULL, tail INTEGER NOT NULL,
            split VARCHAR NOT NULL CHECK (split IN ('train', 'valid', 'test')), ingest INTEGER NOT NULL)""",
        """CREATE TABLE attributes (
            entity INTEGER NOT NULL, predicate VARCHAR NOT NULL, value VARCHAR NOT NULL,
            datatype VARCHAR NOT NULL, lang VARCHAR NOT NULL, ingest INTEGER NOT NULL)""",
        """CREATE TABLE ingests (
            id INTEGER NOT NULL, source VARCHAR NOT NULL, format VARCHAR NOT NULL, sha256 VARCHAR NOT NULL,
            entities INTEGER NOT NULL, relations INTEGER NOT NULL, triples INTEGER NOT NULL,
            attributes INTEGER NOT NULL, texts_updated INTEGER NOT NULL,
            started_at TIMESTAMP NOT NULL, seconds DOUBLE NOT NULL)""",
    ],
    [
        """CREATE TABLE runs (
            id VARCHAR NOT NULL, created_at TIMESTAMP NOT NULL, base VARCHAR NOT NULL, status VARCHAR NOT NULL,
            path VARCHAR NOT NULL, graph_fingerprint VARCHAR NOT NULL, config VARCHAR NOT NULL,
            steps INTEGER NOT NULL DEFAULT 0, best_metric DOUBLE, finished_at TIMESTAMP)""",
    ],
]
SCHEMA_VERSION = len(MIGRATIONS)

# Staging tables hold one source's rows as keys (strings) until `merge_staged` turns them into ids.
_STAGING = {
    # src: the position of the source in one ingest command (all are staged before any is merged)
    "stage_edges": "h VARCHAR, r VARCHAR, t VARCHAR, split VARCHAR",
    # target: 'entity', 'relation', or 'any' (RDF: decided by whether the key is used as a predicate)
    # field: 'label' or 'description'; rank: preference among predicates (lower wins)
    "stage_texts": "key VARCHAR, target VARCHAR, field VARCHAR, rank INTEGER, lang VARCHAR, value VARCHAR",
    "stage_attrs": "key VARCHAR, predicate VARCHAR, value VARCHAR, datatype VARCHAR, lang VARCHAR",
}
STAGING_COLUMNS = {name: [c.split()[0] for c in cols.split(", ")] for name, cols in _STAGING.items()}

# A readable label from a key: the IRI's local name (or the TSV id), percent-decoded, '_' as spaces.
_FALLBACK_LABEL = (
    "coalesce(nullif(trim(replace(url_decode(regexp_extract({k}, '([^/#:]+)[/#]*$', 1)), '_', ' ')), ''), {k})"
)


@dataclass
class MergeCounts:
    entities: int = 0
    relations: int = 0
    triples: int = 0
    attributes: int = 0
    texts_updated: int = 0


def _is_lock_error(exc: Exception) -> bool:
    text = str(exc).lower()
    return "lock" in text and ("conflicting" in text or "could not set" in text)


class Store:
    """A connection to one workspace's `kg.duckdb`. Use `Store.open(...)` as a context manager."""

    def __init__(self, con: "duckdb.DuckDBPyConnection", path: Path, writable: bool):
        self.con = con
        self.path = path
        self.writable = writable

    # ---------------------------------------------------------------- opening and schema
    @classmethod
    @contextmanager
    def open(cls, workspace: Workspace, *, write: bool = False, create: bool = False) -> Iterator["Store"]:
        """Open the store; `create` makes the workspace if needed. Read-only opens never create."""
        path = workspace.db_path
        if not path.exists():
            if not create:
                raise KalmkgError(f"no graph in workspace {workspace.root} (run `kalmkg ingest FILE` first)")
            workspace.root.mkdir(parents=True, exist_ok=True)
        store = cls._connect(path, write=write or create)
        try:
            store._ensure_schema()
            yield store
        finally:
            store.con.close()

    @classmethod
    def _connect(cls, path: Path, write: bool) -> "Store":
        import duckdb

        try:
            con = duckdb.connect(str(path), read_only=not write)
        except duckdb.IOException as exc:
            if _is_lock_error(exc):
                raise WorkspaceBusy(
                    f"workspace is busy: another kalmkg process is using {path} (wait for it to finish)"
                ) from None
            raise KalmkgError(f"cannot open {path}: {str(exc).splitlines()[0]}") from None
        except duckdb.Error as exc:
            raise KalmkgError(f"cannot open {path}: {str(exc).splitlines()[0]}") from None
        # A fixed memory budget: staging tables and merge joins of a large ingest spill to disk
        # (beside the store) instead of growing with the file.
        con.execute("SET preserve_insertion_order = false")
        con.execute(f"SET memory_limit = '{os.environ.get('KALMKG_MEMORY_LIMIT', '256MB')}'")
        if write:
            con.execute(f"SET temp_directory = '{path.parent / '.tmp'}'")
        return cls(con, path, write)

    def schema_version(self) -> int:
        has_meta = self.con.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'meta' AND table_schema = 'main'"
        ).fetchall()[0][0]
        if not has_meta:
            return 0
        rows = self.con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall()
        return int(rows[0][0]) if rows else 0

    def _ensure_schema(self) -> None:
        version = self.schema_version()
        if version > SCHEMA_VERSION:
            raise KalmkgError(
                f"{self.path} has schema version {version}, newer than this kalmkg ({SCHEMA_VERSION}); upgrade kalmkg"
            )
        if version == SCHEMA_VERSION:
            return
        if not self.writable:
            # Reads of an old store upgrade it first; that needs a writable connection.
            self.con.close()
            upgraded = self._connect(self.path, write=True)
            upgraded._ensure_schema()
            upgraded.con.close()
            self.con = self._connect(self.path, write=False).con
            return
        with self.transaction():
            for statements in MIGRATIONS[version:]:
                for sql in statements:
                    self.con.execute(sql)
            self.con.execute(
                "INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)]
            )

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """All or nothing: any exception (Ctrl-C included) rolls back every statement inside."""
        self.con.execute("BEGIN TRANSACTION")
        try:
            yield
        except BaseException:
            self.con.execute("ROLLBACK")
            raise
        self.con.execute("COMMIT")

    # ---------------------------------------------------------------- ingest
    def source_ingested(self, sha256: str) -> bool:
        return self.con.execute("SELECT count(*) FROM ingests WHERE sha256 = ?", [sha256]).fetchall()[0][0] > 0

    def reset_staging(self) -> None:
        """Empty staging tables. They are temporary (this connection only) and live outside the ingest
        transaction: inside one, DuckDB keeps every Arrow batch alive until the commit."""
        for name, cols in _STAGING.items():
            self.con.execute(f"CREATE OR REPLACE TEMP TABLE {name}_all (src INTEGER, {cols})")

    def stage(self, table: str, src: int, batch: "pa.Table") -> None:
        """Append an Arrow batch (columns as in STAGING_COLUMNS[table]) of source `src`."""
        self.con.register("_batch", batch)
        try:
            self.con.execute(
                f"INSERT INTO {table}_all SELECT {int(src)}, {', '.join(STAGING_COLUMNS[table])} FROM _batch"
            )
        finally:
            self.con.unregister("_batch")

    def merge_staged(self, src: int, ingest_id: int, lang: str) -> MergeCounts:
        """Turn the staged keys of source `src` into ids and add what is new; returns what was added
        or changed."""
        import duckdb

        try:
            return self._merge_staged(src, ingest_id, lang)
        except duckdb.OutOfMemoryException:
            limit = self.con.execute("SELECT current_setting('memory_limit')").fetchall()[0][0]
            raise KalmkgError(
                f"the store ran out of its memory budget ({limit}) while merging; "
                "set KALMKG_MEMORY_LIMIT higher (e.g. 2GB) and ingest again"
            ) from None

    def _merge_staged(self, src: int, ingest_id: int, lang: str) -> MergeCounts:
        c = self.con
        for name in _STAGING:
            c.execute(f"CREATE OR REPLACE TEMP VIEW {name} AS SELECT * EXCLUDE (src) FROM {name}_all WHERE src = {int(src)}")
        counts = MergeCounts()
        label = _FALLBACK_LABEL.format(k="key")
        # How well a text's language tag fits the preferred one (lower is better); NULL marks a
        # fallback label made from the key, which any real text replaces.
        c.execute(
            """CREATE OR REPLACE TEMP MACRO lang_rank(x, pref) AS
               CASE WHEN x IS NULL THEN 9 WHEN lower(x) = pref THEN 0
                    WHEN starts_with(lower(x), pref || '-') OR starts_with(pref, lower(x) || '-') THEN 1
                    WHEN x = '' THEN 2 ELSE 3 END"""
        )

        c.execute(
            """CREATE OR REPLACE TEMP TABLE _new_rel AS
               SELECT key FROM (SELECT DISTINCT r AS key FROM stage_edges
                                UNION SELECT key FROM stage_texts WHERE target = 'relation') s
               ANTI JOIN relations USING (key)"""
        )
        counts.relations = c.execute(
            f"""INSERT INTO relations
                SELECT (SELECT coalesce(max(id), -1) FROM relations) + row_number() OVER (ORDER BY key),
                       key, {label}, NULL, NULL, NULL FROM _new_rel"""
        ).fetchall()[0][0]

        c.execute(
            """CREATE OR REPLACE TEMP TABLE _new_ent AS
               SELECT key FROM (
                   SELECT h AS key FROM stage_edges UNION SELECT t FROM stage_edges
                   UNION SELECT key FROM stage_texts WHERE target = 'entity'
                   UNION (SELECT key FROM stage_texts WHERE target = 'any'
                          UNION SELECT key FROM stage_attrs
                          -- a property described in the graph is not an entity
                          EXCEPT (SELECT key FROM relations UNION SELECT r FROM stage_edges_all
                                  UNION SELECT predicate FROM stage_attrs_all UNION SELECT predicate FROM attributes))
               ) s ANTI JOIN entities USING (key)"""
        )
        counts.entities = c.execute(
            f"""INSERT INTO entities
                SELECT (SELECT coalesce(max(id), -1) FROM entities) + row_number() OVER (ORDER BY key),
                       key, {label}, NULL, NULL, NULL, now() FROM _new_ent"""
        ).fetchall()[0][0]

        # The best text per key, field and target: preferred language, its regional variants,
        # untagged, any; then the predicate's rank; then the value, so file order never decides.
        # Relations look at every source of the command: an ontology file describing a property
        # may come before the data file that uses it.
        for table, staged in (("_best_text", "stage_texts"), ("_best_rel_text", "stage_texts_all")):
            c.execute(
                f"""CREATE OR REPLACE TEMP TABLE {table} AS
                   SELECT key, target, field, lang, value FROM (
                       SELECT *, row_number() OVER (
                           PARTITION BY key, field, target ORDER BY lang_rank(lang, $lang), rank, value) AS rn
                       FROM {staged}) WHERE rn = 1""",
                {"lang": lang.lower()},
            )
        # A text replaces a stored one unless the stored one fits the preferred language better
        # (a later file with only a French label does not undo an English one under --lang en).
        better = "lang_rank(b.lang, $lang) <= lang_rank(x.{field}_lang, $lang) AND x.{field} IS DISTINCT FROM b.value"
        counts.texts_updated = c.execute(
            f"""SELECT count(DISTINCT x.id) FROM _best_text b JOIN entities x ON x.key = b.key
               WHERE b.target IN ('entity', 'any') AND x.key NOT IN (SELECT key FROM _new_ent)
                 AND ((b.field = 'label' AND {better.format(field='label')})
                      OR (b.field = 'description' AND {better.format(field='description')}))""",
            {"lang": lang.lower()},
        ).fetchall()[0][0]
        for table, best, targets in (("entities", "_best_text", "('entity', 'any')"),
                                     ("relations", "_best_rel_text", "('relation', 'any')")):
            for field in ("label", "description"):
                touched = ", updated_at = now()" if table == "entities" else ""
                c.execute(
                    f"""UPDATE {table} x SET {field} = b.value, {field}_lang = b.lang{touched} FROM {best} b
                        WHERE b.key = x.key AND b.field = '{field}' AND b.target IN {targets}
                          AND {better.format(field=field)}""",
                    {"lang": lang.lower()},
                )

        # A triple listed in several splits is training data: evaluating on it would leak.
        counts.triples = c.execute(
            """INSERT INTO triples
               SELECT n.head, n.relation, n.tail, n.split, $ingest FROM (
                   SELECT h.id AS head, r.id AS relation, t.id AS tail,
                          arg_min(s.split, CASE s.split WHEN 'train' THEN 0 WHEN 'valid' THEN 1 ELSE 2 END) AS split
                   FROM stage_edges s
                   JOIN entities h ON h.key = s.h JOIN relations r ON r.key = s.r JOIN entities t ON t.key = s.t
                   GROUP BY ALL) n
               ANTI JOIN triples o ON o.head = n.head AND o.relation = n.relation AND o.tail = n.tail""",
            {"ingest": ingest_id},
        ).fetchall()[0][0]

        # ... also when an earlier ingest put it in valid or test.
        c.execute(
            """UPDATE triples SET split = 'train' FROM stage_edges s
               JOIN entities h ON h.key = s.h JOIN relations r ON r.key = s.r JOIN entities t ON t.key = s.t
               WHERE s.split = 'train' AND triples.split <> 'train'
                 AND triples.head = h.id AND triples.relation = r.id AND triples.tail = t.id"""
        )

        counts.attributes = c.execute(
            """INSERT INTO attributes
               SELECT n.*, $ingest FROM (
                   SELECT DISTINCT e.id AS entity, a.predicate, a.value,
                          coalesce(a.datatype, '') AS datatype, coalesce(a.lang, '') AS lang
                   FROM stage_attrs a JOIN entities e ON e.key = a.key) n
               ANTI JOIN attributes o ON o.entity = n.entity AND o.predicate = n.predicate
                    AND o.value = n.value AND o.datatype = n.datatype AND o.lang = n.lang""",
            {"ingest": ingest_id},
        ).fetchall()[0][0]
        return counts

    def next_ingest_id(self) -> int:
        return self.con.execute("SELECT coalesce(max(id), -1) + 1 FROM ingests").fetchall()[0][0]

    def log_ingest(self, ingest_id: int, source: str, fmt: str, sha256: str, counts: MergeCounts,
                   started: float) -> None:
        self.con.execute(
            "INSERT INTO ingests VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, to_timestamp(?), ?)",
            [ingest_id, source, fmt, sha256, counts.entities, counts.relations, counts.triples,
             counts.attributes, counts.texts_updated, started, time.time() - started],
        )

    # ---------------------------------------------------------------- splits
    def triples_by_key(self) -> "pa.Table":
        """Every triple with its ids and keys, in key order (so a split does not depend on ingest order)."""
        return self.con.sql(
            """SELECT t.head, t.relation, t.tail, t.split
               FROM triples t JOIN entities h ON h.id = t.head JOIN relations r ON r.id = t.relation
                    JOIN entities tt ON tt.id = t.tail
               ORDER BY h.key, r.key, tt.key"""
        ).to_arrow_table()

    def assign_splits(self, table: "pa.Table") -> None:
        """Set `split` for the triples in `table` (columns head, relation, tail, split)."""
        self.con.register("_splits", table)
        try:
            self.con.execute(
                """UPDATE triples SET split = s.split FROM _splits s
                   WHERE triples.head = s.head AND triples.relation = s.relation AND triples.tail = s.tail"""
            )
        finally:
            self.con.unregister("_splits")

    # ---------------------------------------------------------------- reads for training and evaluation
    def entity_table(self) -> "pa.Table":
        """id, key, label, description of every entity, by id (ids are dense: 0..n-1)."""
        return self.con.sql("SELECT id, key, label, description FROM entities ORDER BY id").to_arrow_table()

    def relation_table(self) -> "pa.Table":
        return self.con.sql("SELECT id, key, label, description FROM relations ORDER BY id").to_arrow_table()

    def triples_array(self, splits: tuple[str, ...] = SPLITS):
        """[n, 3] int64 array of (head, relation, tail) in the given splits, in a stable order."""
        import numpy as np

        placeholders = ", ".join("?" for _ in splits)
        rows = self.con.execute(
            f"SELECT head, relation, tail FROM triples WHERE split IN ({placeholders}) ORDER BY head, relation, tail",
            list(splits),
        ).fetchnumpy()
        return np.stack([rows["head"], rows["relation"], rows["tail"]], axis=1).astype(np.int64) \
            if len(rows["head"]) else np.zeros((0, 3), dtype=np.int64)

    def fingerprint(self) -> str:
        """Changes whenever entities, texts, triples or splits change (for stale run/index detection)."""
        row = self.con.execute(
            """SELECT (SELECT count(*) FROM entities), (SELECT count(*) FROM triples),
                      (SELECT coalesce(sum(hash(head, relation, tail, split)), 0) FROM triples),
                      (SELECT coalesce(sum(hash(id, label, description)), 0) FROM entities),
                      (SELECT coalesce(sum(hash(id, label)), 0) FROM relations)"""
        ).fetchall()[0]
        import hashlib

        return hashlib.sha256(repr(row).encode()).hexdigest()[:16]

    # ---------------------------------------------------------------- runs
    def add_run(self, run_id: str, base: str, path: str, graph_fingerprint: str, config_json: str) -> None:
        self.con.execute(
            "INSERT INTO runs (id, created_at, base, status, path, graph_fingerprint, config) "
            "VALUES (?, now(), ?, 'running', ?, ?, ?)",
            [run_id, base, path, graph_fingerprint, config_json],
        )

    def update_run(self, run_id: str, *, status: str, steps: int, best_metric: float | None) -> None:
        self.con.execute(
            "UPDATE runs SET status = ?, steps = ?, best_metric = ?, finished_at = now() WHERE id = ?",
            [status, steps, best_metric, run_id],
        )

    def runs(self) -> list[dict]:
        cur = self.con.execute("SELECT * FROM runs ORDER BY created_at")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row)) for row in cur.fetchall()]

    # ---------------------------------------------------------------- queries
    def stats(self, top_relations: int | None = None) -> dict:
        c = self.con
        one = lambda sql: c.execute(sql).fetchall()[0][0]  # noqa: E731
        splits = dict(c.execute("SELECT split, count(*) FROM triples GROUP BY split").fetchall())
        rel_rows = c.execute(
            """SELECT r.key, r.label, count(t.head) AS n,
                      count(t.head) FILTER (WHERE t.split = 'train') AS train
               FROM relations r LEFT JOIN triples t ON t.relation = r.id
               GROUP BY ALL ORDER BY n DESC, r.key"""
            + (f" LIMIT {int(top_relations)}" if top_relations else "")
        ).fetchall()
        deg = c.execute(
            """WITH d AS (
                   SELECT e.id, coalesce(x.n, 0) AS n FROM entities e LEFT JOIN (
                       SELECT id, count(*) AS n FROM (SELECT head AS id FROM triples
                                                      UNION ALL SELECT tail FROM triples WHERE tail <> head)
                       GROUP BY id) x USING (id))
               SELECT min(n), quantile_disc(n, 0.5), avg(n), quantile_disc(n, 0.99), max(n),
                      count(*) FILTER (WHERE n = 0) FROM d"""
        ).fetchall()[0]
        return {
            "entities": one("SELECT count(*) FROM entities"),
            "relations": one("SELECT count(*) FROM relations"),
            "triples": one("SELECT count(*) FROM triples"),
            "splits": {s: splits.get(s, 0) for s in SPLITS},
            "attributes": one("SELECT count(*) FROM attributes"),
            "entities_with_description": one("SELECT count(*) FROM entities WHERE description IS NOT NULL"),
            "degree": {
                "min": deg[0] or 0, "median": deg[1] or 0, "mean": round(float(deg[2] or 0), 3),
                "p99": deg[3] or 0, "max": deg[4] or 0, "isolated": deg[5] or 0,
            },
            "relation_counts": [
                {"key": k, "label": lbl, "triples": n, "train": tr} for k, lbl, n, tr in rel_rows
            ],
            "ingests": [
                {"source": s, "format": f, "triples": n, "at": str(at)}
                for s, f, n, at in c.execute(
                    "SELECT source, format, triples, started_at FROM ingests ORDER BY id"
                ).fetchall()
            ],
        }

    def find_entities(self, query: str, limit: int = 10, min_similarity: float = 0.8) -> list[dict]:
        """Entities matching `query` by key or label, best first: exact key, case-insensitive label or
        key or local name, prefix, substring, then fuzzy (Jaro-Winkler) matches."""
        local = _FALLBACK_LABEL.format(k="key")
        rows = self.con.execute(
            f"""WITH c AS (
                    SELECT id, key, label, description, lower(label) AS l,
                           CASE WHEN key = $q THEN 0
                                WHEN l = lower($q) OR lower(key) = lower($q)
                                     OR lower({local}) = lower(replace($q, '_', ' ')) THEN 1
                                WHEN starts_with(l, lower($q)) THEN 2
                                WHEN contains(l, lower($q)) THEN 3 ELSE 4 END AS tier,
                           jaro_winkler_similarity(l, lower($q)) AS sim
                    FROM entities)
                SELECT id, key, label, description, tier, sim FROM c
                WHERE tier < 4 OR sim >= $min_sim
                ORDER BY tier, sim DESC, length(label), key LIMIT $limit""",
            {"q": query, "limit": limit, "min_sim": min_similarity},
        ).fetchall()
        kinds = ["key", "exact", "prefix", "substring", "fuzzy"]
        return [
            {"id": i, "key": k, "label": lbl, "description": d, "match": kinds[tier], "similarity": round(s, 3)}
            for i, k, lbl, d, tier, s in rows
        ]
