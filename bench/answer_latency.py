"""What choosing the answer from the graph costs `kalmkg ask` on a large graph: retrieval (link, 1-2 hop
paths, rank) and the answer choice, timed apart, on WN18RR (40,943 entities, 93,003 triples).

    python bench/answer_latency.py                    # 60 questions, the embedded GGUF as embedder
    python bench/answer_latency.py --questions 20 --no-embedder

Issue 10's target on this CPU: the choice adds <= 300 ms at 2 hops. Questions are templated from WN18RR
test triples (fixed seed): "What is the <relation label> of <head label>?", so every one links its head.
The baseline in the same run is retrieval alone, the path `ask` took before answers were chosen.
Also reported: how often an answer is chosen and how often the test triple's tail is among the answers
(a sanity check, not a quality figure: the store holds every split, so the test triple itself is a 1-hop
path, and WordNet's relation labels are the question's words).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORK = ROOT / "bench" / "_work"
DATASET = ROOT.parent / "shared" / "datasets" / "WN18RR"


def workspace():
    from kalmkg.ingestion import ingest, resolve_sources
    from kalmkg.store import Store
    from kalmkg.workspace import Workspace

    ws = Workspace(WORK / "answer-latency-wn18rr")
    if not ws.db_path.exists():
        with Store.open(ws, create=True) as store:
            ingest(store, resolve_sources([DATASET]))
    return ws


def percentile(xs, q) -> float:
    return float(np.percentile(np.asarray(xs) * 1000, q)) if xs else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--questions", type=int, default=60)
    p.add_argument("--no-embedder", action="store_true", help="words only (no GGUF embeddings)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    if not DATASET.is_dir():
        sys.exit(f"no WN18RR at {DATASET}")

    from kalmkg.qa.answer import choose_answer, relation_words
    from kalmkg.qa.retrieve import retrieve
    from kalmkg.store import Store

    ws = workspace()
    embedder = None
    if not args.no_embedder:
        from kalmkg.encode import GGUFEncoder
        from kalmkg.models import embedded_gguf

        embedder = GGUFEncoder(embedded_gguf("smollm2-135m"), n_threads=args.threads, truncate=True)
    with Store.open(ws) as store:
        labels = store.entity_table()["label"].to_pylist()
        rel_rows = store.relation_labels()
        rel_label = {rid: label for rid, label, _ in rel_rows}
        test = store.triples_array(("test",))
        picks = test[np.random.default_rng(0).choice(len(test), min(args.questions, len(test)), replace=False)]
        retrieve_s, choose_s, chosen, tails = [], [], 0, 0
        for h, r, t in picks.tolist():
            question = f"What is the {rel_label[r]} of {labels[h]}?"
            t0 = time.perf_counter()
            found = retrieve(store, question, hops=2, embedder=embedder)
            t1 = time.perf_counter()
            relations = relation_words(store.relation_labels())  # as `ask` reads them, per question
            group = choose_answer(question, found.links, found.paths, relations, embedder) if found.links else None
            t2 = time.perf_counter()
            retrieve_s.append(t1 - t0)
            choose_s.append(t2 - t1)
            chosen += group is not None
            tails += group is not None and t in {a[0] for a in group.answers}

    print(f"\nWN18RR ({len(labels):,} entities), {len(picks)} questions, 2 hops, "
          f"embedder: {'none' if embedder is None else 'embedded SmolLM2 GGUF'}\n")
    print("| stage | p50 ms | p95 ms |")
    print("|---|---|---|")
    print(f"| retrieval (the baseline: `ask` before) | {percentile(retrieve_s, 50):.0f} | {percentile(retrieve_s, 95):.0f} |")
    print(f"| answer choice (added) | {percentile(choose_s, 50):.0f} | {percentile(choose_s, 95):.0f} |")
    total = [a + b for a, b in zip(retrieve_s, choose_s)]
    print(f"| both | {percentile(total, 50):.0f} | {percentile(total, 95):.0f} |")
    print(f"\nan answer chosen for {chosen}/{len(picks)}; the test triple's tail among the answers: {tails}")


if __name__ == "__main__":
    main()
