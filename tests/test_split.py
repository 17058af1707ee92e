"""`kalmkg split` and `kalmkg.split.transductive_split`: deterministic, transductive, sized as asked."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from helpers_graph import SAMPLE_TSV, SAMPLE_TTL, contents, ingest_into, write
from kalmkg.cli.app import app
from kalmkg.errors import KalmkgError
from kalmkg.split import TEST, TRAIN, VALID, split_store, transductive_split
from kalmkg.store import Store
from kalmkg.workspace import Workspace


def _arrays(triples):
    h, r, t = (np.array(col, dtype=np.int64) for col in zip(*triples)) if triples else \
        (np.array([], dtype=np.int64),) * 3
    return h, r, t


def assert_transductive(h, r, t, codes):
    """Every entity and relation of a valid/test triple also occurs in a train triple."""
    train = codes == TRAIN
    train_entities = set(h[train].tolist()) | set(t[train].tolist())
    train_relations = set(r[train].tolist())
    held = ~train
    assert set(h[held].tolist()) | set(t[held].tolist()) <= train_entities
    assert set(r[held].tolist()) <= train_relations


# ---------------------------------------------------------------------------------------------------------
# transductive_split on hand-made graphs
# ---------------------------------------------------------------------------------------------------------
def test_star_graph_holds_nothing_out():
    """Every edge of a star is a leaf's only edge: holding any out would orphan the leaf."""
    h, r, t = _arrays([(0, 0, leaf) for leaf in range(1, 8)])
    for seed in range(5):
        codes = transductive_split(h, r, t, 2, 2, seed)
        assert codes.tolist() == [TRAIN] * 7


def test_star_with_edges_both_ways_holds_out_but_keeps_every_leaf():
    triples = [(0, 0, leaf) for leaf in range(1, 9)] + [(leaf, 1, 0) for leaf in range(1, 9)]
    h, r, t = _arrays(triples)
    codes = transductive_split(h, r, t, 3, 3, seed=4)
    assert (codes == VALID).sum() == 3 and (codes == TEST).sum() == 3
    assert_transductive(h, r, t, codes)
    for leaf in range(1, 9):  # at most one of a leaf's two edges is held out
        mine = [i for i, (a, _, b) in enumerate(triples) if leaf in (a, b)]
        assert (codes[mine] == TRAIN).any()


def test_a_relation_used_once_is_never_held_out():
    triples = [(a, 0, b) for a in range(5) for b in range(5) if a != b] + [(0, 1, 1)]
    h, r, t = _arrays(triples)
    for seed in range(10):
        codes = transductive_split(h, r, t, 8, 8, seed)
        assert codes[-1] == TRAIN
        assert_transductive(h, r, t, codes)


def test_self_loop_alone_does_not_keep_its_entity():
    """A self-loop counts twice in its entity's degree; it must not be held out when it is the entity's
    only triple (entity 0 here), and it may be when another triple keeps the entity in train (entity 1)."""
    triples = [(0, 0, 0), (1, 0, 1), (1, 0, 2), (2, 0, 1), (2, 0, 3), (3, 0, 2), (3, 0, 1), (1, 0, 3)]
    h, r, t = _arrays(triples)
    held_self_loop_of_1 = False
    for seed in range(30):
        codes = transductive_split(h, r, t, 2, 1, seed)
        assert codes[0] == TRAIN
        assert_transductive(h, r, t, codes)
        held_self_loop_of_1 |= codes[1] != TRAIN
    assert held_self_loop_of_1


def test_only_self_loops_holds_nothing_out():
    h, r, t = _arrays([(i, 0, i) for i in range(6)])
    assert (transductive_split(h, r, t, 2, 2, seed=0) == TRAIN).all()


def test_exact_sizes_on_a_dense_graph_and_valid_first():
    triples = [(a, (a + b) % 2, b) for a in range(10) for b in range(10) if a != b]
    h, r, t = _arrays(triples)
    codes = transductive_split(h, r, t, 9, 9, seed=1)
    assert ((codes == VALID).sum(), (codes == TEST).sum(), (codes == TRAIN).sum()) == (9, 9, 72)
    codes = transductive_split(h, r, t, 5, 0, seed=1)
    assert ((codes == VALID).sum(), (codes == TEST).sum()) == (5, 0)
    codes = transductive_split(h, r, t, 0, 4, seed=1)
    assert ((codes == VALID).sum(), (codes == TEST).sum()) == (0, 4)
    assert (transductive_split(h, r, t, 0, 0, seed=1) == TRAIN).all()


def test_empty_graph():
    h, r, t = _arrays([])
    assert transductive_split(h, r, t, 0, 0, seed=0).tolist() == []
    assert transductive_split(h, r, t, 3, 3, seed=0).tolist() == []


@pytest.mark.parametrize("seed", range(12))
def test_random_graphs_are_split_transductively_and_deterministically(seed):
    rng = np.random.default_rng(1000 + seed)
    n = 200
    h = rng.integers(0, 40, n)
    t = np.where(rng.random(n) < 0.05, h, rng.integers(0, 40, n))  # some self-loops
    r = rng.integers(0, 6, n)
    n_valid, n_test = 20, 15
    codes = transductive_split(h, r, t, n_valid, n_test, seed)
    assert codes.shape == (n,) and set(codes.tolist()) <= {TRAIN, VALID, TEST}
    assert (codes == VALID).sum() <= n_valid and (codes == TEST).sum() <= n_test
    assert (codes != TRAIN).sum() > 0
    assert_transductive(h, r, t, codes)
    np.testing.assert_array_equal(codes, transductive_split(h, r, t, n_valid, n_test, seed))
    others = [transductive_split(h, r, t, n_valid, n_test, s) for s in (seed + 100, seed + 200)]
    assert any((o != codes).any() for o in others)


