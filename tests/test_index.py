"""The entity index (`kalmkg.index`) on a tiny trained run: what `embed` writes, incremental re-embedding
after an ingest (counting what the encoder is asked to encode), stale-index detection (changed texts,
another run, changed weights, an interrupted embed), and ANN search against exact search."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from helpers_graph import PREFIXES, ingest_into, write
from kalmkg.errors import KalmkgError
from kalmkg.workspace import Workspace

KG = "http://example.org/kg/"


@pytest.fixture()
def ws(tiny_run_ws) -> Workspace:
    """A private copy of the tiny trained run (see conftest)."""
    return tiny_run_ws


class Counting:
    """An Encoder that records every text it is asked to encode."""

    def __init__(self, inner):
        self.inner = inner
        self.texts: list[str] = []

    def encode(self, texts, batch_size=64):
        self.texts += list(texts)
        return self.inner.encode(texts, batch_size)


def load(ws, **kw):
    from kalmkg.loaded import load_model

    return load_model(ws, **kw)


def counting(loaded) -> Counting:
    from kalmkg.loaded import torch_encoder

    return Counting(torch_encoder(loaded))


# ---------------------------------------------------------------------------------------------------------
def test_embed_writes_every_entity_with_its_model_and_graph(ws):
    from kalmkg.index import EntityIndex, embed
    from kalmkg.text import tail_view

    loaded = load(ws)
    enc = counting(loaded)
    result = embed(ws, loaded, enc, batch_size=16)
    n = len(loaded.entity_keys)
    assert (result.encoded, result.total, result.rebuilt, result.ann, result.dim) == (n, n, True, None, 32)
    assert sorted(enc.texts) == sorted(tail_view(t) for t in loaded.texts.entities)

    index = EntityIndex.open(ws, loaded)  # fresh: a missing or stale index does not open
    status = index.meta
    assert index.table.count_rows() == index.rows == n
    assert (status["model"], status["weights"], status["format"]) == ("run:r", loaded.weights, "1")
    assert status["store"] == loaded.graph_fingerprint and len(status["graph"]) == 16

    vectors = index.vectors()
    assert vectors.shape == (n, 32)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    # row i is entity i, and it is the tail view's vector (length-sorted encoding keeps the order straight)
    paris = loaded.entity_keys.index(KG + "Paris")
    direct = enc.inner.encode([tail_view(loaded.texts.entities[paris])], 1)[0]
    np.testing.assert_allclose(vectors[paris], direct, atol=1e-5)
    rows = index.table.search().where(f"id = {paris}").select(["key", "label"]).to_arrow()
    assert rows["key"].to_pylist() == [KG + "Paris"] and rows["label"].to_pylist() == ["Paris"]

    fresh = load(ws)
    again = embed(ws, fresh)
    assert (again.encoded, again.unchanged, again.rebuilt) == (0, n, False)
    assert fresh._model is None  # nothing to encode: the weights were never loaded


def test_new_ingest_makes_the_index_stale_and_embed_encodes_only_what_changed(ws, tmp_path):
    from kalmkg.index import EntityIndex, embed
    from kalmkg.text import tail_view

    loaded = load(ws)
    embed(ws, loaded)
    more = write(tmp_path / "more.ttl", PREFIXES.replace("http://x.org/", KG) + """
