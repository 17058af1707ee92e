"""The structure model fused with the text scores (kalmkg/structure): ComplEx's math against complex
numbers, its training learning what a graph's structure says, its file, and the fusion: the extra scores,
the fitted weight, and a run's evaluate / predict ranking by text and structure together."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kalmkg.errors import KalmkgError
from kalmkg.evaluation.metrics import known_answers
from kalmkg.structure import complex as cx
from kalmkg.structure.fusion import Fusion, fit_weight, open_fusion
from kalmkg.structure.model import StructureModel, keys_hash
from kalmkg.structure.train import StructureSettings, structure_mrr, train_structure


def as_complex(x: np.ndarray) -> np.ndarray:
    k = x.shape[1] // 2
    return x[:, :k] + 1j * x[:, k:]


def test_scores_are_complex_trilinear_products_in_numpy_and_torch():
    import torch

    rng = np.random.default_rng(0)
    h, r, e = rng.normal(size=(4, 6)), rng.normal(size=(4, 6)), rng.normal(size=(5, 6))
    expected = np.real((as_complex(h) * as_complex(r)) @ np.conj(as_complex(e)).T)
    assert np.allclose(cx.scores(h, r, e), expected)
    assert np.allclose(cx.scores(torch.tensor(h), torch.tensor(r), torch.tensor(e)).numpy(), expected)
    assert cx.n3(h) == pytest.approx(float((np.abs(as_complex(h)) ** 3).sum()))


def group_graph(groups: int = 4, size: int = 8, seed: int = 0):
    """Entities in groups; `next` links every entity to every member of the next group, `same` to a
    few of its own group: the structure decides the answers, entity names say nothing. 10 % held out."""
    rng = np.random.default_rng(seed)
    n = groups * size
    triples = [(i, 0, j) for i in range(n) for j in range(n) if j // size == (i // size + 1) % groups]
    triples += [(i, 1, j) for i in range(n) for j in range(n) if i != j and i // size == j // size and rng.random() < .5]
    triples = np.array(triples)
    held = rng.random(len(triples)) < 0.1
    keys = [f"e{i}" for i in range(n)]
    return triples[~held], triples[held], triples, keys, ["next", "same"]


def test_training_learns_the_graph_structure():
    train, valid, every, keys, rels = group_graph()
    model = train_structure(train, valid, every, keys, rels, StructureSettings(dim=16, epochs=60, seed=0))
    answers = known_answers(every, len(rels))
    mrr = structure_mrr(model.entities, model.relations, valid, answers, len(rels))
    untrained = train_structure(train, valid, every, keys, rels, StructureSettings(dim=16, epochs=1, lr=1e-9))
    assert mrr > 0.8 > structure_mrr(untrained.entities, untrained.relations, valid, answers, len(rels)) + 0.3
    assert model.info["valid_mrr"] == pytest.approx(mrr, abs=1e-4)  # the best epoch's tables are kept
    assert model.info["best_epoch"] <= model.info["epochs"] and model.info["id"]
    assert (model.num_entities, model.num_relations) == (len(keys), 2)


def test_training_stops_at_its_time_cap():
    train, _, every, keys, rels = group_graph()
    no_valid = np.zeros((0, 3), dtype=np.int64)  # nothing to stop on but the clock
    model = train_structure(train, no_valid, every, keys, rels, StructureSettings(dim=8, epochs=10_000, minutes=0.02))
    assert model.info["stopped"] == "time" and model.info["epochs"] < 10_000
    assert model.info["valid_mrr"] is None and model.info["best_epoch"] == model.info["epochs"]  # the last kept


def small_model(n: int = 3, r: int = 2, seed: int = 0) -> StructureModel:
    rng = np.random.default_rng(seed)
    keys, rels = [f"e{i}" for i in range(n)], [f"r{i}" for i in range(r)]
    return StructureModel(rng.normal(size=(n, 4)).astype(np.float32), rng.normal(size=(2 * r, 4)).astype(np.float32),
                          keys_hash(keys), keys_hash(rels), {"id": "s1"})


def test_scores_follow_the_callers_numbering_of_inverses_and_skip_unknown_queries():
    model = small_model()
    # the caller has 3 relations now (one added after training): its inverse of r1 is 3 + 1 = 4
    scores, known = model.scores(np.array([[0, 1], [2, 4], [1, 2], [3, 0]]), num_relations=3)
    assert known.tolist() == [True, True, False, False]  # relation 2 and entity 3 are new
    assert np.allclose(scores[0], cx.scores(model.entities[[0]], model.relations[[1]], model.entities)[0])
    assert np.allclose(scores[1], cx.scores(model.entities[[2]], model.relations[[2 + 1]], model.entities)[0])
    assert not scores[2:].any()


def test_extra_scores_in_cosine_units_and_new_candidates_at_the_mean():
    model = small_model()
    fusion = Fusion(model, weight=2.0, temperature=0.05)
    extra = fusion.extra(np.array([[0, 1], [5, 0]]), num_relations=2, num_entities=5)
    raw, _ = model.scores(np.array([[0, 1]]), 2)
    assert extra.shape == (2, 5)
    assert np.allclose(extra[0, :3], 0.05 * 2.0 * raw[0])
    assert np.allclose(extra[0, 3:], 0.05 * 2.0 * raw[0].mean())  # entities 3, 4 came after training
    assert not extra[1].any()  # entity 5 is unknown to the model: text alone


def test_file_round_trip_fit_check_and_a_damaged_file(tmp_path):
    model = small_model()
    model.save(tmp_path)
    again = StructureModel.load(tmp_path)
    assert np.array_equal(again.entities, model.entities) and np.array_equal(again.relations, model.relations)
    assert again.info == {"id": "s1"}
    assert again.fits(["e0", "e1", "e2", "e3"], ["r0", "r1", "r2"])  # the graph grew: still its rows
    assert not again.fits(["e0", "x", "e2"], ["r0", "r1"])  # another graph
    assert StructureModel.load(tmp_path / "none") is None
    (tmp_path / "structure.npz").write_bytes(b"not a zip")
    with pytest.raises(KalmkgError, match="cannot be read"):
        StructureModel.load(tmp_path)


class FixedScores(StructureModel):
    """A structure model whose scores are given (rows in query order)."""

    def __init__(self, rows: np.ndarray):
        super().__init__(np.zeros((rows.shape[1], 2), np.float32), np.zeros((2, 2), np.float32), "", "", {"id": "x"})
        self.rows = rows.astype(np.float32)

    def scores(self, queries, num_relations, num_entities=None):
        return self.rows[: len(queries)], np.ones(len(queries), dtype=bool)


def fit_case(text_noise: float, structure_noise: float):
    """8 queries over 6 entities, answer (q + 1) % 6; text and structure scores each point at the answer
    (by .5 cosine, by 10 logits) under noise of the given size."""
    rng = np.random.default_rng(1)
    queries = np.array([[i % 6, 0] for i in range(8)])
    targets = (queries[:, 0] + 1) % 6
    structure = FixedScores(np.eye(6)[targets] * 10 + structure_noise * rng.normal(size=(8, 6)))
    text = (np.eye(6)[targets] * 0.5 + text_noise * rng.normal(size=(8, 6))).astype(np.float32)
    return structure, queries, targets, text


@pytest.mark.parametrize("text_noise, structure_noise, expect", [(0.0, 50.0, "text"), (0.5, 0.0, "structure")])
def test_the_fitted_weight_follows_the_expert_that_is_right(text_noise, structure_noise, expect):
    model, queries, targets, text = fit_case(text_noise, structure_noise)
    fit = fit_weight(lambda a, b: text[a:b], model, queries, targets, {}, 1, temperature=0.05)
    if expect == "text":
        assert fit["weight"] == 0.0 and fit["mrr"]["0.0"] == 1.0
    else:
        assert fit["weight"] > 0 and fit["mrr"][str(fit["weight"])] == 1.0 > fit["mrr"]["0.0"]
    assert fit["structure_alone_mrr"] == pytest.approx(
        float((1 / model.ranks(queries, targets, {}, 1, 6)).mean()), abs=1e-4)
    assert fit["queries"] == 8


# ------------------------------------------------------------------------------------- through a run
def test_a_run_ranks_by_text_and_structure_once_fitted_on_valid(tiny_run_ws):
    """The tiny run trained its structure model; evaluate --split valid fits the weight; test ranks then
    fuse, with each expert alone beside; predict adds the same share; a resumed run (other weights)
    falls back to text alone with one warning."""
    from kalmkg.evaluation.link_prediction import evaluate_run
    from kalmkg.index import embed
    from kalmkg.loaded import load_model
    from kalmkg.prediction import Predictor

    ws = tiny_run_ws
    run_dir = ws.runs_dir / "r"
    assert (run_dir / "structure.npz").is_file()
    loaded = load_model(ws, run="r")
    fusion, note = open_fusion(loaded)
    assert fusion is not None and fusion.weight is None and "evaluate --split valid" in note
    embed(ws, loaded)
    before = evaluate_run(ws, split="test", loaded=loaded)
    assert "fusion" not in before and any("not fitted" in w for w in before["warnings"])

    valid = evaluate_run(ws, split="valid", loaded=loaded)
    fitted = json.loads((run_dir / "fusion.json").read_text())
    assert fitted["weights"] == loaded.weights and fitted["structure"] == fusion.structure.info["id"]
    assert valid["fusion"]["weight"] == fitted["weight"]
    # on the data it was fitted on, the fused MRR is the best of the grid, never below text alone
    assert valid["metrics"]["both"]["mrr"] >= valid["components"]["text"]["both"]["mrr"] - 1e-9

    test = evaluate_run(ws, split="test", loaded=loaded)
    assert test["components"]["text"] == before["metrics"]
    assert set(test["components"]) == {"text", "structure"}

    predictor = Predictor.open(ws, run="r", loaded=loaded)
    assert predictor.fusion is not None and predictor.fusion.weight == fitted["weight"]
    assert predictor.query(0, 0, "tail", k=1).to_json()["structure_weight"] == fitted["weight"]
    # whatever weight was fitted, a strong one shows the share is added: the best fused score comes first
    predictor.fusion.weight = 5.0
    record = json.loads((run_dir / "predictions-test.jsonl").read_text().splitlines()[0])  # a tail query
    head_id = loaded.entity_keys.index(record["triple"][0])
    rel_id = loaded.relation_keys.index(record["triple"][1])
    result = predictor.query(head_id, rel_id, "tail", k=3)
    q = predictor.encoder.encode([predictor.query_text(head_id, rel_id, "tail")], 1)[0]
    cosine = predictor.index.vectors() @ (q / np.linalg.norm(q))
    extra = predictor._extra(head_id, rel_id, "tail")[0]
    assert np.abs(extra).max() > 0
    fused = np.delete(cosine + extra, head_id)  # its own head is left out
    assert [c.score for c in result.candidates] == pytest.approx(sorted(fused, reverse=True)[:3], abs=1e-5)

    fitted["weights"] = "another"
    (run_dir / "fusion.json").write_text(json.dumps(fitted))
    stale, note = open_fusion(load_model(ws, run="r"))
    assert stale.weight is None and "not fitted" in note


def test_entities_added_after_training_get_rows_folded_in_from_their_facts():
    """The last entity is unseen in training; its facts arrive later. Its folded-in row is the normalised
    sum of its facts' query factors, and ranks its held-out facts near the top; an entity with no facts
    gets no row (a query about it: text alone; as a candidate: the row mean)."""
    train, _, every, keys, rels = group_graph()
    new = len(keys) - 1
    touches = (every[:, 0] == new) | (every[:, 2] == new)
    model = train_structure(train[(train[:, 0] != new) & (train[:, 2] != new)], np.zeros((0, 3), np.int64),
                            every[~touches], keys[:-1], rels, StructureSettings(dim=16, epochs=60))
    facts = every[touches]
    context, held = facts[::2], facts[1::2]
    grown = model.with_new_entities(context, len(keys) + 1, len(rels))  # and one more without any fact
    assert grown.num_entities == len(keys) + 1 and grown.row_mask().tolist() == [True] * len(keys) + [False]
    into = context[context[:, 2] == new]
    out = context[context[:, 0] == new]
    expected = (cx.query_factors(model.entities[into[:, 0]], model.relations[into[:, 1]]).sum(0)
                + cx.query_factors(model.entities[out[:, 2]], model.relations[out[:, 1] + len(rels)]).sum(0))
    row = grown.entities[new]
    assert np.allclose(row / np.linalg.norm(row), expected / np.linalg.norm(expected), atol=1e-5)
    assert np.linalg.norm(row) == pytest.approx(np.median(np.linalg.norm(model.entities, axis=1)), rel=1e-5)
    # its held-out facts, in both directions, against every entity (filtered by every fact)
    answers = known_answers(every, len(rels))
    queries = np.concatenate([held[:, [0, 1]], np.stack([held[:, 2], held[:, 1] + len(rels)], 1)])
    targets = np.concatenate([held[:, 2], held[:, 0]])
    folded = grown.ranks(queries, targets, answers, len(rels), len(keys))
    unfolded = model.ranks(queries, targets, answers, len(rels), len(keys))
    assert (1 / folded).mean() > 0.8 and (1 / folded).mean() > (1 / unfolded).mean() + 0.2, (folded, unfolded)
    _, known = grown.scores(np.array([[new, 0], [len(keys), 0]]), len(rels))
    assert known.tolist() == [True, False]
    extra = Fusion(grown, 1.0, 1.0).extra(np.array([[0, 0]]), len(rels), len(keys) + 1)[0]
    assert extra[-1] == pytest.approx(extra[:-1].mean(), rel=1e-5)  # the factless one at the row mean
