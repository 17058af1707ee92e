"""How far a KaLM run's replies drift from the untrained base's: the guard of issue 10 part 3 measured.

    python bench/instruction_drift.py --steps 150 --train --reading-weight 1 --reading-examples 8
    python bench/instruction_drift.py --steps 150 --train --reading-weight 1 --reading-examples 8 --base-kl-weight 1

The run is bench/world_run.py's (sample graph, the embedded SmolLM2-135M, `kalmkg train` with the given
options). Three sets of chat prompts, each answered greedily by the base (up to 48 tokens):
  ask's prompts      the 38 fixture questions with retrieval's numbered facts (`ask`'s rules, the model
                     picks the answer: bench/ask_quality.py's "reads the facts")
  --no-context       the same questions, the model alone
  beyond the graph   everyday instructions that have nothing to do with the graph
For each set: the mean per-token KL(base || run) of the next-token distributions along the base's reply
(nats), the share of those tokens that are also the run's top choice, and the share of prompts the run
answers with exactly the base's reply. In float32 torch, the run merged from its adapter.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

QUESTIONS = ROOT / "tests" / "data" / "world_questions.jsonl"
MAX_NEW_TOKENS = 48
BEYOND = (
    "Write a haiku about autumn leaves.",
    "Translate 'good morning, how are you?' into French.",
    "List three prime numbers greater than ten.",
    "What is 17 plus 25?",
    "Give me one tip for sleeping better.",
    "Rewrite this sentence in the past tense: I walk to the station.",
    "Name the colours of a rainbow.",
    "Explain in one sentence what a noun is.",
    "Suggest a name for a grey cat.",
    "What is the opposite of 'ancient'?",
    "Summarise in one sentence: The meeting moved from Monday to Thursday because the room was booked.",
    "Write a polite one-line reply declining an invitation to dinner.",
    "Is a tomato a fruit or a vegetable? Answer briefly.",
    "Spell the word 'necessary' backwards.",
    "Give an example of a question a teacher might ask about photosynthesis.",
    "Convert 3 kilometres to metres.",
)


def prompt_sets(workspace, rows) -> dict[str, list[list[dict]]]:
    from kalmkg.prompts import build_messages, no_context_messages
    from kalmkg.qa.retrieve import retrieve
    from kalmkg.store import Store

    with_facts = []
    with Store.open(workspace) as store:
        for row in rows:
            found = retrieve(store, row["question"])
            if found.facts:
                with_facts.append(build_messages(row["question"], found.facts))
    return {"ask's prompts": with_facts,
            "--no-context": [no_context_messages(row["question"]) for row in rows],
            "beyond the graph": [[{"role": "user", "content": text}] for text in BEYOND]}


def greedy(model, prompt: list[int], eos: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                             eos_token_id=eos, pad_token_id=eos)
    return out[0, len(prompt):].tolist()


def reply_log_probs(model, prompt: list[int], reply: list[int]):
    """[len(reply), V] next-token log-probabilities at the positions that predict the reply."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + reply])).logits[0]
    return logits[len(prompt) - 1: len(prompt) + len(reply) - 1].float().log_softmax(-1)


def drift(base, run, tokenizer, conversations) -> dict:
    eos = tokenizer.eos_token_id
    kls, agree, same = [], [], []
    for messages in conversations:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt = tokenizer(text, add_special_tokens=False)["input_ids"]  # as training's chat_example
        reply = greedy(base, prompt, eos)
        if not reply:
            continue
        p, q = reply_log_probs(base, prompt, reply), reply_log_probs(run, prompt, reply)
        kls.append(float((p.exp() * (p - q)).sum(-1).mean()))
        agree.append(float((q.argmax(-1) == p.argmax(-1)).float().mean()))
        same.append(greedy(run, prompt, eos) == reply)
    n = len(kls)
    return {"prompts": n, "kl": sum(kls) / n, "agree": sum(agree) / n, "same": sum(same) / n}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--lm-weight", type=float, default=0.01)
    p.add_argument("--lm-examples", type=int, default=4)
    p.add_argument("--train", nargs=argparse.REMAINDER, default=[],
                   help="more `kalmkg train` options for the run, e.g. --train --base-kl-weight 1 (last)")
    args = p.parse_args()

    import torch
    from world_run import prepare

    from kalmkg.evaluation.answers import load_questions
    from kalmkg.models import load_base, merged_model, resolve_base
    from kalmkg.workspace import Workspace

    torch.set_grad_enabled(False)
    root = prepare(args.steps, args.lm_weight, args.lm_examples, tuple(args.train))
    ws = Workspace(root)
    resolved = resolve_base("smollm2-135m")
    base, tokenizer = load_base(resolved)
    run = merged_model(resolved, ws.runs_dir / "world" / "adapter")
    base.eval(), run.eval()
    sets = prompt_sets(ws, load_questions(QUESTIONS))
    recipe = " ".join([f"{args.steps} steps, lambda {args.lm_weight:g}", *args.train])
    print(f"\nKaLM run ({recipe}) against SmolLM2-135M, untrained; replies: the base's, greedy\n")
    print("| prompts | n | KL(base \u2016 run) per token (nats) | run's top token = base's | same greedy reply | s |")
    print("|---|---|---|---|---|---|")
    for name, conversations in sets.items():
        t0 = time.perf_counter()
        d = drift(base, run, tokenizer, conversations)
        print(f"| {name} | {d['prompts']} | {d['kl']:.3f} | {100 * d['agree']:.0f} % | {100 * d['same']:.0f} % | "
              f"{time.perf_counter() - t0:.0f} |", flush=True)


if __name__ == "__main__":
    main()
