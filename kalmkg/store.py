"""The graph store: DuckDB schema, migrations and every SQL statement of the project.

Ids are dense integers assigned in key order per ingest, so embedding matrices can be indexed by them.
Uniqueness (of keys, of triples) is enforced by the merge statements, not by index constraints: ART
indexes make bulk loads slow and their memory grows with the graph.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

from kalmkg.errors import KalmkgError, WorkspaceBusy
from kalmkg.text import LOCAL_NAME_PATTERN
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
    [
        # compressed files by the hash of their own bytes (no decompression needed to know them again),
        # and the content's fingerprint each holds: one content may come in several compressions
        "CREATE TABLE source_files (file_sha256 VARCHAR NOT NULL, sha256 VARCHAR NOT NULL)",
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

# A stored text replaces the one an entity or relation has unless that fits the preferred language
# better (a later file with only a French label does not undo an English one under --lang en).
_BETTER_TEXT = (
    "lang_rank(b.lang, $lang) <= lang_rank(x.{field}_lang, $lang) AND x.{field} IS DISTINCT FROM b.value"
)


# ---------------------------------------------------------------- the SQL twins of kalmkg.text
def _local_name_sql(key: str) -> str:
    """An IRI's last segment as written (`text.LOCAL_NAME_PATTERN`; RE2 reads it as Python does)."""
    return f"regexp_extract({key}, '{LOCAL_NAME_PATTERN}', 1)"


def _fallback_label_sql(key: str) -> str:
    """`text.local_name`: a readable label from a key, the local name (or the TSV id) percent-decoded,
    '_' as spaces; the key itself when that leaves nothing."""
    name = _local_name_sql(key)
    # a name whose percent-escapes are no UTF-8 ("%AA", valid in a Turtle local name) stays as written
    return f"coalesce(nullif(trim(replace(coalesce(try(url_decode({name})), {name}), '_', ' ')), ''), {key})"


def _normalized_sql(text: str) -> str:
    """`text.normalize` (RE2 classes \\p{L} and \\p{N}: letters and digits of every script)."""
    return f"trim(regexp_replace(strip_accents(lower({text})), '[^\\p{{L}}\\p{{N}}]+', ' ', 'g'))"


@dataclass(frozen=True)
class _NameMatch:
    condition: str  # joins a name `q.t` with an entity's normalised label `e.n` or local name `e.l`
    order: str      # which candidates of a name are kept, and in what order
    score: str      # NULL: an exact match
    prefilter: str  # 'contains' or 'initial' (Store.entities_named)


# How linking (qa/retrieve.py) matches a question's names: exactly (label or local name), fuzzily
# (Jaro-Winkler of the label, lengths within 3), or as the first or last words of a longer label
# ("Apple" -> "Apple Inc.", "Einstein" -> "Albert Einstein"; shorter labels first).
_NAME_MATCHES = {
    "exact": _NameMatch("e.n = q.t OR e.l = q.t", "e.id", "NULL", "contains"),
    "fuzzy": _NameMatch(
        "abs(length(e.n) - length(q.t)) <= 3 AND jaro_winkler_similarity(e.n, q.t) >= $min_similarity",
        "jaro_winkler_similarity(e.n, q.t) DESC, e.id", "jaro_winkler_similarity(e.n, q.t)", "initial"),
    "partial": _NameMatch("starts_with(e.n, q.t || ' ') OR ends_with(e.n, ' ' || q.t)", "length(e.n), e.id", "0.9",
                          "contains"),
}


@dataclass
class MergeCounts:
    entities: int = 0
    relations: int = 0
    triples: int = 0
    attributes: int = 0
    texts_updated: int = 0


