"""Training examples: inverse triples, texts from store tables, token ids of every view, epoch batches."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_model import build_tokenizer  # noqa: E402

from kalmkg import text as verbalize  # noqa: E402
from kalmkg.text import GraphTexts, graph_texts  # noqa: E402
from kalmkg.training.config import TrainConfig  # noqa: E402
from kalmkg.training.data import (  # noqa: E402
    batch_groups,
    epoch_batches,
    lm_flags,
    lm_positions,
    tokenize_examples,
    with_inverses,
)


@pytest.fixture(scope="module")
def tokenizer():
    # The byte-level BPE tokenizer make_tiny_llama saves, built directly (AutoTokenizer would import torch).
    return build_tokenizer()


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class NoPadTokenizer:
    """A tokenizer without a pad token, as many base models ship."""

    def __init__(self, inner):
        self.inner = inner
        self.eos_token_id = inner.eos_token_id
        self.pad_token_id = None

    def __call__(self, *args, **kwargs):
        return self.inner(*args, **kwargs)

    def decode(self, *args, **kwargs):
        return self.inner.decode(*args, **kwargs)


LONG_DESCRIPTION = ("the capital of Austria, a country in Europe; a city located in the river valley, member of "
                    "the 2024 question list and part of the Europe continent, which is given as the answer")

ENTITIES = [
    verbalize.entity_text("Paris", "capital of France"),
    verbalize.entity_text("France", "a country in Europe"),
    verbalize.entity_text("Berlin", None),
    verbalize.entity_text("Germany", "a country"),
    verbalize.entity_text("Vienna", LONG_DESCRIPTION),
]
RELATIONS = ["capital of", "located in"]
TRIPLES = np.array([[0, 0, 1], [0, 1, 1], [2, 0, 3], [2, 1, 3], [4, 1, 1], [0, 1, 3]])


@pytest.fixture(scope="module")
def texts():
    return GraphTexts(
        entities=list(ENTITIES),
        relations=[verbalize.relation_text(r) for r in RELATIONS]
        + [verbalize.relation_text(r, True) for r in RELATIONS],
    )


# ------------------------------------------------------------------ with_inverses
def test_with_inverses_appends_inverse_triples():
    triples = np.array([[0, 0, 1], [2, 1, 3]], dtype=np.int32)
    out = with_inverses(triples, 2)
    assert out.dtype == np.int64
    assert out.tolist() == [[0, 0, 1], [2, 1, 3], [1, 2, 0], [3, 3, 2]]
    assert triples.tolist() == [[0, 0, 1], [2, 1, 3]]  # input untouched


def test_with_inverses_shape_and_relation_offset():
    rng = np.random.default_rng(0)
    triples = np.stack([rng.integers(0, 50, 40), rng.integers(0, 7, 40), rng.integers(0, 50, 40)], axis=1)
    out = with_inverses(triples, 7)
    assert out.shape == (80, 3)
    np.testing.assert_array_equal(out[:40], triples)
    np.testing.assert_array_equal(out[40:, 0], triples[:, 2])
    np.testing.assert_array_equal(out[40:, 1], triples[:, 1] + 7)
    np.testing.assert_array_equal(out[40:, 2], triples[:, 0])
    assert (out[40:, 1] >= 7).all() and (out[:40, 1] < 7).all()


def test_with_inverses_of_no_triples():
    assert with_inverses(np.zeros((0, 3), dtype=np.int64), 3).shape == (0, 3)


# ------------------------------------------------------------------ graph_texts
def entity_table(rows):
    return pa.table({
        "id": pa.array([r[0] for r in rows], pa.int64()),
        "key": pa.array([r[1] for r in rows], pa.string()),
        "label": pa.array([r[2] for r in rows], pa.string()),
        "description": pa.array([r[3] for r in rows], pa.string()),
    })


def relation_table(labels):
    return pa.table({
        "id": pa.array(range(len(labels)), pa.int64()),
        "key": pa.array([f"/r/{i}" for i in range(len(labels))], pa.string()),
        "label": pa.array(labels, pa.string()),
        "description": pa.array([None] * len(labels), pa.string()),
    })


def test_load_texts_builds_entity_and_relation_texts(tokenizer):
    ents = entity_table([
        (0, "Q90", "Paris", "capital of France"),
        (1, "Q142", "France", None),
        (2, "Q64", "Berlin", "  capital of Germany \n"),
        (3, "Q183", "Germany", "   "),
    ])
    rels = relation_table(["capital of", "located in", "borders"])
    texts = graph_texts(ents, rels, tokenizer, max_entity_tokens=50)
    assert texts.entities == ["Paris, capital of France", "France", "Berlin, capital of Germany", "Germany"]
    assert texts.relations == ["capital of", "located in", "borders",
                               "inverse of capital of", "inverse of located in", "inverse of borders"]
    assert texts.num_relations == 3


def test_load_texts_cuts_long_entity_texts(tokenizer):
    ents = entity_table([(0, "a", "Vienna", LONG_DESCRIPTION), (1, "b", "Rome", "a city")])
    texts = graph_texts(ents, relation_table(["capital of"]), tokenizer, max_entity_tokens=6)
    full = verbalize.entity_text("Vienna", LONG_DESCRIPTION)
    assert texts.entities[1] == "Rome, a city"  # short: unchanged
    assert texts.entities[0] != full and full.startswith(texts.entities[0])
    assert texts.entities[0].startswith("Vienna")
    assert len(ids(tokenizer, texts.entities[0])) <= 6


def test_load_texts_of_empty_tables(tokenizer):
    texts = graph_texts(entity_table([]), relation_table([]), tokenizer, 50)
    assert texts.entities == [] and texts.relations == [] and texts.num_relations == 0


# ------------------------------------------------------------------ tokenize_examples
def test_hr_views_are_tokenized_on_demand_and_shared_by_their_query(tokenizer, texts):
    examples = with_inverses(TRIPLES, texts.num_relations)
    tok = tokenize_examples(texts, examples, tokenizer, max_seq_len=256)
    np.testing.assert_array_equal(tok.examples, examples)
    keys = tok.hr_index_of(examples)
    for key, (q, r, _) in zip(keys, examples.tolist()):
        assert tok.hr_ids[key] == ids(tokenizer, verbalize.hr_view(texts.entities[q], texts.relations[r]))
    # examples with the same (query, relation) share one view, different ones never do
    for i in range(len(examples)):
        for j in range(len(examples)):
            assert (keys[i] == keys[j]) == (tuple(examples[i, :2]) == tuple(examples[j, :2]))
    assert tok.hr_index_of(examples[[3, 0, 3]]) == [keys[3], keys[0], keys[3]]


def test_hr_views_keep_only_the_latest(tokenizer, texts):
    from kalmkg.training.data import HrViews

    views = HrViews(texts, tokenizer, keep=2)
    first = views[views.key(0, 0)]
    views[views.key(1, 0)], views[views.key(2, 1)]
    assert len(views._kept) == 2 and views.key(0, 0) not in views._kept
    assert views[views.key(0, 0)] == first  # tokenized again, the same


def test_tokenize_examples_tail_views_and_targets_per_entity(tokenizer, texts):
    tok = tokenize_examples(texts, with_inverses(TRIPLES, 2), tokenizer, max_seq_len=256)
    eos = tokenizer.eos_token_id
    assert len(tok.tail_ids) == len(tok.target_ids) == len(texts.entities)
    for e, text in enumerate(texts.entities):
        assert tok.tail_ids[e] == ids(tokenizer, verbalize.tail_view(text))
        assert tok.target_ids[e] == ids(tokenizer, verbalize.completion_target(text)) + [eos]
        assert tok.target_ids[e][-1] == eos and eos not in tok.target_ids[e][:-1]
    assert tok.pad_id == tokenizer.pad_token_id


def longest_hr(tok, examples):
    return max(len(tok.hr_ids[k]) for k in tok.hr_index_of(examples))


def test_example_lengths_are_near_hr_plus_tail_tokens(tokenizer, texts):
    examples = with_inverses(TRIPLES, 2)
    tok = tokenize_examples(texts, examples, tokenizer, max_seq_len=256)
    lengths = tok.lengths[np.arange(len(examples))]
    assert lengths.shape == (len(examples),)
    for length, key, (_, _, a) in zip(lengths.tolist(), tok.hr_index_of(examples), examples.tolist()):
        exact = len(tok.hr_ids[key]) + len(tok.tail_ids[a])
        assert exact <= length <= exact + 3


def test_the_hr_bound_holds_for_every_view_of_a_real_graph(tokenizer):
    """The bound on hr views (`longest_hr_view`), which sizes the room for targets without tokenizing
    every view, is never below a view's own length: every (entity, relation) of the sample graph, with
    and without descriptions."""
    from kalmkg.training.data import longest_hr_view

    folder = Path(__file__).resolve().parents[1] / "sample_graphs" / "world_tsv"
    rows = [line.split("\t") for line in (folder / "entities.tsv").read_text().splitlines()]
    entities = [verbalize.entity_text(label, None) for _, label, _ in rows] + \
        [verbalize.entity_text(label, description) for _, label, description in rows]
    relations = [line.split("\t")[1] for line in (folder / "relations.tsv").read_text().splitlines()]
    texts = GraphTexts(entities, [verbalize.relation_text(r) for r in relations] +
                       [verbalize.relation_text(r, True) for r in relations])
    tok = tokenize_examples(texts, np.zeros((0, 3), dtype=np.int64), tokenizer, 4096)
    tails = tok.tail_ids.lengths()
    every = np.array([[e, r, 0] for e in range(len(entities)) for r in range(len(texts.relations))])
    for (e, r, _), k in zip(every.tolist(), tok.hr_index_of(every)):
        assert len(tok.hr_ids[k]) <= tails[e] + tok.relation_lengths[r] <= longest_hr_view(tails, tok.relation_lengths)


def test_tokenize_examples_cuts_long_targets_to_fit_max_seq_len(tokenizer, texts):
    from kalmkg.training.data import longest_hr_view

    examples = with_inverses(TRIPLES, 2)
    full = tokenize_examples(texts, examples, tokenizer, max_seq_len=1024)
    bound = longest_hr_view(full.tail_ids.lengths(), full.relation_lengths)
    longest_target = max(len(t) for t in full.target_ids)
    max_seq_len = bound + 12
    assert longest_target > 12  # the Vienna target must be cut
    tok = tokenize_examples(texts, examples, tokenizer, max_seq_len=max_seq_len)
    eos = tokenizer.eos_token_id
    cut_any = False
    for e in range(len(texts.entities)):
        t, f = tok.target_ids[e], full.target_ids[e]
        assert t[-1] == eos
        if len(f) <= 12:
            assert t == f  # short targets untouched
        else:
            cut_any = True
            assert len(t) == 12 and t[:-1] == f[: len(t) - 1]  # the beginning is kept
    assert cut_any
    for key, (_, _, a) in zip(tok.hr_index_of(examples), examples.tolist()):
        assert len(tok.hr_ids[key]) + len(tok.target_ids[a]) <= max_seq_len
    # tail views (embedded, not generated) are never cut
    assert tok.tail_ids == full.tail_ids


def test_tokenize_examples_smallest_room_keeps_one_token_and_eos(tokenizer, texts):
    from kalmkg.training.data import longest_hr_view

    full = tokenize_examples(texts, TRIPLES, tokenizer, 1024)
    tok = tokenize_examples(texts, TRIPLES, tokenizer, max_seq_len=longest_hr_view(full.tail_ids.lengths(),
                                                                                  full.relation_lengths) + 2)
    assert all(len(t) <= 2 and t[-1] == tokenizer.eos_token_id for t in tok.target_ids)


def test_tokenize_examples_rejects_hr_view_longer_than_max_seq_len(tokenizer, texts):
    from kalmkg.training.data import longest_hr_view

    full = tokenize_examples(texts, TRIPLES, tokenizer, 1024)
    bound = longest_hr_view(full.tail_ids.lengths(), full.relation_lengths)
    assert bound >= longest_hr(full, with_inverses(TRIPLES, 2))
    with pytest.raises(ValueError, match="max_seq_len"):
        tokenize_examples(texts, TRIPLES, tokenizer, max_seq_len=bound + 1)
    tokenize_examples(texts, TRIPLES, tokenizer, max_seq_len=bound + 2)


def test_tokenize_examples_pad_falls_back_to_eos(tokenizer, texts):
    tok = tokenize_examples(texts, TRIPLES[:2], NoPadTokenizer(tokenizer), max_seq_len=256)
    assert tok.pad_id == tokenizer.eos_token_id != tokenizer.pad_token_id


def test_tokenize_examples_without_examples(tokenizer, texts):
    tok = tokenize_examples(texts, np.zeros((0, 3), dtype=np.int64), tokenizer, max_seq_len=256)
    assert len(tok.examples) == 0 and len(tok.lengths) == 0
    assert len(tok.tail_ids) == len(texts.entities)


# ------------------------------------------------------------------ epoch_batches
@pytest.mark.parametrize("bucket", [True, False])
def test_epoch_batches_are_deterministic_per_seed_and_epoch(bucket):
    lengths = np.random.default_rng(1).integers(5, 100, 200)
    a = epoch_batches(200, 8, seed=3, epoch=2, lengths=lengths, bucket=bucket)
    b = epoch_batches(200, 8, seed=3, epoch=2, lengths=lengths, bucket=bucket)
    assert len(a) == len(b) == 25
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    other_epoch = epoch_batches(200, 8, seed=3, epoch=3, lengths=lengths, bucket=bucket)
    other_seed = epoch_batches(200, 8, seed=4, epoch=2, lengths=lengths, bucket=bucket)
    assert not all(np.array_equal(x, y) for x, y in zip(a, other_epoch))
    assert not all(np.array_equal(x, y) for x, y in zip(a, other_seed))


@pytest.mark.parametrize("bucket", [True, False])
@pytest.mark.parametrize("n,batch_size", [(103, 10), (100, 10), (7, 3), (64, 64)])
def test_epoch_batches_are_full_and_use_every_index_at_most_once(n, batch_size, bucket):
    lengths = np.random.default_rng(0).integers(1, 50, n)
    batches = epoch_batches(n, batch_size, seed=0, epoch=0, lengths=lengths, bucket=bucket)
    assert len(batches) == n // batch_size
    assert all(len(b) == batch_size for b in batches)
    flat = np.concatenate(batches)
    assert len(np.unique(flat)) == len(flat)
    assert flat.min() >= 0 and flat.max() < n


def test_epoch_batches_cover_all_indices_when_batch_size_divides_n():
    batches = epoch_batches(96, 12, seed=5, epoch=1, lengths=np.arange(96) % 17, bucket=True)
    assert sorted(np.concatenate(batches).tolist()) == list(range(96))


def test_epoch_batches_shuffle_the_examples():
    batches = epoch_batches(100, 10, seed=0, epoch=0, bucket=False)
    assert np.concatenate(batches).tolist() != list(range(100))


def test_epoch_batches_fewer_examples_than_a_batch():
    assert list(epoch_batches(5, 8, seed=0, epoch=0, lengths=np.arange(5))) == []
    assert list(epoch_batches(0, 8, seed=0, epoch=0, lengths=np.zeros(0, dtype=np.int64))) == []


def test_epoch_batches_are_computed_per_batch():
    """A batch is computed when asked for: any batch of an epoch of 20M examples at once, the same
    each time, and its examples a window's neighbours in length."""
    n = 20_000_000
    lengths = np.arange(n) % 97
    batches = epoch_batches(n, 256, seed=1, epoch=4, lengths=lengths)
    assert len(batches) == n // 256
    a, b = batches[12345], batches[12345]
    np.testing.assert_array_equal(a, b)
    assert len(np.unique(a)) == 256 and a.max() < n
    assert np.ptp(lengths[a]) <= 10
    np.testing.assert_array_equal(batches[-1], batches[len(batches) - 1])
    with pytest.raises(IndexError):
        batches[len(batches)]


