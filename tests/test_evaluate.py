"""`evaluate_run` (kalmkg.evaluation.link_prediction): the paper's protocol through the whole command path.

A hand-worked ranking (a fake encoder whose scores are chosen by hand: ties, filtered answers from
train and test, head prediction through the inverse query), then the tiny trained run through
embed -> evaluate, the files it writes, the untrained-base baseline, --limit, and errors. The metric
functions themselves are unit-tested in test_metrics.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from helpers_graph import ingest_into, write
from kalmkg.errors import KalmkgError
from kalmkg.store import Store
from kalmkg.workspace import Workspace


# --------------------------------------------------------------------------------------------- by hand
class TableEncoder:
    """Texts -> vectors from a fixed table (a KeyError for any text the test did not plan for)."""

    def __init__(self, table: dict[str, list[float]]):
        self.table = table
        self.calls = 0

    def encode(self, texts, batch_size=64):
        self.calls += 1
        return np.array([self.table[t] for t in texts], dtype=np.float32)


@pytest.fixture()
def hand_case(tmp_path):
    """Entities a..e (ids 0..4), one relation r.  train: a r b, a r c, c r d;  test: a r d, e r d."""
    from kalmkg.loaded import LoadedModel
    from kalmkg.text import hr_view, tail_view

    root = tmp_path / "ws"
    ingest_into(root, [write(tmp_path / "train.tsv", "a\tr\tb\na\tr\tc\nc\tr\td\n")], split="train")
    ingest_into(root, [write(tmp_path / "test.tsv", "a\tr\td\ne\tr\td\n")], split="test")
    ws = Workspace(root)
    with Store.open(ws) as store:
        assert store.entity_table()["key"].to_pylist() == ["a", "b", "c", "d", "e"]
        fingerprint = store.fingerprint()
    names = ["a", "b", "c", "d", "e"]
    # entity j's vector is the j-th unit vector, so a query vector *is* its row of scores
    table = {tail_view(x): np.eye(5)[j].tolist() for j, x in enumerate(names)}
    table[hr_view("a", "r")] = [0.9, 0.95, 0.5, 0.5, 0.5]
    table[hr_view("e", "r")] = [0.2, 0.2, 0.2, 0.6, 0.7]
    table[hr_view("d", "inverse of r")] = [0.3, 0.3, 0.9, 0.1, 0.8]  # both head queries: (?, r, d)
    loaded = LoadedModel(tokenizer=None, raw_texts=names, relation_texts=["r", "inverse of r"], fingerprint="run:hand",
                         weights="w", name="hand", run_dir=root / "runs" / "hand", max_entity_tokens=50,
                         graph_fingerprint=fingerprint, entity_keys=names, entity_labels=names,
                         relation_keys=["r"], relation_labels=["r"])
    return ws, loaded, TableEncoder(table)


def test_metrics_match_a_hand_worked_ranking(hand_case):
    """Realistic rank = (2 * better + 1 + tied) / 2 over the candidates left after filtering:

    tail (a, r, ?) target d: scores a .9 b .95 c .5 d .5 e .5; b, c known (train) -> filtered;
        a better, d and e tied -> rank (2 + 1 + 2) / 2 = 2.5
    tail (e, r, ?) target d: e .7 better, d alone at .6 -> rank 2
    head (?, r, d) target a: known heads a (test), c (train), e (test); c, e filtered;
        a and b tied at .3, nothing better -> rank 1.5
    head (?, r, d) target e: a, c filtered; e .8 best -> rank 1
    """
    from kalmkg.evaluation.link_prediction import evaluate_run

    ws, loaded, encoder = hand_case
    out = evaluate_run(ws, loaded=loaded, encoder=encoder)
    m = out["metrics"]
    assert (m["tail"]["count"], m["head"]["count"], m["both"]["count"]) == (2, 2, 4)
    assert m["tail"]["mr"] == pytest.approx((2.5 + 2) / 2)
    assert m["tail"]["mrr"] == pytest.approx((1 / 2.5 + 1 / 2) / 2)
    assert (m["tail"]["hits@1"], m["tail"]["hits@3"], m["tail"]["hits@10"]) == (0.0, 1.0, 1.0)
    assert m["head"]["mr"] == pytest.approx((1.5 + 1) / 2)
    assert m["head"]["mrr"] == pytest.approx((1 / 1.5 + 1) / 2)
    assert (m["head"]["hits@1"], m["head"]["hits@3"]) == (0.5, 1.0)
    assert m["both"]["mr"] == pytest.approx((2.5 + 2 + 1.5 + 1) / 4)
    assert m["both"]["mrr"] == pytest.approx((1 / 2.5 + 1 / 2 + 1 / 1.5 + 1) / 4)
    assert (m["both"]["hits@1"], m["both"]["hits@3"]) == (0.25, 1.0)
    assert out["timing"]["entity_vectors"] == "encoded" and "no entity index" in out["index_not_used"]

    records = [json.loads(line) for line in Path(out["predictions_path"]).read_text().splitlines()]
    assert [(r["direction"], r["triple"], r["rank"]) for r in records] == [
        ("tail", ["a", "r", "d"], 2.5), ("tail", ["e", "r", "d"], 2.0),
        ("head", ["a", "r", "d"], 1.5), ("head", ["e", "r", "d"], 1.0)]
    assert records[0]["query"] == ["a", "r", "?"] and records[2]["query"] == ["?", "r", "d"]
    assert records[0]["target"] == {"key": "d", "label": "d"}
    # the top-3 is the filtered one: b (.95, a known answer) is not shown, the target is
    top0 = [t["key"] for t in records[0]["top"]]
    assert top0[0] == "a" and set(top0[1:]) == {"d", "e"}
    assert [t["key"] for t in records[3]["top"]] == ["e", "b", "d"]
    assert [t["score"] for t in records[3]["top"]] == pytest.approx([0.8, 0.3, 0.1])

    saved = json.loads(Path(out["eval_path"]).read_text())
    assert Path(out["eval_path"]) == loaded.run_dir / "eval-test.json"
    assert saved["metrics"] == json.loads(json.dumps(m))
    # per relation (one here: all four queries) and the two charts beside the JSON
    assert [(r["key"], r["count"]) for r in saved["relations"]] == [("r", 4)]
    assert saved["relations"][0]["mrr"] == pytest.approx(m["both"]["mrr"])
    for name in ("relations", "ranks"):
        chart = Path(saved["charts"][name])
        assert chart == loaded.run_dir / f"eval-test-{name}.png" and chart.read_bytes()[:4] == b"\x89PNG"


def test_valid_split_and_unknown_or_empty_splits(hand_case):
    from kalmkg.evaluation.link_prediction import evaluate_run

    ws, loaded, encoder = hand_case
    with pytest.raises(KalmkgError, match=r"the valid split is empty"):
        evaluate_run(ws, split="valid", loaded=loaded, encoder=encoder)
    with pytest.raises(KalmkgError, match=r"unknown split 'dev'; use one of: train, valid, test"):
        evaluate_run(ws, split="dev", loaded=loaded, encoder=encoder)


# --------------------------------------------------------------------------------------------- tiny run
@pytest.fixture()
def ws(tiny_run_ws) -> Workspace:
    """A private copy of the tiny trained run (see conftest)."""
    return tiny_run_ws


def test_tiny_run_embed_then_evaluate_agrees_with_training_validation(ws):
    from kalmkg.evaluation.link_prediction import evaluate_run
    from kalmkg.evaluation.ranking import rank_queries, sample_triples
    from kalmkg.index import embed
    from kalmkg.loaded import load_model

    loaded = load_model(ws)
    embed(ws, loaded)
    out = evaluate_run(ws, split="test", limit=10, seed=3)
    assert out["model"] == "run:r" and out["triples"] == 10 and out["queries"] == 20
    assert out["timing"]["entity_vectors"] == "index" and "index_not_used" not in out
    assert set(out["timing"]) == {"entity_vectors", "entity_encoding_s", "query_encoding_s", "ranking_s", "total_s"}

    # the same sample ranked by the function training validates with (which encodes the entities itself)
    with Store.open(ws) as store:
        test, everything = store.triples_array(("test",)), store.triples_array()
    sample = sample_triples(test, 10, seed=3)
    reference = rank_queries(loaded.model, loaded.tokenizer, loaded.texts, sample, everything)
    for direction in ("tail", "head", "both"):
        for key, value in reference[direction].items():
            assert out["metrics"][direction][key] == pytest.approx(value, abs=1e-9), (direction, key)

    records = [json.loads(line) for line in Path(out["predictions_path"]).read_text().splitlines()]
    assert len(records) == 20
    np.testing.assert_allclose([r["rank"] for r in records], reference["ranks"])
    keys = loaded.entity_keys
    assert [r["triple"] for r in records[:10]] == [[keys[h], loaded.relation_keys[r], keys[t]] for h, r, t in sample]
    assert all(len(r["top"]) == 3 and r["top"][0]["score"] >= r["top"][1]["score"] >= r["top"][2]["score"]
               for r in records)
    assert Path(out["eval_path"]) == ws.runs_dir / "r" / "eval-test.json"
    assert Path(out["predictions_path"]) == ws.runs_dir / "r" / "predictions-test.jsonl"
    assert not [p for p in (ws.runs_dir / "r").iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_limit_is_a_fixed_seed_sample(ws):
    from kalmkg.evaluation.link_prediction import evaluate_run

    def triples(out):
        return [json.loads(line)["triple"] for line in Path(out["predictions_path"]).read_text().splitlines()]

    first = triples(evaluate_run(ws, split="valid", limit=5, seed=0, use_index=False))
    again = triples(evaluate_run(ws, split="valid", limit=5, seed=0, use_index=False))
    other = triples(evaluate_run(ws, split="valid", limit=5, seed=1, use_index=False))
    assert first == again and first != other and len(first) == 10
    full = evaluate_run(ws, split="valid", use_index=False)
    with Store.open(ws) as store:
        assert full["triples"] == len(store.triples_array(("valid",)))


def test_the_valid_split_calibrates_the_runs_predictions(ws):
    """evaluate --split valid writes calibration.json: the precision curve of the first answers `predict`
    gives, by the model's probability, which the predictor computes the same way."""
    from kalmkg.evaluation.calibration import read_calibration
    from kalmkg.evaluation.link_prediction import evaluate_run
    from kalmkg.index import embed
    from kalmkg.loaded import load_model
    from kalmkg.prediction import Predictor

    loaded = load_model(ws)
    embed(ws, loaded)
    out = evaluate_run(ws, split="test", loaded=loaded)
    assert "calibration_path" not in out and read_calibration(loaded.run_dir) is None  # test stays unseen
    out = evaluate_run(ws, split="valid", loaded=loaded)
    cal = read_calibration(loaded.run_dir)
    assert Path(out["calibration_path"]) == loaded.run_dir / "calibration.json"
    assert (cal.model, cal.weights, cal.split, cal.temperature) == (loaded.fingerprint, loaded.weights, "valid", 0.05)
    # only the held-out queries no other fact answers (the sample graph pairs capital with capital of ...)
    from kalmkg.evaluation.calibration import unconnected
    from kalmkg.store import Store

    with Store.open(ws) as store:
        valid, every, R = store.triples_array(("valid",)), store.triples_array(), store.relation_table().num_rows
    queries = np.concatenate([valid[:, [0, 1]], np.stack([valid[:, 2], valid[:, 1] + R], 1)])
    alone = unconnected(queries, np.concatenate([valid[:, 2], valid[:, 0]]), every)
    assert 0 < cal.queries == alone.sum() < out["queries"] and 0 <= cal.hit_rate <= 1
    scores = [p.score for p in cal.curve]
    assert scores == sorted(scores, reverse=True) and cal.curve[-1].support == cal.queries
    assert cal.curve[-1].precision == pytest.approx(cal.hit_rate, abs=1e-4)
    assert all(0 < p.score <= 1 for p in cal.curve)
    # the predictor's probabilities: a distribution over the candidates left
    result = Predictor.open(ws, loaded=loaded).query(0, 0, "tail", k=200, filter_known=True, temperature=0.05)
    probs = [c.probability for c in result.candidates]
    assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-4)


