"""Entity vectors in LanceDB: one table `entities` in `<workspace>/vectors.lance/`, and search over it.

Rows: entity id, key, label, a hash of the entity's text (its tail view, before the model's token cut),
and the L2-normalised vector. What built the table is kept as metadata of the vector field
(`kalmkg:model` = "run:<id>" or "base:<fp>", `kalmkg:weights`, `kalmkg:graph`, ...): LanceDB 0.40's Python
API updates a field's metadata in place (`update_field_metadata`) but has no in-place update of the
schema-level metadata, and an incremental embed has to change `kalmkg:graph` without rewriting the table.

Freshness, checked whenever the table is opened for a model:
- another model (run id or base fingerprint) or other weights (a resumed run) -> stale, re-embed;
- the graph's entity texts: `kalmkg:graph` is a hash over every entity's row hash; when it differs from
  the store's, the rows are compared one by one to say how many entities are new or changed.
A stale table is never searched; the error tells the user to run `kalmkg embed`, which then encodes
only the entities whose row hash is new or different (ids are dense and never reused by the store).

Writes are safe to interrupt: rows are written first and `kalmkg:graph` last, so a killed embed leaves a
table that reads as stale, and the next embed picks up where it stopped.

Search: exact (one matrix product over the vectors held in memory) below `ANN_THRESHOLD` rows, where it
is both exact and faster than LanceDB's flat scan (about 10 ms against 100 ms for 41k x 576 on 2 cores);
above it an IVF_HNSW_SQ index (cosine) built at the end of `embed`, queried with a re-ranking step on
the full vectors, so scores stay exact cosines. For exact search `embed` also leaves a snapshot beside
the table (the vectors as `entities.exact.npy`, the table's metadata as `entities.exact.json`, written
after the table, its metadata last): `open` reads it without importing LanceDB when its metadata passes
the same freshness checks, and falls back to the table otherwise.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Callable, Sequence

import numpy as np

from kalmkg.encode import Encoder
from kalmkg.errors import KalmkgError
from kalmkg.loaded import torch_encoder
from kalmkg.files import atomic_write_text
from kalmkg.text import tail_view
from kalmkg.workspace import Workspace

TABLE = "entities"
FORMAT = "1"  # bump when rows or metadata change meaning: older tables then read as stale
ANN_THRESHOLD = 100_000
META = "kalmkg:"
# Rows per IVF partition, each with its own HNSW graph: graphs of 10k rows build in a fraction of the
# time of one large graph, and a query probes three quarters of them (bench/ann_build.py, clustered
# vectors: 100k rows 47 s against 95 s as one graph, 300k rows 121 s against 322 s; recall@10 .998-1.0).
_ROWS_PER_PARTITION = 10_000
_LEGACY_ROWS_PER_PARTITION = 1_000_000  # tables indexed before the partition count was stamped
ANN_PROBE_SHARE = 0.75
RERANK_POOL = 256  # ANN candidates re-ranked with the structure model's share
_ENCODE_CHUNK = 16  # batches per encoder call (one progress step)
_WRITE_ROWS = 8192  # rows per LanceDB commit while (re)building


def _lancedb():
    # LanceDB's Rust logger warns on ordinary operations ("No existing dataset ..."); kalmkg prints its
    # own messages. Set before the first import: the logger reads it once.
    os.environ.setdefault("LANCEDB_LOG", "error")
    import lancedb

    return lancedb


# ------------------------------------------------------------------ row identity
def entity_hashes(keys: Sequence[str], texts: Sequence[str]) -> list[str]:
    """Per entity: a hash of its key and its tail view before the text is cut to the model's token limit
    (the limit and tokenizer belong to the model, checked apart; hashing uncut texts spares tokenizing
    every entity to check freshness, at the price of re-encoding an entity whose text changed only
    beyond the cut)."""
    return [hashlib.sha1(f"{k}\x00{tail_view(t)}".encode()).hexdigest()[:16] for k, t in zip(keys, texts)]


def graph_hash(hashes: Sequence[str]) -> str:
    """One hash over every row hash, in id order (ids are dense: position = id)."""
    return hashlib.sha256("\n".join(hashes).encode()).hexdigest()[:16]


def _current(loaded) -> tuple[list[str], list[str]]:
    keys = list(loaded.entity_keys)
    if len(keys) != len(loaded.raw_texts):
        raise KalmkgError("internal: entity keys and texts of the loaded model differ in length")
    return keys, entity_hashes(keys, loaded.raw_texts)


# ------------------------------------------------------------------ metadata
def _read_meta(table) -> dict[str, str]:
    raw = table.schema.field("vector").metadata or {}
    return {k.decode()[len(META):]: v.decode() for k, v in raw.items() if k.decode().startswith(META)}


def _meta_fields(values: dict[str, str]) -> dict[str, str]:
    return {META + k: str(v) for k, v in values.items()}


def _open_table(workspace: Workspace):
    if not workspace.vectors_dir.exists():
        return None
    db = _lancedb().connect(str(workspace.vectors_dir))
    if TABLE not in db.list_tables().tables:
        return None
    return db.open_table(TABLE)


def _vector_index(table):
    """The table's index on the vector column (LanceDB's IndexConfig), or None."""
    return next((ix for ix in table.list_indices() if "vector" in ix.columns), None)


def _unindexed_rows(table) -> int:
    ix = _vector_index(table)
    stats = table.index_stats(ix.name) if ix is not None else None
    return stats.num_unindexed_rows if stats is not None else 0


def _has_ann(table) -> str | None:
    ix = _vector_index(table)
    return ix.index_type if ix is not None else None


def _staleness(meta: dict[str, str], loaded) -> str | None:
    """Why a table's model does not fit `loaded` (None when it does)."""
    if meta.get("format") != FORMAT:
        return "the entity index was written by another kalmkg version; run `kalmkg embed`"
    if meta.get("model") != loaded.fingerprint:
        built = meta.get("model", "?")
        what = f"run {built[4:]}" if built.startswith("run:") else f"the untrained base {meta.get('name', built)}"
        return (f"the entity index was built with {what}, not {_describe(loaded)}; "
                f"run `{loaded.embed_command()}`")
    if meta.get("weights") != loaded.weights:
        return (f"the weights of {_describe(loaded)} changed since the entity index was built "
                f"(a resumed run?); run `{loaded.embed_command()}`")
    return None


