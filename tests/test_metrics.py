"""Ranking metrics against hand-worked rankings: realistic ranks, filtering, summaries, known answers."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from kalmkg.evaluation.metrics import HITS_AT, answer_mask, filtered_ranks, known_answers, summarize

torch = pytest.importorskip("torch")


def reference_rank(row, target, removed=()):
    """PyKEEN's realistic rank in plain Python: mean of optimistic (1 + #better) and pessimistic
    (#better + #tied, the target included) ranks, after dropping the `removed` candidates."""
    t = row[target]
    kept = [s for j, s in enumerate(row) if j == target or j not in removed]
    better = sum(s > t for s in kept)
    tied = sum(s == t for s in kept)
    return ((1 + better) + (better + tied)) / 2


# ------------------------------------------------------------------ filtered_ranks
def test_ties_give_the_mean_of_optimistic_and_pessimistic_rank():
    # one better (0.9), three tied at 0.5 with the target: optimistic 2, pessimistic 4, realistic 3
    ranks = filtered_ranks([[0.5, 0.9, 0.5, 0.5]], [0])
    assert ranks.tolist() == [3.0]


def test_all_tied_row_ranks_in_the_middle():
    ranks = filtered_ranks([[0.2, 0.2, 0.2, 0.2, 0.2]], [3])
    assert ranks.tolist() == [3.0]  # optimistic 1, pessimistic 5


def test_distinct_scores_give_exact_ranks():
    scores = [[0.1, 0.4, 0.3, 0.2]] * 4
    ranks = filtered_ranks(scores, [1, 2, 3, 0])
    assert ranks.tolist() == [1.0, 2.0, 3.0, 4.0]


def test_lower_score_is_worse():
    # negative scores work: higher is better regardless of sign
    assert filtered_ranks([[-3.0, -1.0, -2.0]], [0]).tolist() == [3.0]
    assert filtered_ranks([[-3.0, -1.0, -2.0]], [1]).tolist() == [1.0]


def test_filtering_removes_other_known_answers():
    scores = [[0.9, 0.8, 0.7, 0.1]]
    assert filtered_ranks(scores, [2]).tolist() == [3.0]
    # entity 0 is another true answer: it no longer counts as better
    mask = [[True, False, False, False]]
    assert filtered_ranks(scores, [2], mask).tolist() == [2.0]
    # both 0 and 1 known: the target is first
    mask = [[True, True, False, False]]
    assert filtered_ranks(scores, [2], mask).tolist() == [1.0]


def test_filtering_never_removes_the_target():
    scores = [[0.9, 0.8, 0.7, 0.1]]
    # the mask marks every candidate, the target included: the target stays, the rest go
    mask = [[True, True, True, True]]
    assert filtered_ranks(scores, [2], mask).tolist() == [1.0]
    # the target alone marked: nothing removed, rank unchanged
    mask = [[False, False, True, False]]
    assert filtered_ranks(scores, [2], mask).tolist() == [3.0]


def test_filtered_entity_tied_with_target_no_longer_counts():
    scores = [[0.5, 0.5, 0.5, 0.1]]
    assert filtered_ranks(scores, [0]).tolist() == [2.0]  # 3 tied: (1 + 3) / 2
    mask = [[False, True, False, False]]
    assert filtered_ranks(scores, [0], mask).tolist() == [1.5]  # 2 tied: (1 + 2) / 2


def test_filtered_lower_entity_does_not_change_rank():
    scores = [[0.9, 0.8, 0.7, 0.1]]
    mask = [[False, False, False, True]]  # entity 3 scores below the target anyway
    assert filtered_ranks(scores, [1], mask).tolist() == [2.0]


def test_rows_are_independent():
    scores = np.array([[0.9, 0.8, 0.7], [0.1, 0.2, 0.3], [0.5, 0.5, 0.9]])
    mask = np.array([[True, False, False], [False, False, False], [False, False, True]])
    ranks = filtered_ranks(scores, np.array([2, 2, 0]), mask)
    # row 0: 0 removed, 1 better -> 2; row 1: best -> 1; row 2: 2 removed, tied with 1 -> 1.5
    assert ranks.tolist() == [2.0, 1.0, 1.5]


def test_numpy_and_torch_inputs_agree_and_inputs_are_not_modified():
    scores = np.array([[0.3, 0.7, 0.5, 0.7], [0.2, 0.2, 0.9, 0.1]], dtype=np.float32)
    mask = np.array([[False, True, False, False], [False, False, True, True]])
    targets = np.array([2, 0])
    scores_before, mask_before = scores.copy(), mask.copy()
    a = filtered_ranks(scores, targets, mask)
    t_scores, t_mask = torch.tensor(scores), torch.tensor(mask)
    b = filtered_ranks(t_scores, torch.tensor(targets), t_mask)
    assert isinstance(a, np.ndarray) and isinstance(b, np.ndarray)
    assert a.tolist() == b.tolist() == [2.0, 1.5]
    np.testing.assert_array_equal(scores, scores_before)
    np.testing.assert_array_equal(mask, mask_before)
    assert torch.equal(t_scores, torch.tensor(scores_before))
    assert torch.equal(t_mask, torch.tensor(mask_before))


def test_matches_plain_python_reference_on_random_tied_scores():
    rng = random.Random(0)
    B, N = 30, 12
    scores = [[float(rng.randint(0, 4)) for _ in range(N)] for _ in range(B)]  # many ties
    targets = [rng.randrange(N) for _ in range(B)]
    mask = [[rng.random() < 0.3 for _ in range(N)] for _ in range(B)]
    got = filtered_ranks(scores, targets, mask)
    want = [reference_rank(scores[i], targets[i], {j for j in range(N) if mask[i][j]}) for i in range(B)]
    assert got.tolist() == pytest.approx(want)
    unfiltered = filtered_ranks(scores, targets)
    assert unfiltered.tolist() == pytest.approx([reference_rank(scores[i], targets[i]) for i in range(B)])
    assert all(1.0 <= r <= N for r in got.tolist())


def test_empty_batch_gives_no_ranks():
    ranks = filtered_ranks(np.zeros((0, 5), dtype=np.float32), np.zeros(0, dtype=np.int64),
                           np.zeros((0, 5), dtype=bool))
    assert ranks.shape == (0,)


# ------------------------------------------------------------------ summarize
def test_summarize_hand_worked_values():
    s = summarize([1, 2, 4, 20])
    assert s["count"] == 4
    assert s["mr"] == pytest.approx(6.75)
    assert s["mrr"] == pytest.approx((1 + 0.5 + 0.25 + 0.05) / 4)
    assert s["hits@1"] == pytest.approx(0.25)
    assert s["hits@3"] == pytest.approx(0.5)
    assert s["hits@10"] == pytest.approx(0.75)
    assert set(s) == {"count", "mr", "mrr"} | {f"hits@{k}" for k in HITS_AT}


def test_summarize_fractional_realistic_ranks():
    s = summarize([1.5, 3.5, 10.5])
    assert s["hits@1"] == 0.0  # 1.5 is not a hit at 1
    assert s["hits@3"] == pytest.approx(1 / 3)  # only 1.5
    assert s["hits@10"] == pytest.approx(2 / 3)  # 10.5 is not a hit at 10
    assert s["mr"] == pytest.approx(15.5 / 3)
    assert s["mrr"] == pytest.approx((1 / 1.5 + 1 / 3.5 + 1 / 10.5) / 3)


def test_summarize_boundaries_are_inclusive():
    s = summarize([1, 3, 10])
    assert (s["hits@1"], s["hits@3"], s["hits@10"]) == pytest.approx((1 / 3, 2 / 3, 1.0))


def test_summarize_accepts_numpy_lists_and_generators_alike():
    ranks = [1.0, 2.0, 4.0, 20.0]
    a = summarize(np.array(ranks))
    b = summarize(ranks)
    c = summarize(r for r in ranks)
    assert a == b == c
    assert isinstance(a["count"], int) and isinstance(a["mrr"], float)


def test_summarize_of_filtered_ranks():
    ranks = filtered_ranks([[0.5, 0.9, 0.5, 0.5], [0.9, 0.1, 0.2, 0.3]], [0, 0])
    s = summarize(ranks)
    assert s["count"] == 2
    assert s["mr"] == pytest.approx(2.0)  # (3 + 1) / 2
    assert s["mrr"] == pytest.approx((1 / 3 + 1) / 2)
    assert s["hits@1"] == pytest.approx(0.5)


@pytest.mark.parametrize("empty", [[], np.array([]), iter(())])
def test_summarize_empty_input(empty):
    s = summarize(empty)
    assert s["count"] == 0
    for key in ("mr", "mrr", *(f"hits@{k}" for k in HITS_AT)):
        assert math.isnan(s[key]), key


# ------------------------------------------------------------------ known_answers / answer_mask
def test_known_answers_both_directions():
    triples = np.array([[0, 0, 1], [0, 0, 2], [3, 1, 1], [0, 0, 1]])  # the last one repeats
    answers = known_answers(triples, num_relations=2)
    assert answers == {
        (0, 0): {1, 2},  # (h, r) -> t
        (3, 1): {1},
        (1, 2): {0},  # (t, r + R) -> h
        (2, 2): {0},
        (1, 3): {3},
    }


def test_known_answers_are_the_sets_a_dict_would_hold_in_arrays():
    rng = np.random.default_rng(0)
    triples = np.stack([rng.integers(0, 40, 500), rng.integers(0, 3, 500), rng.integers(0, 40, 500)], 1)
    plain: dict = {}
    for h, r, t in triples.tolist():
        plain.setdefault((h, r), set()).add(t)
        plain.setdefault((t, r + 3), set()).add(h)
    answers = known_answers(triples, num_relations=3)
    assert answers == plain and len(answers) == len(plain)
    assert answers.get((41, 0)) is None and (41, 0) not in answers and answers.get((0, 7), ()) == ()
    some = next(iter(plain))
    assert answers[some] == frozenset(plain[some])
    with pytest.raises(KeyError):
        answers[(99, 1)]
    # a relation id past 2R never reads another entity's answers (its key would be theirs)
    h, r = some
    assert (h - 1, r + 6) not in answers


def test_known_answers_of_no_triples_is_empty():
    assert known_answers(np.zeros((0, 3), dtype=np.int64), 5) == {}


def test_answer_mask_marks_known_answers_only():
    answers = {(0, 0): {1, 2}, (1, 2): {0}}
    mask = answer_mask([(0, 0), (1, 2), (7, 1)], answers, 4)
    assert mask.dtype == torch.bool
    assert mask.tolist() == [
        [False, True, True, False],
        [True, False, False, False],
        [False, False, False, False],  # unknown query: nothing marked
    ]


def test_answer_mask_accepts_numpy_query_rows():
    answers = known_answers(np.array([[0, 0, 1], [2, 1, 0]]), 2)
    queries = np.array([[0, 0], [0, 3], [1, 2]])  # rows of numpy ints
    mask = answer_mask(queries, answers, 3)
    assert mask.tolist() == [[False, True, False], [False, False, True], [True, False, False]]


def test_answer_mask_of_no_queries():
    assert tuple(answer_mask([], {(0, 0): {1}}, 6).shape) == (0, 6)


def test_filtered_ranking_end_to_end_for_both_directions():
    # (0, r0, 1), (0, r0, 2), (3, r0, 2); R = 1, so the inverse relation is 1
    triples = np.array([[0, 0, 1], [0, 0, 2], [3, 0, 2]])
    answers = known_answers(triples, 1)
    queries = [(0, 0), (2, 1)]  # tail query of (0, r0, 2), head query of (3, r0, 2)
    targets = [2, 3]
    scores = torch.tensor([[0.0, 0.9, 0.5, 0.8, 0.1],   # 1 (known) and 3 (not known) beat the target 2
                           [0.95, 0.0, 0.0, 0.5, 0.7]])  # 0 (known: 0 -r0-> 2) and 4 beat target 3
    mask = answer_mask(queries, answers, 5)
    assert filtered_ranks(scores, targets).tolist() == [3.0, 3.0]
    assert filtered_ranks(scores, targets, mask).tolist() == [2.0, 2.0]


def test_by_relation_summarizes_each_relations_queries_most_first():
    from kalmkg.evaluation.metrics import by_relation

    out = by_relation(np.array([1.0, 2.0, 4.0, 1.0, 10.0]), np.array([3, 0, 3, 3, 0]))
    assert list(out) == [3, 0]
    assert out[3]["count"] == 3 and out[3]["mrr"] == pytest.approx((1 + 1 / 4 + 1) / 3)
    assert out[0]["count"] == 2 and out[0]["hits@10"] == 1.0 and out[0]["mr"] == 6.0