def test_untrained_base_is_evaluated_into_its_own_folder(ws, tiny_model):
    from kalmkg.evaluation.link_prediction import evaluate_run
    from kalmkg.index import embed
    from kalmkg.loaded import load_model

    embed(ws, load_model(ws))  # the run's index: not for the base model
    out = evaluate_run(ws, base=str(tiny_model), split="valid", limit=6)
    folder = ws.root / "evals" / f"base-{Path(tiny_model).name}"
    assert Path(out["eval_path"]) == folder / "eval-valid.json" and (folder / "predictions-valid.jsonl").exists()
    assert out["model"].startswith("base:") and out["timing"]["entity_vectors"] == "encoded"
    assert "built with run r" in out["index_not_used"]
    saved = json.loads((folder / "eval-valid.json").read_text())
    assert saved["metrics"]["both"]["count"] == 12 and 0 < saved["metrics"]["both"]["mrr"] <= 1
    assert not (ws.runs_dir / "r" / "eval-valid.json").exists()


# --------------------------------------------------------------------------------------------- generative
def test_answers_are_compared_after_normalisation():
    from kalmkg.evaluation.generative import NO, YES, Case, is_correct, names_known
    from kalmkg.text import normalize_label as normalize

    assert normalize("  The Eiffel-Tower. ") == "eiffel tower" and normalize("Émile_Zola") == "emile zola"
    tail = Case("tail", "", "Eiffel Tower", (0, 0, 0))
    assert is_correct(tail, "the eiffel tower") and not is_correct(tail, "Eiffel Tower, a tower in Paris")
    yes, no = Case("classification", "", YES, (0, 0, 0)), Case("classification", "", NO, (0, 0, 0))
    assert is_correct(yes, "Yes, this is true") and not is_correct(yes, "No, this is not true")
    assert is_correct(no, "no") and not is_correct(no, "maybe") and not is_correct(no, "not sure")
    view = Case("tail-completion", "", "Paris", (0, 0, 0), known=("Lyon", "Paris", "Tesla, Inc."))
    assert names_known(view, "{ Lyon, a city }") and not is_correct(view, "{ Lyon, a city }")  # true, not held out
    assert names_known(view, "{ Tesla, Inc., a company }") and not names_known(view, "{ Tesla, a scientist }")
    assert not names_known(view, "{ Marseille }") and not names_known(view, "Lyon")
    assert is_correct(view, "{ Paris, the capital of France }") and is_correct(view, "{ paris }")
    assert is_correct(view, "{ Paris")  # cut by the token budget after the name
    assert not is_correct(view, "{ Paris Saint-Germain, a club }") and not is_correct(view, "Paris, the capital")
    assert not is_correct(view, "{ Lyon, Paris }")