# ---------------------------------------------------------------------------------------------------------
# `kalmkg split` on a store
# ---------------------------------------------------------------------------------------------------------
def cli(*args):
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def _assignment(ws: Path) -> dict:
    return {(h, r, t): s for h, r, t, s in contents(ws)["triples"]}


def _check_transductive_store(assign: dict) -> None:
    train_entities = {e for (h, _, t), s in assign.items() if s == "train" for e in (h, t)}
    train_relations = {r for (_, r, _), s in assign.items() if s == "train"}
    for (h, r, t), s in assign.items():
        if s != "train":
            assert h in train_entities and t in train_entities and r in train_relations, (h, r, t, s)


def test_split_sample_graph_is_deterministic_and_transductive(tmp_path):
    for name in ("ws1", "ws2", "ws3"):
        ingest_into(tmp_path / name, [SAMPLE_TTL])
    out = cli("-w", tmp_path / "ws1", "split", "--valid", "0.1", "--test", "0.1", "--seed", "7").stdout
    cli("-w", tmp_path / "ws2", "split", "--valid", "0.1", "--test", "0.1", "--seed", "7")
    cli("-w", tmp_path / "ws3", "split", "--valid", "0.1", "--test", "0.1", "--seed", "8")
    one, two, three = (_assignment(tmp_path / n) for n in ("ws1", "ws2", "ws3"))
    assert one == two  # same seed, same split
    assert one != three and set(one) == set(three)  # another seed, another split of the same triples
    counts = {s: sum(1 for v in one.values() if v == s) for s in ("train", "valid", "test")}
    assert sum(counts.values()) == 304
    # close to the fractions asked (10% of 304 is 30): never more, and at most a few fewer
    assert 27 <= counts["valid"] <= 30 and 27 <= counts["test"] <= 30
    assert f"train {counts['train']} / valid {counts['valid']} / test {counts['test']}" in out
    _check_transductive_store(one)
    _check_transductive_store(_assignment(tmp_path / "ws3"))
    stats = json.loads(cli("-w", tmp_path / "ws1", "stats", "--json").stdout)
    assert stats["splits"] == counts


def test_split_does_not_depend_on_ingest_order(tmp_path):
    lines = (SAMPLE_TSV / "triples.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    a = write(tmp_path / "a.tsv", "".join(lines[::2]))
    b = write(tmp_path / "b.tsv", "".join(lines[1::2]))
    ingest_into(tmp_path / "ws_ab", [a, b])
    ingest_into(tmp_path / "ws_ba", [b])
    ingest_into(tmp_path / "ws_ba", [a])
    ids_ab, ids_ba = contents(tmp_path / "ws_ab")["entity_ids"], contents(tmp_path / "ws_ba")["entity_ids"]
    assert ids_ab != ids_ba  # the ids differ, so the split must go by keys
    for name in ("ws_ab", "ws_ba"):
        with Store.open(Workspace(tmp_path / name), write=True) as store:
            split_store(store, 0.1, 0.1, seed=3)
    assert _assignment(tmp_path / "ws_ab") == _assignment(tmp_path / "ws_ba")


def test_split_refuses_a_graph_with_given_splits_unless_forced(tmp_path):
    folder = tmp_path / "bench"
    lines = (SAMPLE_TSV / "triples.tsv").read_text(encoding="utf-8").splitlines(keepends=True)
    write(folder / "train.tsv", "".join(lines[:-10]))
    write(folder / "test.tsv", "".join(lines[-10:]))
    ws = tmp_path / "ws"
    ingest_into(ws, [folder])
    before = _assignment(ws)
    with pytest.raises(KalmkgError, match="--force"):
        CliRunner().invoke(app, ["-w", str(ws), "split"], catch_exceptions=False)
    assert _assignment(ws) == before
    cli("-w", ws, "split", "--valid", "0.05", "--test", "0.05", "--seed", "1", "--force")
    after = _assignment(ws)
    assert set(after) == set(before) and after != before
    _check_transductive_store(after)
    # a split graph is refused too: its valid/test now come from the last split
    with pytest.raises(KalmkgError, match="--force"):
        CliRunner().invoke(app, ["-w", str(ws), "split"], catch_exceptions=False)


def test_split_store_returns_the_counts(tmp_path):
    ingest_into(tmp_path / "ws", [SAMPLE_TTL])
    with Store.open(Workspace(tmp_path / "ws"), write=True) as store:
        counts = split_store(store, 0.05, 0.0, seed=0)
        rows = dict(store.con.execute("SELECT split, count(*) FROM triples GROUP BY split").fetchall())
    assert counts == {"train": rows.get("train", 0), "valid": rows.get("valid", 0), "test": 0}
    assert counts["valid"] == round(304 * 0.05)


def test_split_of_a_graph_without_triples_is_an_error(tmp_path):
    ingest_into(tmp_path / "ws", [write(tmp_path / "entities.tsv", "a\tAlpha\n")])
    with Store.open(Workspace(tmp_path / "ws"), write=True) as store:
        with pytest.raises(KalmkgError, match="no triples"):
            split_store(store, 0.1, 0.1, seed=0)
