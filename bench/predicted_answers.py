"""How reliable `ask`'s predicted answers are: thresholds calibrated on the valid split, precision measured
on the test split (facts neither training nor calibration saw).

For each held-out query (both directions) the first answer `predict` gives is taken (known answers and
the query's own entity left out) with a confidence; a threshold is the lowest confidence whose valid
first answers were right at least P of the time (at least 10 of them). On test, the table shows how
many queries the threshold lets through ("said") and how many of those are right. Two confidences, in
the same run: the model's probability (softmax at the run's temperature: what `ask` uses) and, as the
baseline, the raw cosine of the first answer.

    python bench/predicted_answers.py --workspace WS [--run RUN]

Needs a trained run with a fresh entity index (`kalmkg train` builds both) and valid and test splits.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kalmkg.evaluation.calibration import calibrate, unconnected  # noqa: E402
from kalmkg.evaluation.link_prediction import first_answer_confidence  # noqa: E402
from kalmkg.evaluation.ranking import rank_with_vectors  # noqa: E402
from kalmkg.index import EntityIndex  # noqa: E402
from kalmkg.loaded import load_model, torch_encoder  # noqa: E402
from kalmkg.store import Store  # noqa: E402
from kalmkg.workspace import Workspace  # noqa: E402

PRECISIONS = (0.5, 0.6, 0.7, 0.8)


def first_answers_of(split: str, ws: Workspace, loaded, encoder, vectors, all_triples) -> dict:
    with Store.open(ws) as store:
        triples = store.triples_array((split,))
    ranked = rank_with_vectors(encoder, loaded.texts, triples, all_triples, vectors)
    first, tau = first_answer_confidence(loaded, ranked, all_triples, vectors)
    # the queries ask would send to the predictor: no other fact joins the entity and the answer
    like_ask = unconnected(ranked["queries"], ranked["targets"], all_triples)
    return {"probability": first.probability[like_ask], "cosine": first.cosine[like_ask],
            "right": first.right[like_ask], "tau": tau}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", required=True)
    ap.add_argument("--run", default=None)
    args = ap.parse_args()
    ws = Workspace(Path(args.workspace))
    loaded = load_model(ws, run=args.run)
    encoder = torch_encoder(loaded)
    vectors = EntityIndex.open(ws, loaded).vectors()
    with Store.open(ws) as store:
        all_triples = store.triples_array()
    valid = first_answers_of("valid", ws, loaded, encoder, vectors, all_triples)
    test = first_answers_of("test", ws, loaded, encoder, vectors, all_triples)
    print(f"{loaded.name}: first answers right on {valid['right'].mean():.1%} of {len(valid['right'])} valid and "
          f"{test['right'].mean():.1%} of {len(test['right'])} test queries (tau {valid['tau']})")
    print("| confidence | asked precision | threshold (valid) | said on valid | said on test | right of said on test |")
    print("|---|---|---|---|---|---|")
    for kind in ("probability", "cosine"):
        cal = calibrate(loaded.fingerprint, loaded.weights, "valid", valid[kind], valid["right"], valid["tau"])
        for p in PRECISIONS:
            t = cal.threshold(p)
            if t is None:
                print(f"| {kind} | {p:.0%} | none | 0 | 0 | - |")
                continue
            said_v, said_t = valid[kind] >= t, test[kind] >= t
            right_t = test["right"][said_t].mean() if said_t.any() else float("nan")
            print(f"| {kind} | {p:.0%} | {t:.4f} | {said_v.mean():.1%} | {said_t.mean():.1%} ({said_t.sum()}) | "
                  f"{right_t:.1%} |")


if __name__ == "__main__":
    main()