def test_generative_cases_have_fixed_shots_and_honest_corruptions(ws):
    from kalmkg.evaluation.generative import COMPLETION, NO, SHOTS, TASKS, YES, build_cases
    from kalmkg.text import GraphTexts, hr_view, store_entity_texts, store_relation_texts

    with Store.open(ws) as store:
        test, train, everything = (store.triples_array(("test",)), store.triples_array(("train",)),
                                   store.triples_array())
        labels = store.entity_table()["label"].to_pylist()
        rels = store.relation_table()["label"].to_pylist()
        texts = GraphTexts(store_entity_texts(store.entity_table()), store_relation_texts(store.relation_table()))
    known = set(map(tuple, everything.tolist()))
    cases = build_cases(test[:6], train, known, labels, rels, seed=0, texts=texts)
    assert [c.task for c in cases] == [t for t in TASKS for _ in range(6)]
    for task in TASKS:
        prompts = [c.prompt for c in cases if c.task == task]
        cut = "\n" if task in COMPLETION else "\n\n"
        prefix = prompts[0][: prompts[0].rindex(cut)]
        assert all(p.startswith(prefix) for p in prompts) and prefix.count(cut) == SHOTS - (task in COMPLETION)
    # the completion tasks are the training format: the hr view (head prediction: the inverse relation)
    h, r, t = test[0].tolist()
    first = {c.task: c for c in cases if c.triple == (h, r, t)}
    assert first["tail-completion"].prompt.endswith("\n" + hr_view(texts.entities[h], texts.relations[r]))
    assert first["head-completion"].prompt.endswith("\n" + hr_view(texts.entities[t], "inverse of " + rels[r]))
    assert (first["tail-completion"].target, first["head-completion"].target) == (labels[t], labels[h])
    # every known answer of the query, from any split, is what "names a known answer" accepts
    assert set(first["tail-completion"].known) == {labels[c] for a, b, c in known if (a, b) == (h, r)}
    assert set(first["head-completion"].known) == {labels[a] for a, b, c in known if (b, c) == (r, t)}
    assert labels[t] in first["tail-completion"].known and labels[h] in first["head-completion"].known
    assert len(build_cases(test[:6], train, known, labels, rels, seed=0)) == 6 * (len(TASKS) - len(COMPLETION))
    tails = [c for c in cases if c.task == "tail"]
    assert [c.target for c in tails] == [labels[t] for _, _, t in test[:6].tolist()]
    assert tails[0].prompt.endswith(f"Head: {labels[test[0, 0]]}\nRelation: {rels[test[0, 1]]}\nTail:")
    assert all(r in [c for c in cases if c.task == "relation"][0].prompt for r in rels)
    checks = [c for c in cases if c.task == "classification"]
    assert [c.target for c in checks] == [YES, NO] * 3
    assert all((c.triple in known) == (c.target == YES) for c in checks)