def _describe(loaded) -> str:
    return f"the untrained base {loaded.name}" if loaded.is_base else f"run {loaded.name}"


# ------------------------------------------------------------------ embed
@dataclass
class EmbedResult:
    encoded: int  # entities encoded in this call
    unchanged: int  # rows kept as they were
    removed: int  # rows of entities the store no longer has
    total: int  # rows now
    rebuilt: bool  # everything was (re)encoded: no table, another model, or --full
    ann: str | None  # the ANN index type, or None (exact search)
    dim: int
    seconds: float
    encode_seconds: float


def embed(workspace: Workspace, loaded, encoder: Encoder | None = None, *, batch_size: int = 64,
          full: bool = False, ann_threshold: int = ANN_THRESHOLD, progress: Callable[[int, int], None] | None = None,
          backend: str = "torch") -> EmbedResult:
    """Encode every entity that is new or changed (all of them for another model or `full`) as a tail
    view and write the vectors; build the ANN index once the table reaches `ann_threshold` rows.

    `encoder`: any `kalmkg.encode.Encoder`; default: the torch backend of `loaded`. `progress(done, total)`
    is called after every encoder call.
    """
    t_start = time.perf_counter()
    keys, hashes = _current(loaded)
    n = len(keys)
    if n == 0:
        raise KalmkgError("the graph has no entities to embed (run `kalmkg ingest FILE` first)")
    table = _open_table(workspace)
    meta = _read_meta(table) if table is not None else {}
    # vectors of another backend (torch vs a GGUF) or precision are near, not equal: one table holds
    # one backend's, and one precision's
    precision = loaded.precision if backend == "torch" else "gguf"
    built_in = meta.get("precision") or ("fp32" if meta.get("backend", "torch") == "torch" else "gguf")  # older tables
    rebuild = full or table is None or _staleness(meta, loaded) is not None or \
        meta.get("backend", "torch") != backend or built_in != precision

    # which rows to (re)write
    todo, removed = list(range(n)), 0
    if not rebuild:
        stored = _id_hash(table)
        todo = [i for i in range(n) if stored.get(i) != hashes[i]]
        removed = _drop_removed(table, stored, n)
        if not (todo or removed) and meta.get("graph") == graph_hash(hashes) and \
                (n < ann_threshold or _has_ann(table)):  # up to date: no new table version
            if _open_snapshot(workspace, loaded) is None:  # a table written before snapshots existed
                _write_snapshot(workspace, None if _has_ann(table) else table)
            return EmbedResult(0, n, 0, n, False, _has_ann(table), int(meta.get("dim", 0)),
                               time.perf_counter() - t_start, 0.0)

    # encode them, writing as it goes; the snapshot stops claiming to be valid before the table changes
    (workspace.vectors_dir / SNAPSHOT_META).unlink(missing_ok=True)
    if encoder is None and todo:  # nothing to encode: the weights never load
        encoder = torch_encoder(loaded)
    base_meta = {"format": FORMAT, "model": loaded.fingerprint, "weights": loaded.weights, "name": loaded.name,
                 "backend": backend, "precision": precision, "max_entity_tokens": str(loaded.max_entity_tokens)}
    writer = _TableWriter(workspace, _RowFields(keys, list(loaded.entity_labels or keys), hashes), base_meta,
                          table=None if rebuild else table, dim=0 if rebuild else int(meta.get("dim", 0)))
    encode_s = _encode_into(writer, encoder, todo, loaded, batch_size, progress)

    # compact, index and stamp the table
    table = writer.table
    if _has_ann(table) is None or todo or removed or _unindexed_rows(table):
        # Old versions hold whole copies after a rebuild, and every write adds small files: compact, and
        # drop versions older than an hour (a reader that opened one just now keeps its files); with an
        # ANN index this also folds the changed rows into it. Before any index is built: optimizing a
        # fresh index again rewrites its graphs, which took longer than the build (100k rows: 95 s).
        # Rows left outside an index (an embed stopped while folding them in) are folded in now.
        table.optimize(cleanup_older_than=timedelta(hours=1))
    ann, partitions = _update_ann(table, n, ann_threshold, partitions=None if rebuild else meta.get("ann_partitions"))
    table.update_field_metadata({"path": "vector", "metadata": _meta_fields({
        **base_meta, "dim": str(writer.dim), "graph": graph_hash(hashes), "store": loaded.graph_fingerprint,
        "rows": str(n), "updated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **({"ann_partitions": partitions} if partitions else {}),
    })})
    _write_snapshot(workspace, table if ann is None else None)
    return EmbedResult(len(todo), n - len(todo), removed, n, rebuild, ann, writer.dim,
                       time.perf_counter() - t_start, encode_s)