def test_bucketing_without_lengths_still_gives_valid_batches():
    batches = epoch_batches(50, 5, seed=1, epoch=0, lengths=None, bucket=True)
    flat = np.concatenate(batches)
    assert len(batches) == 10 and sorted(flat.tolist()) == list(range(50))


def test_bucketing_makes_batches_length_homogeneous():
    rng = np.random.default_rng(7)
    n, bs = 2048, 16
    lengths = rng.integers(5, 200, n)

    def mean_spread(batches):
        return float(np.mean([lengths[b].max() - lengths[b].min() for b in batches]))

    bucketed = epoch_batches(n, bs, seed=0, epoch=0, lengths=lengths, bucket=True)
    plain = epoch_batches(n, bs, seed=0, epoch=0, lengths=lengths, bucket=False)
    assert mean_spread(bucketed) < 0.25 * mean_spread(plain)
    # the batch order is shuffled again: batches are not served shortest-first
    means = [lengths[b].mean() for b in bucketed]
    assert means != sorted(means) and means != sorted(means, reverse=True)


# ------------------------------------------------------------------ lm_positions
def test_lm_positions_default_case():
    assert lm_positions(24, 4).tolist() == [0, 6, 12, 18]


@pytest.mark.parametrize("m", [0, -1])
def test_lm_positions_none(m):
    pos = lm_positions(24, m)
    assert len(pos) == 0 and pos.dtype.kind == "i"


