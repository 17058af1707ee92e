"""What lets training run over graphs larger than memory (issue 16 part 3): arrays written in pieces and
memory-mapped, the store's streamed triples and known answers, a permutation computed per position,
ranking in blocks of entities with the vectors on disk, and the training graph's folder removed after."""

from __future__ import annotations

import numpy as np
import pytest

from kalmkg.evaluation.metrics import KnownAnswers, filtered_ranks
from kalmkg.npy import NpyWriter, RowFile, open_npy, write_npy
from kalmkg.training.permutation import Permutation


# ------------------------------------------------------------------ npy
@pytest.mark.parametrize("row_shape", [(), (3,), (2, 4)])
def test_rows_written_in_pieces_read_back_as_numpy_writes_them(tmp_path, row_shape):
    rows = np.random.default_rng(0).integers(-10**12, 10**12, (1001, *row_shape))
    with NpyWriter(tmp_path / "a.npy", "int64", row_shape) as out:
        for start in range(0, len(rows), 97):
            out.write(rows[start:start + 97])
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), rows)
    mapped = open_npy(tmp_path / "a.npy")
    assert isinstance(mapped, np.memmap) and not mapped.flags.writeable
    np.testing.assert_array_equal(mapped, rows)


def test_a_writer_that_fails_leaves_no_file(tmp_path):
    with pytest.raises(ValueError, match="rows of shape"):
        with NpyWriter(tmp_path / "a.npy", "int64", (3,)) as out:
            out.write(np.zeros((2, 3)))
            out.write(np.zeros((2, 4)))
    assert not (tmp_path / "a.npy").exists()


def test_empty_and_huge_shapes_have_valid_headers(tmp_path):
    write_npy(tmp_path / "empty.npy", np.zeros((0, 3), dtype=np.int64))
    assert open_npy(tmp_path / "empty.npy").shape == (0, 3)
    from kalmkg.npy import _header

    header = _header(np.dtype("int64"), (10**15, 3))
    assert len(header) == 128 and header.endswith(b"\n")


def test_a_row_file_reads_back_rows_written_out_of_order(tmp_path):
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(50, 8)).astype(np.float32)
    rows = RowFile(tmp_path / "v", 50, 8)
    order = rng.permutation(50)
    for part in np.array_split(order, 7):
        rows.write(part, vectors[part])
    assert len(rows) == 50
    np.testing.assert_array_equal(rows[0:50], vectors)
    np.testing.assert_array_equal(rows[13:17], vectors[13:17])
    assert rows[40:60].shape == (10, 8) and rows[5:5].shape == (0, 8)
    rows.close()
    assert not (tmp_path / "v").exists()


# ------------------------------------------------------------------ permutation
@pytest.mark.parametrize("n", [1, 2, 3, 10, 64, 65, 1000, 4097])
def test_the_permutation_is_a_bijection(n):
    values = Permutation(n, [3, 1])[np.arange(n)]
    assert sorted(values.tolist()) == list(range(n))


def test_the_permutation_is_the_same_per_seed_and_differs_between_seeds():
    a, b, c = Permutation(1000, [0, 1]), Permutation(1000, [0, 1]), Permutation(1000, [0, 2])
    np.testing.assert_array_equal(a[:], b[:])
    assert not np.array_equal(a[:], c[:])
    np.testing.assert_array_equal(a[[5, 900, 5]], a[:][[5, 900, 5]])


def test_the_permutation_looks_uniform():
    """Over 300 seeds: one fixed point a permutation on average, and no correlation with the identity
    (a weak network of few rounds on a small domain fails both)."""
    n = 100
    perms = [Permutation(n, [s, 0])[np.arange(n)] for s in range(300)]
    fixed = np.mean([(p == np.arange(n)).sum() for p in perms])
    corr = np.mean([np.corrcoef(p, np.arange(n))[0, 1] for p in perms])
    assert 0.7 < fixed < 1.3 and abs(corr) < 0.03


def test_the_permutation_refuses_positions_outside():
    with pytest.raises(IndexError):
        Permutation(10, 0)[[10]]