def _drop_removed(table, stored: dict[int, str], n: int) -> int:
    """Delete the rows of entity ids >= n (the store no longer has them); how many there were."""
    gone = sum(1 for i in stored if i >= n)
    if gone:  # only when a workspace was rebuilt under the same model; ids are never reused otherwise
        table.delete(f"id >= {n}")
    return gone


@dataclass(frozen=True)
class _RowFields:
    """What a row holds besides its vector, by entity id."""

    keys: list[str]
    labels: list[str]
    hashes: list[str]


class _TableWriter:
    """Collects encoded rows and writes them `_WRITE_ROWS` at a time: the first write of a rebuild
    creates the table (replacing a stale one) with its graph hash 'pending', later ones append to it; an
    incremental embed merges rows by id into the table it has, whose graph hash is the old graph's. Either
    way an interrupted embed leaves a table that reads as stale until an embed completes."""

    def __init__(self, workspace: Workspace, fields: _RowFields, base_meta: dict[str, str], *, table, dim: int):
        self.workspace = workspace
        self.fields = fields
        self.base_meta = base_meta
        self.table = table  # None: created by the first write
        # A table this writer created holds only rows it wrote, each once: appending is enough. Merging by
        # id joins every batch against the whole table, which grows quadratically over a rebuild.
        self._appending = table is None
        self.dim = dim  # 0: set by the first vectors
        self._pending: list[tuple[list[int], np.ndarray]] = []
        self._pending_rows = 0

    def add(self, ids: list[int], vectors: np.ndarray) -> None:
        if self.dim and vectors.shape[1] != self.dim:
            raise KalmkgError(f"the encoder gives {vectors.shape[1]}-dim vectors but the index holds {self.dim}-dim "
                              "ones; run `kalmkg embed --full`")
        self.dim = vectors.shape[1]
        self._pending.append((ids, vectors))
        self._pending_rows += len(ids)
        if self._pending_rows >= _WRITE_ROWS:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        batch = self._batch()
        if self.table is None:
            db = _lancedb().connect(str(self.workspace.vectors_dir))
            self.table = db.create_table(TABLE, data=batch, schema=batch.schema, mode="overwrite")
        elif self._appending:
            self.table.add(batch)
        else:
            self.table.merge_insert("id").when_matched_update_all().when_not_matched_insert_all().execute(batch)
        self._pending, self._pending_rows = [], 0

    def _batch(self):
        import pyarrow as pa

        ids = [i for chunk_ids, _ in self._pending for i in chunk_ids]
        vecs = np.concatenate([v for _, v in self._pending]).astype(np.float32, copy=False)
        f = self.fields
        schema = _schema(self.dim, _meta_fields({**self.base_meta, "dim": str(self.dim), "graph": "pending"}))
        return pa.table({
            "id": pa.array(ids, pa.int32()), "key": [f.keys[i] for i in ids], "label": [f.labels[i] for i in ids],
            "hash": [f.hashes[i] for i in ids],
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1), pa.float32()), self.dim),
        }, schema=schema)