@pytest.mark.parametrize("batch_size,m", [(24, 1), (24, 4), (24, 5), (24, 24), (16, 3), (10, 4), (7, 3), (8, 8)])
def test_lm_positions_count_range_and_order(batch_size, m):
    pos = lm_positions(batch_size, m).tolist()
    assert len(pos) == m
    assert len(set(pos)) == m and pos == sorted(pos)
    assert all(0 <= p < batch_size for p in pos)


def test_lm_positions_are_global_across_a_two_way_split():
    B, m = 24, 4
    pos = lm_positions(B, m)
    first = pos[pos < B // 2]
    second = pos[pos >= B // 2]
    assert len(first) > 0 and len(second) > 0
    assert len(first) == len(second) == 2
    # each process, holding half of the batch, derives its local positions from the same global list
    local = np.zeros(B, dtype=bool)
    local[pos] = True
    assert np.flatnonzero(local[: B // 2]).tolist() == [0, 6]
    assert (np.flatnonzero(local[B // 2:]) + B // 2).tolist() == [12, 18]


@pytest.mark.parametrize("batch_size,m", [(10, 4), (16, 6), (32, 12)])
def test_lm_positions_spread_evenly_over_the_halves(batch_size, m):
    pos = lm_positions(batch_size, m)
    first = int((pos < batch_size // 2).sum())
    second = int((pos >= batch_size // 2).sum())
    assert abs(first - second) <= 1, pos.tolist()


def test_lm_flags_mark_lm_positions_and_none_without_lm_weight():
    flags = lm_flags(8, TrainConfig(batch_size=8, lm_examples=2))
    assert flags.dtype == bool and np.flatnonzero(flags).tolist() == lm_positions(8, 2).tolist()
    assert not lm_flags(8, TrainConfig(batch_size=8, lm_examples=2, lm_weight=0.0)).any()


# ------------------------------------------------------------------ batch_groups
class ExamplesOnly:
    """What batch_groups reads of TokenizedExamples."""

    def __init__(self, n):
        self.examples = np.arange(3 * n).reshape(n, 3)
        self.lengths = np.arange(n) % 7


@pytest.mark.parametrize("grad_accum", [1, 2, 3])
def test_batch_groups_walk_the_epochs_and_resume_where_they_left_off(grad_accum):
    tokens, cfg = ExamplesOnly(50), TrainConfig(batch_size=4, grad_accum=grad_accum, seed=3)
    per_epoch = len(epoch_batches(50, 4, 3, 0)) // grad_accum
    straight = batch_groups(tokens, cfg, 0, 0)
    seen = [next(straight) for _ in range(per_epoch + 2)]
    for epoch in (0, 1):
        batches = epoch_batches(50, 4, 3, epoch, tokens.lengths, True)
        mine = [(g, end) for e, end, g in seen if e == epoch]
        assert [end for _, end in mine] == [grad_accum * (k + 1) for k in range(len(mine))]
        for k, (group, _) in enumerate(mine):
            assert len(group) == grad_accum
            for j, examples in enumerate(group):
                np.testing.assert_array_equal(examples, tokens.examples[batches[k * grad_accum + j]])
    assert [e for e, _, _ in seen] == [0] * per_epoch + [1, 1]
    # a run stopped after group k starts again at (its epoch, the batch after it)
    for k in range(len(seen) - 1):
        epoch, end, _ = seen[k]
        epoch2, end2, group2 = next(batch_groups(tokens, cfg, epoch, end))
        nxt = seen[k + 1]
        assert (epoch2, end2) == nxt[:2]
        for a, b in zip(group2, nxt[2]):
            np.testing.assert_array_equal(a, b)