# ------------------------------------------------------------------ the store's arrays
def test_the_store_streams_triples_and_known_answers_equal_to_the_in_memory_ones(sample_ws, tmp_path):
    from kalmkg.store import SPLITS, Store
    from kalmkg.training.data import with_inverses

    with Store.open(sample_ws) as store:
        R = store.relation_table().num_rows
        train, everything = store.triples_array(("train",)), store.triples_array()
        store.write_triples(tmp_path / "train.npy", ("train",), batch_rows=17)
        store.write_triples(tmp_path / "examples.npy", ("train",), inverses_of=R, batch_rows=17)
        for name, splits in (("known-train", ("train",)), ("known-all", SPLITS)):
            store.write_known_answers(tmp_path / name, splits, R, batch_rows=13)  # keys cross the batches
    np.testing.assert_array_equal(open_npy(tmp_path / "train.npy"), train)
    np.testing.assert_array_equal(open_npy(tmp_path / "examples.npy"), with_inverses(train, R))
    for name, triples in (("known-train", train), ("known-all", everything)):
        known, want = KnownAnswers.open(tmp_path / name), KnownAnswers(triples, R)
        assert len(known) == len(want) and dict(known) == dict(want)
        h, r, t = triples[0].tolist()
        assert t in known[(h, r)] and h in known[(t, r + R)] and (h, 2 * R) not in known


# ------------------------------------------------------------------ ranking in blocks
def dense_ranks(vectors, qvecs, queries, targets, known):
    import torch

    scores = torch.as_tensor(qvecs) @ torch.as_tensor(vectors).T
    mask = torch.zeros_like(scores, dtype=torch.bool)
    for i, q in enumerate(queries.tolist()):
        mask[i, list(known.get(tuple(q), ()))] = True
    return filtered_ranks(scores, targets, mask)


@pytest.mark.parametrize("entity_chunk", [None, 1, 7, 64])
def test_ranking_in_blocks_of_entities_equals_the_dense_ranks_ties_included(tmp_path, entity_chunk):
    from kalmkg.evaluation.ranking import rank_with_vectors
    from kalmkg.text import GraphTexts

    rng = np.random.default_rng(0)
    n, R = 120, 3
    vectors = rng.normal(size=(n, 8)).astype(np.float32)
    vectors[[5, 9, 30]] = vectors[7]  # equal texts, equal vectors: ties with the target
    triples = np.stack([rng.integers(0, n, 300), rng.integers(0, R, 300), rng.integers(0, n, 300)], 1)
    triples[:6, 2] = 7
    texts = GraphTexts([str(i) for i in range(n)], [str(i) for i in range(2 * R)])
    asked = triples[:40]
    qvecs = rng.normal(size=(80, 8)).astype(np.float32)
    qvecs[3] = vectors[7]  # a query whose best candidates tie exactly
    rows = RowFile(tmp_path / "v", n, 8)
    rows.write(np.arange(n), vectors)
    known = KnownAnswers(triples, R)
    out = rank_with_vectors(None, texts, asked, known, rows, query_vectors=qvecs, entity_chunk=entity_chunk,
                            chunk=33, top=5)
    want = dense_ranks(vectors, qvecs, out["queries"], out["targets"], known)
    np.testing.assert_array_equal(out["ranks"], want)
    assert (out["ranks"] != np.round(out["ranks"])).any()  # some targets did tie
    # the top candidates: the filtered best scores, in order
    for i in range(len(qvecs)):
        others = set(known.get(tuple(out["queries"][i]), ())) - {out["targets"][i]}
        scores = qvecs[i] @ vectors.T
        scores[list(others)] = -np.inf
        np.testing.assert_allclose(out["top_scores"][i], np.sort(scores)[::-1][:5], rtol=1e-5)
    same = rank_with_vectors(None, texts, asked, triples, vectors, query_vectors=qvecs, top=5)
    np.testing.assert_array_equal(same["ranks"], out["ranks"])


# ------------------------------------------------------------------ the training graph's folder
def test_the_training_graph_lives_in_a_folder_removed_with_it(sample_ws):
    import gc

    from kalmkg.training.data import read_graph

    graph = read_graph(sample_ws)
    folder = graph.folder
    assert folder.parent == sample_ws.root and folder.name.startswith(".train-graph.")
    assert isinstance(graph.train, np.memmap) and len(graph.known_train) > 0
    assert len(graph.all) >= len(graph.train) + len(graph.valid)
    del graph
    gc.collect()
    assert not folder.exists()


def test_a_graph_that_cannot_be_read_leaves_no_folder(tmp_path):
    from kalmkg.errors import KalmkgError
    from kalmkg.training.data import read_graph
    from kalmkg.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    ws.root.mkdir()
    with pytest.raises(KalmkgError):
        read_graph(ws)
    assert list(ws.root.iterdir()) == []