def _encode_into(writer: _TableWriter, encoder: Encoder, ids: list[int], loaded, batch_size: int,
                 progress: Callable[[int, int], None] | None) -> float:
    """Encode the tail views of entities `ids` `batch_size * _ENCODE_CHUNK` at a time into `writer`; the
    seconds spent in the encoder."""
    # Length-sorted (the uncut text's characters stand in for tokens) so every encoder call pads little;
    # the torch encoder sorts again by tokens inside a call. Texts are cut per call, so a million entities'
    # cut texts are never held at once.
    raw = loaded.raw_texts
    order = np.asarray(ids, dtype=np.int64)[np.argsort([len(raw[i]) for i in ids], kind="stable")]
    step = max(1, batch_size * _ENCODE_CHUNK)
    seconds = 0.0
    if progress:
        progress(0, len(ids))
    for start in range(0, len(order), step):
        part = order[start:start + step].tolist()
        texts = [tail_view(t) for t in loaded.entity_texts(part)]
        t0 = time.perf_counter()
        vecs = np.asarray(encoder.encode(texts, batch_size), dtype=np.float32)
        seconds += time.perf_counter() - t0
        if vecs.ndim != 2 or len(vecs) != len(part):
            raise KalmkgError(f"internal: the encoder returned {vecs.shape} for {len(part)} texts")
        writer.add(part, vecs)
        if progress:
            progress(min(start + step, len(ids)), len(ids))
    writer.flush()
    return seconds


def _update_ann(table, rows: int, ann_threshold: int, *, partitions: str | None) -> tuple[str | None, str | None]:
    """Build the ANN index once the table reaches `ann_threshold` rows; the index type (None: exact
    search) and its partition count (as the metadata holds it)."""
    ann = _has_ann(table)
    if rows >= ann_threshold and ann is None:
        _build_ann(table, rows)
        return _has_ann(table), str(ann_partitions(rows))
    return ann, partitions if ann is not None else None


def _schema(dim: int, field_meta: dict[str, str]):
    import pyarrow as pa

    return pa.schema([
        pa.field("id", pa.int32(), nullable=False), pa.field("key", pa.string()), pa.field("label", pa.string()),
        pa.field("hash", pa.string()), pa.field("vector", pa.list_(pa.float32(), dim), metadata=field_meta),
    ])


def _id_hash(table) -> dict[int, str]:
    rows = table.search().select(["id", "hash"]).limit(None).to_arrow()
    return dict(zip(rows["id"].to_pylist(), rows["hash"].to_pylist()))