def test_generative_evaluation_of_the_tiny_run_and_its_base(ws, monkeypatch):
    from kalmkg.evaluation import generative

    out = generative.evaluate_generative(ws, limit=4, seed=0)
    assert set(out["accuracy"]) == {"run", "base"}
    for name in ("run", "base"):
        assert {t: a["count"] for t, a in out["accuracy"][name].items()} == dict.fromkeys(generative.TASKS, 4)
        assert all(0 <= a["accuracy"] <= 1 for a in out["accuracy"][name].values())
    records = [json.loads(line) for line in Path(out["predictions_path"]).read_text().splitlines()]
    assert len(records) == 4 * len(generative.TASKS) and set(records[0]) == {"task", "triple", "target", "run", "base"}
    assert Path(out["eval_path"]) == ws.runs_dir / "r" / "eval-generative-test.json"

    # the scoring, with answers chosen: the "run" answers every case right, the "base" every case wrong
    calls = []

    def scripted(model, tokenizer, prompts, max_new_tokens):
        calls.append(len(calls))
        right = len(calls) <= len(generative.TASKS)
        return [(f"{{ {targets[p]}, a description }}" if "=>" in p else targets[p]) if right else "zzz"
                for p in prompts]

    with Store.open(ws) as store:
        test, train, everything = (store.triples_array(("test",)), store.triples_array(("train",)),
                                   store.triples_array())
        labels, rels = store.entity_table()["label"].to_pylist(), store.relation_table()["label"].to_pylist()
    from kalmkg.evaluation.ranking import sample_triples

    from kalmkg.loaded import load_model

    cases = generative.build_cases(sample_triples(test, 4, 0), train, set(map(tuple, everything.tolist())),
                                   labels, rels, seed=0, texts=load_model(ws).texts)
    targets = {c.prompt: c.target for c in cases}
    monkeypatch.setattr(generative, "generate", scripted)
    out = generative.evaluate_generative(ws, limit=4, seed=0)
    assert all(a["accuracy"] == 1.0 for a in out["accuracy"]["run"].values())
    assert all(a["accuracy"] == 0.0 for a in out["accuracy"]["base"].values())
    for task in generative.COMPLETION:  # the held-out answer is a known one; "zzz" names none
        assert (out["accuracy"]["run"][task]["true"], out["accuracy"]["base"][task]["true"]) == (1.0, 0.0)
    records = [json.loads(line) for line in Path(out["predictions_path"]).read_text().splitlines()]
    assert all(("true" in r["run"]) == (r["task"] in generative.COMPLETION) for r in records)

    # what the command prints: every task, the completion tasks with their known-answer rows
    from typer.testing import CliRunner

    from kalmkg.cli.app import app

    calls.clear()
    result = CliRunner().invoke(app, ["-w", str(ws.root), "evaluate", "--generative", "--limit", "4"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    for row in ("tail prediction", "triple classification", "tail, training's format", "head, training's format",
                "names a known answer"):
        assert row in result.output
