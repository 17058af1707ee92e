"""Question answering over the sample graph: accuracy of `kalmkg ask` with retrieval and with --no-context,
for the untrained base and a KaLM run, on the 38 questions of tests/data/world_questions.jsonl.

    python bench/ask_quality.py
    python bench/ask_quality.py --steps 120 --lm-weight 1 --lm-examples 16   # a run that leans on the LM loss
    python bench/ask_quality.py --facts 60 --train --question-weight 1   # what the weights alone say of train facts

Both models are Q8_0 GGUFs through llama.cpp, greedy: the run's `kalmkg export`, and the base converted
by the same converter from the same float32 weights training started from (so quantization is not a
difference between them). Grading (`kalmkg.evaluation.answers.grade`): an answerable question is right
when an expected name appears in the answer and it does not abstain; a question the graph cannot answer
is right when the answer abstains ("I don't know", or the no-match message). Also reported: retrieval recall, the share
of answerable questions whose supporting facts all reached the prompt (with an answer chosen from the graph,
the prompt holds only the chosen path's facts), and how often the model's sentence around the chosen
answer was kept (else kalmkg's plain "ANSWER [n]." replaced it). Answers go to
bench/_work/ask-quality-*.jsonl.

`--facts N` asks instead N questions about facts of the run's train split, `--no-context` only (issue 10:
does the model alone know the facts it was trained on?): a fixed-seed draw of train queries (entity,
relation, either direction), each written in one of the training templates' forms
(`kalmkg/training/questions.py`); right when the reply names one of the query's known answers. Question-
form training trains these very forms, so this measures recall of trained facts, not generalisation; the
fixtures above measure that.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

QUESTIONS = ROOT / "tests" / "data" / "world_questions.jsonl"
KINDS = ("one-hop", "two-hop", "no-answer")
MODES = ("retrieval", "reads the facts", "--no-context")


def base_q8(root: Path) -> Path:
    """The untrained base as a Q8_0 GGUF (llama.cpp's converter on the cached float32 folder)."""
    from kalmkg.export.convert import convert, quantize
    from kalmkg.models import resolve_base

    out = root / "base-Q8_0.gguf"
    if not out.is_file():
        resolved = resolve_base("smollm2-135m")
        f16 = root / "base-F16.gguf"
        convert(Path(resolved.path), f16, "base", resolved.name)
        quantize(f16, out, "Q8_0")
        f16.unlink()
    return out


def supported(answer, row) -> bool:
    got = {(f.head_key.rsplit("/", 1)[-1], f.relation_key.rsplit("/", 1)[-1], f.tail_key.rsplit("/", 1)[-1])
           for f in answer.facts}
    got |= {(t, r, h) for h, r, t in got}
    return all(tuple(f) in got for f in row["facts"])


def reads(asker, question: str):
    """The model picks the answer itself: retrieval's facts (`ask`'s defaults: 2 hops, 8 facts) in the
    prompt without a chosen answer, its reply as it comes (`ask` before answers were chosen from the
    graph; what fact-reading training teaches)."""
    from kalmkg.prompts import build_messages
    from kalmkg.qa.ask import NO_MATCH, Answer, AskConfig, no_facts_message
    from kalmkg.qa.retrieve import retrieve
    from kalmkg.store import Store

    config = AskConfig()
    with Store.open(asker.workspace) as store:
        found = retrieve(store, question, hops=config.hops, max_facts=config.max_facts, embedder=asker.embedder)
    if not found.matched:
        return Answer(question, NO_MATCH, False, [], [])
    if not found.facts:
        return Answer(question, no_facts_message(found.links), True, found.links, [])
    text = "".join(asker.generator.stream(build_messages(question, found.facts), max_tokens=config.max_tokens,
                                          temperature=0.0, seed=0)).strip()
    return Answer(question, text, True, found.links, found.facts)


def train_fact_rows(ws, n: int, seed: int = 0) -> list[dict]:
    """`n` questions about train-split facts, written with the training templates (see the module's doc)."""
    import numpy as np

    from kalmkg.store import Store
    from kalmkg.training.questions import QuestionWriter, question_queries

    with Store.open(ws) as store:
        train, entities, relations = store.triples_array(("train",)), store.entity_table(), store.relation_table()
    labels = entities["label"].to_pylist()
    writer = QuestionWriter.from_tables(labels, relations)
    queries = question_queries(train, relations.num_rows)
    rng = np.random.default_rng(seed)
    rows = []
    for i in rng.choice(len(queries), size=min(n, len(queries)), replace=False).tolist():
        forms = writer.forms(queries[i])
        rows.append({"id": f"train-{i}", "question": forms[int(rng.integers(len(forms)))], "kind": "one-hop",
                     "answers": [labels[a] for a in queries[i].answers]})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--lm-weight", type=float, default=0.01)
    p.add_argument("--lm-examples", type=int, default=4)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--train", nargs=argparse.REMAINDER, default=[],
                   help="more `kalmkg train` options for the run, e.g. --train --reading-weight 1 (last)")
    p.add_argument("--questions", type=Path, default=QUESTIONS,
                   help="a question fixture (default: the 38 of tests/data/world_questions.jsonl; "
                        "tests/data/world_questions_people.jsonl: 51 phrased as people ask)")
    p.add_argument("--facts", type=int, default=0,
                   help="instead of a fixture, N questions about train-split facts, --no-context only")
    args = p.parse_args()

    from world_run import prepare

    from kalmkg.evaluation.answers import grade, load_questions
    from kalmkg.qa.ask import AskConfig, Asker
    from kalmkg.workspace import Workspace

    root = prepare(args.steps, args.lm_weight, args.lm_examples, tuple(args.train))
    ws = Workspace(root)
    rows = train_fact_rows(ws, args.facts) if args.facts else load_questions(args.questions)
    modes = ("--no-context",) if args.facts else MODES
    fixture = f"train-facts-{args.facts}" if args.facts else args.questions.stem
    recipe = " ".join([f"{args.steps} steps, lambda {args.lm_weight:g}", *args.train])
    models = {"SmolLM2-135M, untrained": base_q8(root.parent), f"KaLM run ({recipe})": root / "models" / "world-Q8_0.gguf"}
    log = root.parent / f"ask-quality-{root.name}-{fixture}.jsonl"
    table = []
    with log.open("w") as out:
        for label, path in models.items():
            asker = Asker(ws, str(path), n_threads=args.threads)
            for mode in modes:
                no_context = mode == "--no-context"
                t0 = time.perf_counter()
                right = {k: [] for k in KINDS}
                recall, by_model = [], []
                for row in rows:
                    if mode == "reads the facts":
                        answer = reads(asker, row["question"])
                    else:
                        answer = asker.ask(row["question"], AskConfig(no_context=no_context))
                    ok = grade(answer.text, row["answers"])
                    right[row["kind"]].append(ok)
                    if row["answers"] and mode == "retrieval":
                        recall.append(supported(answer, row))
                    if answer.chosen is not None:
                        by_model.append(answer.sentence == "model")
                    out.write(json.dumps({"model": label, "mode": mode, "id": row["id"],
                                          "question": row["question"], "answer": answer.text, "right": ok,
                                          "sentence": answer.sentence if answer.chosen is not None else None},
                                         ensure_ascii=False) + "\n")
                table.append((label, mode, right, recall, by_model, time.perf_counter() - t0))
                print(f"{label} {mode}: done", file=sys.stderr)

    def pct(xs) -> str:
        return f"{sum(xs)}/{len(xs)} ({100 * sum(xs) / len(xs):.0f} %)" if xs else "-"

    print("\n| model | mode | one-hop | two-hop | no answer in graph | all | supporting facts in prompt "
          "| sentence by the model | s/question |")
    print("|---|---|---|---|---|---|---|---|---|")
    for label, mode, right, recall, by_model, seconds in table:
        every = [x for k in KINDS for x in right[k]]
        print(f"| {label} | {mode} | {pct(right['one-hop'])} | {pct(right['two-hop'])} | {pct(right['no-answer'])} | "
              f"{pct(every)} | {pct(recall)} | {pct(by_model)} | {seconds / len(every):.2f} |")
    print(f"\nanswers: {log}")


if __name__ == "__main__":
    main()