def ann_partitions(rows: int) -> int:
    return max(1, -(-rows // _ROWS_PER_PARTITION))


def ann_probes(meta: dict[str, str], rows: int) -> int:
    """Partitions a query probes: a share of those the index was built with (tables built before the
    count was stamped: the rule of then, which probed them all)."""
    if "ann_partitions" not in meta:
        return max(1, rows // _LEGACY_ROWS_PER_PARTITION)
    return max(1, math.ceil(ANN_PROBE_SHARE * int(meta["ann_partitions"])))


def _build_ann(table, rows: int) -> None:
    from lancedb.index import HnswSq

    table.create_index("vector", config=HnswSq(distance_type="cosine", num_partitions=ann_partitions(rows)))


# ------------------------------------------------------------------ the exact-search snapshot
# Below the ANN threshold search is exact over every vector, so a query needs the vectors and the
# table's metadata, nothing else: `embed` also writes them as a plain array and a JSON file, and `open`
# reads those without importing LanceDB (1.2 s of a cold `kalmkg predict`). The snapshot carries the
# same metadata the table does and is checked the same way, so a snapshot that does not fit the model
# and graph of the moment is never read; LanceDB stays the store of record.
SNAPSHOT_VECTORS = "entities.exact.npy"
SNAPSHOT_META = "entities.exact.json"


def _write_snapshot(workspace: Workspace, table) -> None:
    """The snapshot of an exact-search table (`table` None: an ANN index; any snapshot is removed)."""
    vectors_path, meta_path = workspace.vectors_dir / SNAPSHOT_VECTORS, workspace.vectors_dir / SNAPSHOT_META
    meta_path.unlink(missing_ok=True)  # the metadata goes first and comes last: it is what says "valid"
    if table is None:
        vectors_path.unlink(missing_ok=True)
        return
    meta = _read_meta(table)
    vectors = EntityIndex(table, meta, None).vectors()
    tmp = vectors_path.with_suffix(".tmp.npy")
    np.save(tmp, vectors)
    os.replace(tmp, vectors_path)
    atomic_write_text(meta_path, json.dumps({**meta, "snapshot_rows": len(vectors)}, sort_keys=True))


def _snapshot_meta(workspace: Workspace, loaded) -> dict | None:
    """The snapshot's metadata when it fits `loaded` and the current graph; else None."""
    try:
        meta = json.loads((workspace.vectors_dir / SNAPSHOT_META).read_text())
        fresh = not _staleness(meta, loaded) and meta.get("graph") == graph_hash(_current(loaded)[1])
    except Exception:  # a missing, partial or damaged snapshot
        return None
    return meta if fresh else None


def _open_snapshot(workspace: Workspace, loaded) -> "EntityIndex | None":
    """The index from its snapshot when one fits `loaded` and the current graph; else None."""
    meta = _snapshot_meta(workspace, loaded)
    if meta is None:
        return None
    try:
        vectors = np.load(workspace.vectors_dir / SNAPSHOT_VECTORS)  # in memory, writable, as the table's
        if vectors.shape != (int(meta["rows"]), int(meta["dim"])) or int(meta["snapshot_rows"]) != len(vectors):
            return None
    except Exception:  # a missing, partial or damaged snapshot: the table is the store of record
        return None
    index = EntityIndex(None, meta, None, workspace)
    index._vectors = vectors
    return index


# ------------------------------------------------------------------ open and search
class EntityIndex:
    """A fresh entity table for one model; `search` ranks entities by cosine similarity."""

    def __init__(self, table, meta: dict[str, str], ann: str | None, workspace: Workspace | None = None):
        self._table = table  # None: opened from the snapshot; LanceDB is opened when first needed
        self._workspace = workspace
        self.meta = meta
        self.ann = ann
        self._vectors: np.ndarray | None = None

    @property
    def table(self):
        if self._table is None and self._workspace is not None:
            self._table = _open_table(self._workspace)
        return self._table

    @property
    def rows(self) -> int:
        return int(self.meta.get("rows", 0))

    @property
    def dim(self) -> int:
        return int(self.meta.get("dim", 0))

    @classmethod
    def open(cls, workspace: Workspace, loaded) -> "EntityIndex":
        """The index built for `loaded` over the current graph; KalmkgError when missing or stale."""
        snapshot = _open_snapshot(workspace, loaded)
        if snapshot is not None:
            return snapshot
        table = _open_table(workspace)
        if table is None:
            raise KalmkgError(f"no entity index in {workspace.root}; run `{loaded.embed_command()}` first")
        meta = _read_meta(table)
        reason = _staleness(meta, loaded)
        if reason:
            raise KalmkgError(reason)
        _, hashes = _current(loaded)
        if meta.get("graph") != graph_hash(hashes):
            raise KalmkgError(_graph_change(table, hashes, loaded))
        return cls(table, meta, _has_ann(table))

    @classmethod
    def try_open(cls, workspace: Workspace, loaded) -> tuple["EntityIndex | None", str | None]:
        """(index, None) when fresh, else (None, why not)."""
        try:
            return cls.open(workspace, loaded), None
        except KalmkgError as e:
            return None, str(e)

    def vectors(self) -> np.ndarray:
        """[rows, D] float32, row i = entity id i (read once, then kept)."""
        if self._vectors is None:
            data = self.table.search().select(["id", "vector"]).limit(None).to_arrow()
            ids = data["id"].to_numpy()
            flat = data["vector"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
            vecs = np.asarray(flat, dtype=np.float32).reshape(len(ids), -1)
            out = np.empty_like(vecs)
            out[ids] = vecs
            self._vectors = out
        return self._vectors

    def search(self, queries: np.ndarray, k: int, exclude: Sequence[Sequence[int]] | None = None,
               exact: bool | None = None, extra: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k entity ids and cosine scores per query row ([B, D] -> [B, k], [B, k]), best first.

        `exclude[b]` lists entity ids never returned for query b. Exact below the ANN threshold (or with
        `exact=True`); rows of fewer than k results (tiny graphs) are padded with id -1, score -inf.
        `extra` [B, rows] is added to the cosines before ranking (the structure model's share; with an
        ANN index it re-ranks the best RERANK_POOL by cosine).
        """
        q = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        q = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        exclude = exclude or [()] * len(q)
        if exact or (exact is None and self.ann is None):
            return _exact_topk(q, self.vectors(), k, exclude, extra)
        return self._ann_topk(q, k, exclude, extra)

    def _ann_topk(self, q: np.ndarray, k: int, exclude, extra=None) -> tuple[np.ndarray, np.ndarray]:
        probes = ann_probes(self.meta, self.rows)
        ids = np.full((len(q), k), -1, dtype=np.int64)
        scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        for b, vec in enumerate(q):
            skip = set(int(x) for x in exclude[b])
            limit = (k if extra is None else max(k, RERANK_POOL)) + len(skip)
            res = (self.table.search(vec).distance_type("cosine").limit(limit).select(["id", "_distance"])
                   .nprobes(probes).ef(max(200, 4 * limit)).refine_factor(4).to_arrow())
            shift = extra[b] if extra is not None else np.zeros(self.rows, dtype=np.float32)
            got = [(i, 1.0 - d + float(shift[i])) for i, d in zip(res["id"].to_pylist(), res["_distance"].to_pylist())
                   if i not in skip]
            got.sort(key=lambda x: (-x[1], x[0]))
            for j, (i, s) in enumerate(got[:k]):
                ids[b, j], scores[b, j] = i, s
        return ids, scores


def _exact_topk(q: np.ndarray, vectors: np.ndarray, k: int, exclude, extra=None) -> tuple[np.ndarray, np.ndarray]:
    scores = q @ vectors.T
    if extra is not None:
        scores += extra
    for b, skip in enumerate(exclude):
        if len(skip):
            scores[b, list(skip)] = -np.inf
    n = scores.shape[1]
    kk = min(k, n)
    top = np.argpartition(-scores, kk - 1, axis=1)[:, :kk] if kk < n else np.tile(np.arange(n), (len(q), 1))
    ids = np.full((len(q), k), -1, dtype=np.int64)
    out = np.full((len(q), k), -np.inf, dtype=np.float32)
    for b in range(len(q)):
        cand = top[b]
        cand = cand[np.isfinite(scores[b, cand])]
        cand = cand[np.lexsort((cand, -scores[b, cand]))]  # best first; ties by id, so results are stable
        ids[b, :len(cand)] = cand
        out[b, :len(cand)] = scores[b, cand]
    return ids, out


def _graph_change(table, hashes: list[str], loaded) -> str:
    old = _id_hash(table)
    new = sum(1 for i in range(len(hashes)) if i not in old)
    changed = sum(1 for i, h in enumerate(hashes) if i in old and old[i] != h)
    gone = sum(1 for i in old if i >= len(hashes))
    parts = [f"{new:,} new" if new else "", f"{changed:,} changed" if changed else "",
             f"{gone:,} removed" if gone else ""]
    what = ", ".join(p for p in parts if p) or "some"
    return (f"the entity index is stale: the graph changed since it was built ({what} entities); "
            f"run `{loaded.embed_command()}` (it encodes only those)")