def _first_line(exc: BaseException) -> str:
    """The first line of an error's message (its type when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _no_graph(workspace: Workspace) -> KalmkgError:
    return KalmkgError(f"no graph in workspace {workspace.root} (run `kalmkg ingest FILE` first)")


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to the disk (a rename is durable once its folder is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
                raise _no_graph(workspace)
            workspace.root.mkdir(parents=True, exist_ok=True)
        with cls._connect(path, write=write or create)._session() as store:
            yield store

    @classmethod
    @contextmanager
    def edit(cls, workspace: Workspace, *, create: bool = False) -> Iterator["Store"]:
        """Write a whole command's changes into a copy of the store, which then replaces `kg.duckdb` in
        one rename: readers (`stats`, `entities`, `predict`, `ask`) keep working on the graph as it was
        while an ingest or a split runs, and a command that fails or is killed leaves the store as it was.
        DuckDB lets no other process open a file one process writes, hence the copy; it costs one file copy
        per command. Take the workspace's writer lock around it (the CLI does)."""
        from kalmkg.files import staging_dir

        path = workspace.db_path
        if not path.exists() and not create:
            raise _no_graph(workspace)
        workspace.root.mkdir(parents=True, exist_ok=True)
        if path.with_name(path.name + ".wal").exists():
            # a log of a process that died before its checkpoint: fold it into the file before copying,
            # or it would be replayed onto the new file after the swap
            with cls.open(workspace, write=True):
                pass
        # A read-only connection held to the end: a program writing the store in place (no writer lock)
        # makes this "workspace is busy" instead of being copied half-way, and cannot start meanwhile.
        guard = cls._connect(path, write=False) if path.exists() else None
        stage = staging_dir(workspace.root, ".kg.edit.")
        try:
            staged = stage / path.name
            if guard is not None:
                shutil.copyfile(path, staged)
            store = cls._connect(staged, write=True)
            store.path = path  # messages name the store the user knows
            with store._session():
                yield store
                store.con.execute("CHECKPOINT")  # everything in the file, no log left beside it
            _fsync(staged)
            os.replace(staged, path)
            _fsync(path.parent)
        finally:
            if guard is not None:
                guard.con.close()
            shutil.rmtree(stage, ignore_errors=True)

    @contextmanager
    def _session(self) -> Iterator["Store"]:
        """The schema brought up to date, errors of the disk, memory or file said in one line, closed."""
        import duckdb

        try:
            self._ensure_schema()
            yield self
        except duckdb.Error as exc:  # out of disk or memory, or a damaged file found while reading it
            problem = self._resource_problem(exc) or self._damage(exc)
            if problem is not None:
                raise problem from None
            raise
        finally:
            self.con.close()

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
        # sorts too large for the budget spill there, in read-only sessions too (training's known answers)
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
        """All or nothing: any exception (Ctrl-C included) rolls back every statement inside. A write
        the disk refuses (full, or a file size limit) or a memory budget run out is one error line."""
        self.con.execute("BEGIN TRANSACTION")
        try:
            yield
            self.con.execute("COMMIT")
        except BaseException as exc:
            try:
                self.con.execute("ROLLBACK")
            except Exception:  # a failed COMMIT has ended the transaction already
                pass
            problem = self._resource_problem(exc)
            if problem is not None:
                raise problem from None
            raise

    def _damage(self, exc: BaseException) -> KalmkgError | None:
        """A store file DuckDB cannot read back (truncated, or a block that fails its checksum)."""
        import duckdb

        text = _first_line(exc)
        damaged = ("checksum", "corrupt", "could not read enough bytes", "not a valid duckdb database")
        if isinstance(exc, duckdb.Error) and any(words in text.lower() for words in damaged):
            return KalmkgError(f"cannot read {self.path}: the store is damaged ({text}); ingest the graph again "
                               "into a new workspace")
        return None

    def _resource_problem(self, exc: BaseException) -> KalmkgError | None:
        """What to tell the user when DuckDB ran out of disk or of its memory budget; None otherwise."""
        import duckdb

        if isinstance(exc, duckdb.OutOfMemoryException):
            limit = self.con.execute("SELECT current_setting('memory_limit')").fetchall()[0][0]
            return KalmkgError(f"the store ran out of its memory budget ({limit}); set KALMKG_MEMORY_LIMIT higher "
                               "(e.g. 2GB) and run the command again (nothing of it was stored)")
        text = _first_line(exc)
        # a FatalException: the checkpoint that ends Store.edit could not write the file
        if isinstance(exc, (duckdb.IOException, duckdb.TransactionException, duckdb.FatalException)) \
                and "write" in text.lower():
            return KalmkgError(f"cannot write {self.path} ({text}); nothing of this command was stored: free "
                               "disk space and run it again")
        return None

    # ---------------------------------------------------------------- ingest
    def source_ingested(self, sha256: str) -> bool:
        """Whether a source of this fingerprint was ingested: its content's, or its compressed file's."""
        return self._scalar("""SELECT (SELECT count(*) FROM ingests WHERE sha256 = $1)
                                      + (SELECT count(*) FROM source_files WHERE file_sha256 = $1)""", [sha256]) > 0

    def log_source_file(self, file_sha256: str, sha256: str) -> None:
        """Remember that the compressed file of this hash holds the content of that fingerprint, once the
        content is in the store (a file of no triples is not)."""
        self.con.execute("""INSERT INTO source_files SELECT $1, $2
                            WHERE NOT EXISTS (SELECT 1 FROM source_files WHERE file_sha256 = $1)
                              AND EXISTS (SELECT 1 FROM ingests WHERE sha256 = $2)""",
                         [file_sha256, sha256])

    def reset_staging(self) -> None:
        """Empty staging tables. They are temporary (this connection only) and live outside the ingest
        transaction: inside one, DuckDB keeps every Arrow batch alive until the commit."""
        for name, cols in _STAGING.items():
            self.con.execute(f"CREATE OR REPLACE TEMP TABLE {name}_all (src INTEGER, {cols})")

    def unstage(self, src: int) -> None:
        """Drop what source `src` staged (it turned out to be a content ingested before)."""
        for name in _STAGING:
            self.con.execute(f"DELETE FROM {name}_all WHERE src = {int(src)}")

    def rename_staged_blank_nodes(self, src: int, old: str, new: str) -> None:
        """Give source `src`'s staged blank nodes the keys its content's fingerprint makes: every key that
        starts with `old` starts with `new` instead. The tables are written anew where they hold such a
        key (DuckDB keeps an UPDATE's changes in memory, a table it writes spills to disk)."""
        params = {"old": old, "new": new}
        for name, keys in (("stage_edges", ("h", "t")), ("stage_texts", ("key",)), ("stage_attrs", ("key",))):
            table = f"{name}_all"
            mine = f"src = {int(src)} AND ({' OR '.join(f'starts_with({k}, $old)' for k in keys)})"
            if not self._scalar(f"SELECT count(*) FROM (SELECT 1 FROM {table} WHERE {mine} LIMIT 1)", {"old": old}):
                continue
            columns = ", ".join(
                f"CASE WHEN src = {int(src)} AND starts_with({c}, $old) THEN $new || {c}[length($old) + 1:] "
                f"ELSE {c} END AS {c}" if c in keys else c
                for c in ("src", *STAGING_COLUMNS[name]))
            self.con.execute(f"CREATE OR REPLACE TEMP TABLE {table} AS SELECT {columns} FROM {table}", params)

    def stage(self, table: str, src: int, batch: "pa.Table") -> None:
        """Append an Arrow batch (columns as in STAGING_COLUMNS[table]) of source `src`."""
        import duckdb

        self.con.register("_batch", batch)
        try:
            self.con.execute(
                f"INSERT INTO {table}_all SELECT {int(src)}, {', '.join(STAGING_COLUMNS[table])} FROM _batch"
            )
        except duckdb.Error as exc:  # staging spills to disk past the memory budget
            problem = self._resource_problem(exc)
            if problem is not None:
                raise problem from None
            raise
        finally:
            self.con.unregister("_batch")

    def merge_staged(self, src: int, ingest_id: int, lang: str) -> MergeCounts:
        """Turn the staged keys of source `src` into ids and add what is new; returns what was added
        or changed. Runs inside `transaction()`, which turns running out of memory or disk into one line."""
        # Order matters: entities are told from properties by the relations added first, and texts,
        # triples and attributes find their ids among the keys added before them.
        self._select_source(src)
        self._define_lang_rank()
        counts = MergeCounts()
        counts.relations = self._add_new_relations()
        counts.entities = self._add_new_entities()
        self._choose_best_texts(lang.lower())
        counts.texts_updated = self._count_text_updates(lang.lower())
        self._apply_best_texts(lang.lower())
        counts.triples = self._add_new_triples(ingest_id)
        self._move_repeated_triples_to_train()
        counts.attributes = self._add_new_attributes(ingest_id)
        return counts

    def _scalar(self, sql: str, params: dict | list | None = None):
        return self.con.execute(sql, params).fetchall()[0][0]

    def _select_source(self, src: int) -> None:
        """Views `stage_edges`, `stage_texts`, `stage_attrs`: the staged rows of source `src`."""
        for name in _STAGING:
            self.con.execute(
                f"CREATE OR REPLACE TEMP VIEW {name} AS SELECT * EXCLUDE (src) FROM {name}_all WHERE src = {int(src)}"
            )

    def _define_lang_rank(self) -> None:
        # How well a text's language tag fits the preferred one (lower is better); NULL marks a
        # fallback label made from the key, which any real text replaces.
        self.con.execute(
            """CREATE OR REPLACE TEMP MACRO lang_rank(x, pref) AS
               CASE WHEN x IS NULL THEN 9 WHEN lower(x) = pref THEN 0
                    WHEN starts_with(lower(x), pref || '-') OR starts_with(pref, lower(x) || '-') THEN 1
                    WHEN x = '' THEN 2 ELSE 3 END"""
        )

    def _add_new_relations(self) -> int:
        """Relations for the keys used as a predicate or described as one, labelled from their key."""
        self.con.execute(
            """CREATE OR REPLACE TEMP TABLE _new_rel AS
               SELECT key FROM (SELECT DISTINCT r AS key FROM stage_edges
                                UNION SELECT key FROM stage_texts WHERE target = 'relation') s
               ANTI JOIN relations USING (key)"""
        )
        return self._scalar(
            f"""INSERT INTO relations
                SELECT (SELECT coalesce(max(id), -1) FROM relations) + row_number() OVER (ORDER BY key),
                       key, {_fallback_label_sql('key')}, NULL, NULL, NULL FROM _new_rel"""
        )

    def _add_new_entities(self) -> int:
        """Entities for the keys at either end of an edge, or described or given attributes, labelled from
        their key."""
        self.con.execute(
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
        return self._scalar(
            f"""INSERT INTO entities
                SELECT (SELECT coalesce(max(id), -1) FROM entities) + row_number() OVER (ORDER BY key),
                       key, {_fallback_label_sql('key')}, NULL, NULL, NULL, now() FROM _new_ent"""
        )

    def _choose_best_texts(self, lang: str) -> None:
        """`_best_text` (this source) and `_best_rel_text` (every source of the command): one text per
        key, field and target."""
        # The best text: preferred language, its regional variants, untagged, any; then the predicate's
        # rank; then the value, so file order never decides. Relations look at every source of the
        # command: an ontology file describing a property may come before the data file that uses it.
        for table, staged in (("_best_text", "stage_texts"), ("_best_rel_text", "stage_texts_all")):
            self.con.execute(
                f"""CREATE OR REPLACE TEMP TABLE {table} AS
                   SELECT key, target, field, lang, value FROM (
                       SELECT *, row_number() OVER (
                           PARTITION BY key, field, target ORDER BY lang_rank(lang, $lang), rank, value) AS rn
                       FROM {staged}) WHERE rn = 1""",
                {"lang": lang},
            )

    def _count_text_updates(self, lang: str) -> int:
        """Entities, other than the new ones, whose label or description the best texts change."""
        return self._scalar(
            f"""SELECT count(DISTINCT x.id) FROM _best_text b JOIN entities x ON x.key = b.key
               WHERE b.target IN ('entity', 'any') AND x.key NOT IN (SELECT key FROM _new_ent)
                 AND ((b.field = 'label' AND {_BETTER_TEXT.format(field='label')})
                      OR (b.field = 'description' AND {_BETTER_TEXT.format(field='description')}))""",
            {"lang": lang},
        )

    def _apply_best_texts(self, lang: str) -> None:
        for table, best, targets in (("entities", "_best_text", "('entity', 'any')"),
                                     ("relations", "_best_rel_text", "('relation', 'any')")):
            for field in ("label", "description"):
                touched = ", updated_at = now()" if table == "entities" else ""
                self.con.execute(
                    f"""UPDATE {table} x SET {field} = b.value, {field}_lang = b.lang{touched} FROM {best} b
                        WHERE b.key = x.key AND b.field = '{field}' AND b.target IN {targets}
                          AND {_BETTER_TEXT.format(field=field)}""",
                    {"lang": lang},
                )

    def _add_new_triples(self, ingest_id: int) -> int:
        # A triple listed in several splits is training data: evaluating on it would leak.
        return self._scalar(
            """INSERT INTO triples
               SELECT n.head, n.relation, n.tail, n.split, $ingest FROM (
                   SELECT h.id AS head, r.id AS relation, t.id AS tail,
                          arg_min(s.split, CASE s.split WHEN 'train' THEN 0 WHEN 'valid' THEN 1 ELSE 2 END) AS split
                   FROM stage_edges s
                   JOIN entities h ON h.key = s.h JOIN relations r ON r.key = s.r JOIN entities t ON t.key = s.t
                   GROUP BY ALL) n
               ANTI JOIN triples o ON o.head = n.head AND o.relation = n.relation AND o.tail = n.tail""",
            {"ingest": ingest_id},
        )

    def _move_repeated_triples_to_train(self) -> None:
        # ... also when an earlier ingest put it in valid or test.
        self.con.execute(
            """UPDATE triples SET split = 'train' FROM stage_edges s
               JOIN entities h ON h.key = s.h JOIN relations r ON r.key = s.r JOIN entities t ON t.key = s.t
               WHERE s.split = 'train' AND triples.split <> 'train'
                 AND triples.head = h.id AND triples.relation = r.id AND triples.tail = t.id"""
        )

    def _add_new_attributes(self, ingest_id: int) -> int:
        return self._scalar(
            """INSERT INTO attributes
               SELECT n.*, $ingest FROM (
                   SELECT DISTINCT e.id AS entity, a.predicate, a.value,
                          coalesce(a.datatype, '') AS datatype, coalesce(a.lang, '') AS lang
                   FROM stage_attrs a JOIN entities e ON e.key = a.key) n
               ANTI JOIN attributes o ON o.entity = n.entity AND o.predicate = n.predicate
                    AND o.value = n.value AND o.datatype = n.datatype AND o.lang = n.lang""",
            {"ingest": ingest_id},
        )

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

    def write_triples(self, path: Path, splits: tuple[str, ...] = SPLITS, *, inverses_of: int | None = None,
                      batch_rows: int = 1 << 20) -> None:
        """`triples_array(splits)` written to a `.npy` file in pieces (npy.py), so a graph of any size passes
        through a fixed amount of memory. `inverses_of` (the relation count R): the triples, then their
        inverses (t, r + R, h) in the same order, which are training's (query, relation, answer) examples."""
        from kalmkg.npy import NpyWriter

        placeholders = ", ".join("?" for _ in splits)
        select = "SELECT {} FROM triples WHERE split IN (" + placeholders + ") ORDER BY head, relation, tail"
        columns = ["head, relation, tail"] + ([] if inverses_of is None else [f"tail, relation + {int(inverses_of)}, head"])
        with NpyWriter(path, "int64", (3,)) as out:
            for cols in columns:
                for batch in self._batches(select.format(cols), list(splits), batch_rows):
                    out.write(batch)

    def write_known_answers(self, folder: Path, splits: tuple[str, ...], num_relations: int, *,
                            batch_rows: int = 1 << 20) -> None:
        """The true answers of every (query, relation) of the splits, both directions ((h, r) -> t and
        (t, r + R) -> h), as the three sorted arrays of `evaluation.metrics.KnownAnswers` in `folder`:
        DuckDB sorts within its memory budget (spilling beyond it), the arrays are written in pieces."""
        import numpy as np

        from kalmkg.npy import NpyWriter

        width, placeholders = max(2 * num_relations, 1), ", ".join("?" for _ in splits)
        pairs = (f"SELECT head * {width} + relation AS key, tail AS answer FROM triples WHERE split IN ({placeholders}) "
                 f"UNION SELECT tail * {width} + relation + {int(num_relations)}, head FROM triples "
                 f"WHERE split IN ({placeholders})")
        folder.mkdir(parents=True, exist_ok=True)
        with NpyWriter(folder / "keys.npy", "int64") as keys, NpyWriter(folder / "starts.npy", "int64") as starts, \
                NpyWriter(folder / "answers.npy", "int64") as answers:
            last, count = None, 0  # the last key seen and where its answers start
            for batch in self._batches(f"SELECT key, answer FROM ({pairs}) ORDER BY key, answer", list(splits) * 2,
                                      batch_rows):
                key, answer = batch[:, 0], batch[:, 1]
                fresh = np.ones(len(key), dtype=bool)
                fresh[1:] = key[1:] != key[:-1]
                if last is not None and len(key):
                    fresh[0] = key[0] != last
                keys.write(key[fresh])
                starts.write(count + np.flatnonzero(fresh))
                answers.write(answer)
                count += len(key)
                last = key[-1] if len(key) else last
            starts.write(np.asarray([count]))
            np.save(folder / "width.npy", np.asarray(width))

    def _batches(self, sql: str, params: list, rows: int = 1 << 20):
        """The rows of an integer query as [m, columns] int64 arrays of at most `rows` rows each."""
        import numpy as np

        reader = self.con.sql(sql, params=params).to_arrow_reader(rows)
        for batch in reader:
            if batch.num_rows:
                yield np.stack([c.to_numpy(zero_copy_only=False) for c in batch.columns], axis=1).astype(np.int64)

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

    def run_status(self, run_id: str) -> str | None:
        """running (or killed while running), finished, interrupted; None for a run the store never saw."""
        row = self.con.execute("SELECT status FROM runs WHERE id = ?", [run_id]).fetchone()
        return row[0] if row else None

    def read_only_query(self, sql: str) -> tuple[list[str], list[tuple]]:
        """A user's SQL statement (`kalmkg sql`): columns and rows. On a read-only connection with no
        access to files or other databases, locked so the statement cannot lift that."""
        import duckdb

        if self.writable:
            raise KalmkgError("read_only_query needs a store opened for reading")
        self.con.execute("SET enable_external_access = false")
        self.con.execute("SET lock_configuration = true")
        try:
            cursor = self.con.execute(sql)
            columns = [d[0] for d in cursor.description or []]
            return columns, cursor.fetchall()
        except duckdb.Error as exc:
            raise KalmkgError(f"SQL: {' '.join(str(exc).split())}") from None

    def run_statuses(self) -> dict[str, str]:
        """Every run the store saw, by id: its status."""
        return dict(self.con.execute("SELECT id, status FROM runs").fetchall())

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
        local = _fallback_label_sql("key")
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

    # ---------------------------------------------------------------- reads for question answering
    def entities_named(self, texts: Sequence[str], match: str, *, per_text: int,
                       min_similarity: float = 0.0) -> list[tuple]:
        """(text, id, key, label, description, score) of the entities a name matches, for each of `texts`
        (names already `text.normalize`d), at most `per_text` of them, best first (see `_NAME_MATCHES`
        for `match`): a name thousands of entities share must not flood linking.

        Normalising every label is the cost on a large graph, so a cheap necessary condition picks the
        rows to normalise first: `contains` -- the label or key contains one of the texts' words (true
        of every exact or partial match); `initial` -- the label starts with the first two letters of a
        text (fuzzy: a typo in the first two letters of a name is not corrected)."""
        spec = _NAME_MATCHES[match]
        texts = sorted(set(texts))
        if not texts:
            return []
        params: dict = {"texts": texts, "cap": per_text}
        folded = "strip_accents(lower({x}))"
        if spec.prefilter == "contains":
            words = sorted({w for t in texts for w in t.split()}, key=len, reverse=True)
            where = (f"regexp_matches({folded.format(x='label')}, $alt) OR "
                     f"regexp_matches({folded.format(x='key')}, $alt)")
            params["alt"] = "|".join(re.escape(w) for w in words)
        else:
            where = f"list_contains($initials, left({folded.format(x='label')}, 2))"
            params["initials"] = sorted({t[:2] for t in texts})
        if "$min_similarity" in spec.condition:
            params["min_similarity"] = min_similarity
        local = _normalized_sql(f"replace({_local_name_sql('key')}, '_', ' ')")
        return self.con.execute(
            f"""WITH q AS (SELECT unnest($texts) AS t),
                     e AS (SELECT id, key, label, description, {_normalized_sql('label')} AS n, {local} AS l
                           FROM entities WHERE {where})
                SELECT q.t, e.id, e.key, e.label, e.description, {spec.score} AS s FROM q JOIN e ON {spec.condition}
                QUALIFY row_number() OVER (PARTITION BY q.t ORDER BY {spec.order}) <= $cap
                ORDER BY q.t, {spec.order}""",
            params,
        ).fetchall()

    def neighbour_triples(self, entities: Sequence[int], relation_scores: Sequence[float], cap: int) -> list[tuple]:
        """(near, head, relation, tail, head label, relation label, tail label, head key, relation key,
        tail key) of the distinct triples (any split) each of `entities` is the head or tail of: at most
        `cap` per entity, those whose relation scores highest in `relation_scores` (by relation id) first,
        then by ids, so the choice is deterministic."""
        if not len(entities):
            return []
        return self.con.execute(
            """WITH s AS (SELECT unnest($ids) AS e),
                    d AS (SELECT DISTINCT s.e AS near, head, relation, tail FROM triples, s
                          WHERE head = s.e OR tail = s.e),
                    n AS (SELECT *, coalesce(list_extract($scores, relation + 1), 0) AS rs FROM d
                          QUALIFY row_number() OVER (PARTITION BY near ORDER BY rs DESC, head, relation, tail) <= $cap)
               SELECT t.near, t.head, t.relation, t.tail, h.label, r.label, x.label, h.key, r.key, x.key
               FROM n t JOIN entities h ON h.id = t.head JOIN relations r ON r.id = t.relation
                        JOIN entities x ON x.id = t.tail
               ORDER BY t.near, t.rs DESC, t.head, t.relation, t.tail""",
            {"ids": [int(e) for e in entities], "scores": [float(x) for x in relation_scores], "cap": cap},
        ).fetchall()

    def relation_labels(self) -> list[tuple[int, str, str]]:
        """(id, label, description or '') of every relation, by id."""
        return self.con.execute("SELECT id, label, coalesce(description, '') FROM relations ORDER BY id").fetchall()
