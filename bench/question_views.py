"""Questions as queries: filtered MRR of valid triples asked as questions (the chat prompt of
`ask --no-context`, its last token's embedding ranked against every entity's tail view), next to the same
triples asked as head-relation views, for the untrained base and the given runs.

    python bench/question_views.py --workspace WS --runs A B [--limit 200]

What `--question-view-weight` trains (issue 10 part 3: question views in L_exp): without it a question's
embedding is not a query the entity index answers. The question forms are the training templates
(`kalmkg/training/questions.py`), drawn with a fixed seed; the valid triples are unseen by training.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def question_prompts(loaded, relations, queries: np.ndarray, seed: int) -> list[str]:
    """The chat prompt (through the start of the model's turn) of one template question per query."""
    from kalmkg.prompts import no_context_messages
    from kalmkg.training.questions import QuestionQuery, QuestionWriter

    writer = QuestionWriter.from_tables(loaded.entity_labels, relations)
    picks = np.random.default_rng(seed).integers(1 << 16, size=len(queries)).tolist()
    out = []
    for (q, r), pick in zip(queries.tolist(), picks):
        forms = writer.forms(QuestionQuery(q, r, ()))
        messages = no_context_messages(forms[pick % len(forms)])
        out.append(loaded.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
    return out


def measure(workspace, run: str | None, limit: int, seed: int) -> dict:
    from kalmkg import text
    from kalmkg.encode import TorchEncoder
    from kalmkg.evaluation.metrics import summarize
    from kalmkg.evaluation.ranking import encode_texts, rank_with_vectors, sample_triples
    from kalmkg.loaded import load_model
    from kalmkg.store import Store

    loaded = load_model(workspace, run=run) if run else load_model(workspace, base="smollm2-135m")
    with Store.open(workspace) as store:
        valid, every, relations = store.triples_array(("valid",)), store.triples_array(), store.relation_table()
    triples = sample_triples(valid, limit, seed)
    texts = loaded.texts
    encoder = TorchEncoder(loaded.model, loaded.tokenizer)
    vectors = encode_texts(encoder, [text.tail_view(t) for t in texts.entities], 64)
    hr = rank_with_vectors(encoder, texts, triples, every, vectors)
    prompts = question_prompts(loaded, relations, hr["queries"], seed)
    ids = loaded.tokenizer(prompts, add_special_tokens=False)["input_ids"]
    question_vectors = encoder.encode_ids(ids).numpy()
    asked = rank_with_vectors(encoder, texts, triples, every, vectors, query_vectors=question_vectors)
    return {"queries": len(hr["ranks"]), "hr": summarize(hr["ranks"]), "question": summarize(asked["ranks"]),
            "example": prompts[0]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workspace", type=Path, required=True)
    p.add_argument("--runs", nargs="*", default=[])
    p.add_argument("--limit", type=int, default=200, help="valid triples (both directions are asked)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from kalmkg.workspace import Workspace

    ws = Workspace(args.workspace)
    rows = [("SmolLM2-135M, untrained", measure(ws, None, args.limit, args.seed))]
    rows += [(f"run {r}", measure(ws, r, args.limit, args.seed)) for r in args.runs]
    print(f"\nfirst question prompt: {rows[0][1]['example']!r}\n")
    print("| model | queries | hr view MRR | H@1 | H@10 | question MRR | H@1 | H@10 |")
    print("|---|---|---|---|---|---|---|---|")
    for label, m in rows:
        h, q = m["hr"], m["question"]
        print(f"| {label} | {m['queries']} | {h['mrr']:.3f} | {h['hits@1']:.3f} | {h['hits@10']:.3f} | "
              f"{q['mrr']:.3f} | {q['hits@1']:.3f} | {q['hits@10']:.3f} |")


if __name__ == "__main__":
    main()