ex:Lyon rdfs:label "Lyon"@en ; rdfs:comment "A city in France."@en ; ex:located_in ex:France .
ex:Nice rdfs:label "Nice"@en ; ex:located_in ex:France .
ex:Paris rdfs:comment "The capital of France, on the Seine."@en .
""")
    ingest_into(ws.root, [more])

    loaded = load(ws)  # the texts as they are now
    with pytest.raises(KalmkgError) as err:
        EntityIndex.open(ws, loaded)
    message = str(err.value)
    assert "stale" in message and "2 new" in message and "1 changed" in message and "`kalmkg embed`" in message

    enc = counting(loaded)
    result = embed(ws, loaded, enc)
    keys = loaded.entity_keys
    expected = {tail_view(loaded.texts.entities[keys.index(KG + k)]) for k in ("Lyon", "Nice", "Paris")}
    assert set(enc.texts) == expected and len(enc.texts) == 3
    assert (result.encoded, result.rebuilt, result.total) == (3, False, len(keys))
    index = EntityIndex.open(ws, loaded)  # fresh again
    lyon = keys.index(KG + "Lyon")
    np.testing.assert_allclose(index.vectors()[lyon],
                               enc.inner.encode([tail_view(loaded.texts.entities[lyon])], 1)[0], atol=1e-5)


def test_an_ingest_that_adds_only_triples_keeps_the_index_fresh(ws, tmp_path):
    from kalmkg.index import EntityIndex, embed

    embed(ws, load(ws))
    ingest_into(ws.root, [write(tmp_path / "t.ttl", PREFIXES.replace("http://x.org/", KG)
                                + "ex:Paris ex:member_of ex:NATO .\n")])
    loaded = load(ws)
    assert loaded.graph_fingerprint != EntityIndex.open(ws, loaded).meta["store"]  # the graph did change...
    # ... but no entity text did, so the vectors are still right


def test_index_of_another_run_or_changed_weights_or_a_base_is_stale(ws, tiny_model):
    from safetensors.torch import load_file, save_file

    from kalmkg.index import EntityIndex, embed

    embed(ws, load(ws))
    shutil.copytree(ws.runs_dir / "r", ws.runs_dir / "r2")  # another run (newer: now the latest)
    (ws.runs_dir / "r2" / "config.toml").touch()
    with pytest.raises(KalmkgError, match=r"built with run r, not run r2; run `kalmkg embed`"):
        EntityIndex.open(ws, load(ws, run="r2"))
    with pytest.raises(KalmkgError, match=r"built with run r, not the untrained base tiny-llama.*"
                                          r"`kalmkg embed --base "):
        EntityIndex.open(ws, load(ws, base=str(tiny_model)))

    EntityIndex.open(ws, load(ws, run="r"))  # still fresh for r
    weights = ws.runs_dir / "r" / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: v + 0.01 for k, v in tensors.items()}, weights)  # as a resumed run would
    with pytest.raises(KalmkgError, match=r"weights of run r changed .*`kalmkg embed --run r`"):
        EntityIndex.open(ws, load(ws, run="r"))
    result = embed(ws, load(ws, run="r"))
    assert result.rebuilt and result.encoded == result.total


def test_missing_index_says_how_to_build_it(ws):
    from kalmkg.index import EntityIndex

    with pytest.raises(KalmkgError, match=r"no entity index in .*; run `kalmkg embed` first"):
        EntityIndex.open(ws, load(ws))


def test_interrupted_embed_reads_stale_and_the_next_one_finishes_the_rest(ws, monkeypatch):
    from kalmkg import index as index_mod
    from kalmkg.index import EntityIndex, embed

    loaded = load(ws)
    n = len(loaded.entity_keys)
    monkeypatch.setattr(index_mod, "_ENCODE_CHUNK", 1)
    monkeypatch.setattr(index_mod, "_WRITE_ROWS", 16)

    class Dies(Counting):
        def encode(self, texts, batch_size=64):
            if len(self.texts) >= 64:
                raise KeyboardInterrupt
            return super().encode(texts, batch_size)

    with pytest.raises(KeyboardInterrupt):
        embed(ws, loaded, Dies(counting(loaded).inner), batch_size=16)
    with pytest.raises(KalmkgError, match="stale"):
        EntityIndex.open(ws, loaded)
    enc = counting(loaded)
    result = embed(ws, loaded, enc, batch_size=16)
    assert result.encoded == len(enc.texts) == n - 64 and not result.rebuilt
    EntityIndex.open(ws, loaded)


def test_ann_index_above_the_threshold_finds_what_exact_search_finds(ws, tmp_path, monkeypatch):
    import kalmkg.index as index_module
    from kalmkg.index import EntityIndex, embed

    monkeypatch.setattr(index_module, "_ROWS_PER_PARTITION", 25)  # several partitions on a tiny graph
    loaded = load(ws)
    built = -(-len(loaded.entity_keys) // 25)
    assert built >= 3
    result = embed(ws, loaded, ann_threshold=50)
    assert result.ann == "IvfHnswSq"
    index = EntityIndex.open(ws, loaded)
    assert index.ann == "IvfHnswSq" and index.meta["ann_partitions"] == str(built)
    queries = index.vectors()[[3, 40, 77]] + 0.05 * np.random.default_rng(0).standard_normal((3, 32))
    exclude = [[3], [], [1, 2]]
    ann_ids, ann_scores = index.search(queries, 5, exclude=exclude)
    exact_ids, exact_scores = index.search(queries, 5, exclude=exclude, exact=True)
    np.testing.assert_array_equal(ann_ids, exact_ids)
    np.testing.assert_allclose(ann_scores, exact_scores, atol=1e-4)  # re-ranked on full vectors: exact cosines
    assert 3 not in ann_ids[0] and not {1, 2} & set(ann_ids[2].tolist())

    # rows added by an incremental embed are searchable through the index too
    ingest_into(ws.root, [write(tmp_path / "new.ttl", PREFIXES.replace("http://x.org/", KG)
                                + 'ex:Lyon rdfs:label "Lyon"@en ; ex:located_in ex:France .\n')])
    loaded = load(ws)
    monkeypatch.setattr(index_module, "_ROWS_PER_PARTITION", 10)  # a recount now would differ
    assert embed(ws, loaded, ann_threshold=50).encoded == 1
    index = EntityIndex.open(ws, loaded)
    lyon = loaded.entity_keys.index(KG + "Lyon")
    ids, scores = index.search(index.vectors()[[lyon]], 3)
    assert index.ann and ids[0, 0] == lyon and scores[0, 0] == pytest.approx(1.0, abs=1e-4)
    assert index.meta["ann_partitions"] == str(built)  # the partitions the index was built with, kept


def test_ann_partitions_grow_with_the_rows_and_queries_probe_most_of_them():
    from kalmkg.index import ann_partitions, ann_probes

    assert [ann_partitions(n) for n in (1, 10_000, 10_001, 100_000, 1_000_000)] == [1, 1, 2, 10, 100]
    assert ann_probes({"ann_partitions": "10"}, 100_000) == 8
    assert ann_probes({"ann_partitions": "1"}, 50) == 1
    # an index built before the count was stamped had one partition per million rows, all probed
    assert ann_probes({}, 100_000) == 1 and ann_probes({}, 3_000_000) == 3


def test_a_fresh_ann_index_is_built_on_the_compacted_table_and_not_optimized_again(ws, monkeypatch):
    """Optimizing a fresh IVF_HNSW_SQ index rewrites its graphs (100k rows: 95 s, more than the build)."""
    import lancedb.table

    import kalmkg.index as index_module

    calls = []
    optimize, build = lancedb.table.LanceTable.optimize, index_module._build_ann
    monkeypatch.setattr(lancedb.table.LanceTable, "optimize", lambda self, **k: calls.append("optimize") or
                        optimize(self, **k))
    monkeypatch.setattr(index_module, "_build_ann", lambda table, rows: calls.append("build") or build(table, rows))
    assert index_module.embed(ws, load(ws), ann_threshold=50).ann == "IvfHnswSq"
    assert calls == ["optimize", "build"]


def test_rows_left_outside_the_ann_index_by_a_stopped_embed_are_folded_in_by_the_next(ws, tmp_path, monkeypatch):
    import lancedb.table

    import kalmkg.index as index_module
    from kalmkg.index import embed

    assert embed(ws, load(ws), ann_threshold=50).ann == "IvfHnswSq"
    ingest_into(ws.root, [write(tmp_path / "new.ttl", PREFIXES.replace("http://x.org/", KG)
                                + 'ex:Lyon rdfs:label "Lyon"@en ; ex:located_in ex:France .\n')])
    optimize = lancedb.table.LanceTable.optimize

    def stopped(self, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(lancedb.table.LanceTable, "optimize", stopped)
    with pytest.raises(KeyboardInterrupt):
        embed(ws, load(ws), ann_threshold=50)  # Lyon written, not yet in the index
    monkeypatch.setattr(lancedb.table.LanceTable, "optimize", optimize)
    table = index_module._open_table(ws)
    assert index_module._unindexed_rows(table) == 1
    result = embed(ws, load(ws), ann_threshold=50)
    assert result.encoded == 0  # nothing to encode, but the row is folded in
    assert index_module._unindexed_rows(index_module._open_table(ws)) == 0


def test_a_rebuild_appends_its_rows_instead_of_merging_them(ws, monkeypatch):
    """Merging by id joins each batch against the whole table; a table the rebuild creates needs none."""
    import lancedb.table

    import kalmkg.index as index_module
    from kalmkg.index import EntityIndex, embed

    def refuse(*a, **k):
        raise AssertionError("merge_insert during a rebuild")

    monkeypatch.setattr(index_module, "_WRITE_ROWS", 8)  # several writes
    monkeypatch.setattr(lancedb.table.LanceTable, "merge_insert", refuse)
    loaded = load(ws)
    result = embed(ws, loaded, full=True, batch_size=4)
    assert result.rebuilt and result.total == len(loaded.entity_keys)
    index = EntityIndex.open(ws, loaded)
    np.testing.assert_array_equal(np.sort(index.table.to_arrow()["id"].to_numpy()), np.arange(result.total))


def test_exact_search_opens_from_the_snapshot_without_lancedb_and_never_from_a_stale_one(ws, tmp_path, monkeypatch):
    import kalmkg.index as index_module
    from kalmkg.index import SNAPSHOT_META, SNAPSHOT_VECTORS, EntityIndex, embed

    loaded = load(ws)
    embed(ws, loaded)
    assert (ws.vectors_dir / SNAPSHOT_VECTORS).is_file() and (ws.vectors_dir / SNAPSHOT_META).is_file()
    from_table = EntityIndex(index_module._open_table(ws), index_module._read_meta(index_module._open_table(ws)), None)
    expected = from_table.vectors().copy()

    def no_lancedb(*a, **k):
        raise AssertionError("LanceDB opened although the snapshot fits")

    with monkeypatch.context() as m:
        m.setattr(index_module, "_open_table", no_lancedb)
        fresh = EntityIndex.open(ws, loaded)
        np.testing.assert_array_equal(np.asarray(fresh.vectors()), expected)
        q = expected[:3] + 0.01
        np.testing.assert_array_equal(fresh.search(q, 5)[0], from_table.search(q, 5)[0])
    assert fresh.table is not None  # LanceDB opens when a caller asks for the table itself

    # a snapshot that does not fit the graph of the moment is not read: the table's own check speaks
    ingest_into(ws.root, [write(tmp_path / "more.ttl", PREFIXES + 'ex:Newcomer rdfs:label "Newcomer"@en ; ex:p ex:Paris .\n')])
    with pytest.raises(KalmkgError, match="kalmkg embed"):
        EntityIndex.open(ws, load(ws))
    embed(ws, load(ws))  # the snapshot follows the table
    assert EntityIndex.open(ws, load(ws)).rows == len(load(ws).entity_keys)
    # a damaged snapshot is ignored, the table answers
    for damage in (b"not an array", b""):
        (ws.vectors_dir / SNAPSHOT_VECTORS).write_bytes(damage)
        assert EntityIndex.open(ws, load(ws)).vectors().shape[0] == len(load(ws).entity_keys)
    (ws.vectors_dir / SNAPSHOT_META).write_text("[1, 2]")
    assert EntityIndex.open(ws, load(ws)).rows == len(load(ws).entity_keys)


def test_an_embed_that_stops_midway_leaves_no_snapshot_claiming_to_be_valid(ws, monkeypatch):
    import kalmkg.index as index_module
    from kalmkg.index import SNAPSHOT_META, embed

    loaded = load(ws)
    embed(ws, loaded)

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(index_module._TableWriter, "flush", killed)
    with pytest.raises(KeyboardInterrupt):
        embed(ws, loaded, full=True)
    assert not (ws.vectors_dir / SNAPSHOT_META).exists()


def test_another_backend_rebuilds_the_index(ws):
    from kalmkg.index import embed

    loaded = load(ws)
    embed(ws, loaded)
    again = embed(ws, loaded, counting(loaded), backend="gguf")  # any encoder stands in for the GGUF here
    assert again.rebuilt and again.encoded == len(loaded.entity_keys)
    assert not embed(ws, loaded, backend="gguf").rebuilt


def test_bf16_weights_give_near_vectors_in_an_index_of_their_own(ws):
    """`--precision bf16` loads the run's merged weights in bf16: the vectors are the fp32 ones up to
    rounding, and, being near rather than equal, they rebuild the index instead of mixing into it."""
    import torch

    from kalmkg.index import EntityIndex, embed

    fp32 = load(ws, precision="fp32")
    embed(ws, fp32)
    exact = EntityIndex.open(ws, fp32).vectors().copy()
    bf16 = load(ws, precision="bf16")
    assert bf16.precision == "bf16" and next(bf16.model.parameters()).dtype == torch.bfloat16
    again = embed(ws, bf16)
    assert again.rebuilt and again.encoded == len(bf16.entity_keys)
    near = EntityIndex.open(ws, bf16).vectors()
    cosines = (exact * near).sum(axis=1)
    assert cosines.min() > 0.99 and not np.array_equal(exact, near)
    assert not embed(ws, bf16).rebuilt and embed(ws, fp32).rebuilt


def test_auto_precision_is_fp32_on_a_cpu_and_a_bad_one_is_one_line(ws):
    from kalmkg.device import inference_precision

    assert inference_precision("cpu") == "fp32" and load(ws).precision == "fp32"
    with pytest.raises(KalmkgError, match="^unknown precision 'fp16'; use auto, fp32, bf16$"):
        load(ws, precision="fp16")


def test_auto_precision_is_bf16_only_on_a_gpu_that_runs_it_natively(monkeypatch):
    """Ampere and later (compute capability 8+) run bf16 natively; an older GPU would emulate it slowly."""
    from types import SimpleNamespace

    import torch

    from kalmkg.device import inference_precision

    asked = []
    for major, want in ((7, "fp32"), (8, "bf16"), (9, "bf16")):
        monkeypatch.setattr(torch.cuda, "get_device_properties",
                            lambda d, m=major: asked.append(str(d)) or SimpleNamespace(major=m))
        assert inference_precision("cuda:1") == want
    assert asked == ["cuda:1"] * 3  # the GPU the command runs on, not the current one


def test_an_ann_index_leaves_no_snapshot(ws):
    from kalmkg.index import SNAPSHOT_META, SNAPSHOT_VECTORS, embed

    loaded = load(ws)
    embed(ws, loaded)
    embed(ws, loaded, full=True, ann_threshold=50)
    assert not (ws.vectors_dir / SNAPSHOT_META).exists() and not (ws.vectors_dir / SNAPSHOT_VECTORS).exists()


def test_exact_search_orders_ties_by_id_and_pads_short_results():
    from kalmkg.index import _exact_topk

    vectors = np.array([[1, 0], [0, 1], [1, 0], [0.6, 0.8]], dtype=np.float32)
    ids, scores = _exact_topk(np.array([[1, 0]], dtype=np.float32), vectors, 6, [[3]])
    assert ids[0].tolist() == [0, 2, 1, -1, -1, -1]
    assert scores[0, :3].tolist() == [1.0, 1.0, 0.0] and np.isneginf(scores[0, 3:]).all()
