"""Generation-based evaluation (the paper's second task): the model as a generator on test triples.

Four tasks, each a 3-shot plain-text prompt (shots: fixed-seed train triples), greedy decoding, the
answer read up to the end of its line:
- tail prediction     Head + Relation -> Tail; correct when the answer equals the tail's label
- head prediction     Relation + Tail -> Head; likewise the head's label
- relation prediction Head + Tail, choosing from the graph's relation labels -> Relation
- triple classification "Is this true: h r t?" on the test triple (half of the cases) or a corrupted one
  (tail replaced by an entity that makes no known triple); "Yes, this is true" / "No, this is not true"
Labels are compared after normalisation (case, punctuation, spacing, a leading article). The instructions
follow the paper's intent; its exact wording is not published with the numbers, so absolute accuracies
are comparable between models evaluated here (base vs run, side by side), not to the paper's.

Two more tasks ask tail and head prediction in the format the run was trained on (KaLM's triple
completion, `kalmkg.text`): the head-relation view `Complete the triple: [ <head text>, <relation> ] =>`
continued by the answer's tail view `{ <name>, <description> }` (head prediction through the inverse
relation, as training asks it), with the same 3 shots in that format, so the base sees the format too;
correct when the generated view starts with the answer's name. On a graph whose queries have many answers
(UMLS: 98 % of the test queries also have train answers) that exact match counts a true answer the run
learned from train as wrong, so the completion tasks also report `true`: the share of generated views
that name *some* known answer of the query (train, valid or test): whether the model generates facts of
the graph at all, memorised or inferred, beside `accuracy`, which counts only the held-out one.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import numpy as np

from kalmkg.errors import KalmkgError
from kalmkg.evaluation.metrics import known_answers
from kalmkg.evaluation.ranking import sample_triples
from kalmkg.loaded import load_model
from kalmkg.files import atomic_write_text
from kalmkg.runs import read_config
from kalmkg.store import SPLITS, Store
from kalmkg.training.config import saved_train_config
from kalmkg import text
from kalmkg.text import GraphTexts, normalize_label

TASKS = ("tail", "head", "relation", "classification", "tail-completion", "head-completion")
COMPLETION = ("tail-completion", "head-completion")
SHOTS = 3
YES, NO = "Yes, this is true", "No, this is not true"
INSTRUCTIONS = {
    "tail": "Given the head entity and relation, write a tail entity that completes the triple.",
    "head": "Given the relation and tail entity, write a head entity that completes the triple.",
    "relation": "Given the head and tail entity, choose the relation between them from: {relations}.",
    "classification": f'Is this triple true? Answer "{YES}" or "{NO}".',
}
MAX_NEW_TOKENS = {"tail": 24, "head": 24, "relation": 16, "classification": 8, "tail-completion": 24,
                  "head-completion": 24}


@dataclass
class Case:
    task: str
    prompt: str
    target: str  # the expected answer (a label, a relation label, YES or NO)
    triple: tuple[int, int, int]
    known: tuple[str, ...] = ()  # completion tasks: the labels of every known answer of the query


def _line(task: str, h: str, r: str, t: str, answer: bool = True) -> str:
    if task == "tail":
        return f"Head: {h}\nRelation: {r}\nTail:" + (f" {t}" if answer else "")
    if task == "head":
        return f"Relation: {r}\nTail: {t}\nHead:" + (f" {h}" if answer else "")
    if task == "relation":
        return f"Head: {h}\nTail: {t}\nRelation:" + (f" {r}" if answer else "")
    return f"Is this true: {h} {r} {t}?\nAnswer:"


def _completion(texts: GraphTexts, task: str, h: int, r: int, t: int, answer: bool = True) -> str:
    """A triple-completion line as training writes it: hr view, then (with `answer`) the answer's tail view."""
    query, rel, target = (h, r, t) if task == "tail-completion" else (t, r + texts.num_relations, h)
    view = text.hr_view(texts.entities[query], texts.relations[rel])
    return view + (text.completion_target(texts.entities[target]) if answer else "")


def build_cases(triples: np.ndarray, train: np.ndarray, known: set[tuple[int, int, int]], entity_labels: list[str],
                relation_labels: list[str], *, seed: int = 0, texts: GraphTexts | None = None) -> list[Case]:
    """Every task's prompt for every triple (classification: the even-indexed triples true, the odd ones
    corrupted), with the same fixed-seed shots in every prompt of a task. The completion tasks need the
    run's entity texts (`texts`: cut as training cut them); without them they are left out."""
    rng = np.random.default_rng(seed)
    if len(train) < SHOTS:
        raise KalmkgError(f"generative evaluation needs at least {SHOTS} train triples for its examples")
    shots = train[rng.choice(len(train), SHOTS, replace=False)]
    n_ent = len(entity_labels)
    L, RL = entity_labels, relation_labels
    R = len(relation_labels)
    answers = known_answers(np.array(sorted(known), dtype=np.int64).reshape(-1, 3), R)

    def known_labels(task: str, h: int, r: int, t: int) -> tuple[str, ...]:
        query = (h, r) if task == "tail-completion" else (t, r + R)
        return tuple(sorted({L[e] for e in answers.get(query, ())}))

    def corrupt(h: int, r: int, t: int) -> int:
        for _ in range(100):
            c = int(rng.integers(n_ent))
            if c != t and (h, r, c) not in known:
                return c
        raise KalmkgError("cannot corrupt a triple: every entity is a known answer")

    cases: list[Case] = []
    for task in TASKS:
        if task in COMPLETION:
            if texts is not None:
                prefix = "\n".join(_completion(texts, task, *shot) for shot in shots.tolist()) + "\n"
                cases += [Case(task, prefix + _completion(texts, task, h, r, t, answer=False),
                               L[t] if task == "tail-completion" else L[h], (h, r, t), known_labels(task, h, r, t))
                          for h, r, t in triples.tolist()]
            continue
        head = INSTRUCTIONS[task].format(relations=", ".join(sorted(set(RL))))
        if task == "classification":
            examples = []
            for j, (h, r, t) in enumerate(shots.tolist()):
                true = j % 2 == 0
                tt = t if true else corrupt(h, r, t)
                examples.append(f"{_line(task, L[h], RL[r], L[tt])} {YES if true else NO}")
        else:
            examples = [_line(task, L[h], RL[r], L[t]) for h, r, t in shots.tolist()]
        prefix = head + "\n\n" + "\n\n".join(examples) + "\n\n"
        for i, (h, r, t) in enumerate(triples.tolist()):
            if task == "classification":
                true = i % 2 == 0
                tt = t if true else corrupt(h, r, t)
                cases.append(Case(task, prefix + _line(task, L[h], RL[r], L[tt]), YES if true else NO, (h, r, tt)))
            else:
                target = {"tail": L[t], "head": L[h], "relation": RL[r]}[task]
                cases.append(Case(task, prefix + _line(task, L[h], RL[r], L[t], answer=False), target, (h, r, t)))
    return cases


def names_first(view: str, name: str) -> bool:
    """Whether a generated tail view `{ Paris, the capital ... }` names `name` before anything else."""
    inner = view.strip()
    if not inner.startswith("{"):
        return False
    inner = inner[1:].lstrip()
    if not inner.casefold().startswith(name.casefold()):
        return False
    rest = inner[len(name):].lstrip()
    return rest == "" or rest[0] in ",}"


def names_known(case: Case, answer: str) -> bool:
    """A completion task's generated view names one of the query's known answers (any split)."""
    return any(names_first(answer, label) for label in case.known)


def is_correct(case: Case, answer: str) -> bool:
    if case.task in COMPLETION:
        return names_first(answer, case.target)
    got = normalize_label(answer)
    if case.task == "classification":  # the first word decides ("not sure" is no answer)
        return got.split(" ", 1)[0] == ("yes" if case.target == YES else "no")
    return got == normalize_label(case.target)


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int) -> list[str]:
    """Greedy continuations, each cut at its first line break (one prompt at a time: no padding effects)."""
    import torch

    out = []
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]], device=model.device)
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, num_beams=1, pad_token_id=pad, eos_token_id=eos)
            text = tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
            out.append(text.strip().split("\n", 1)[0].strip())
    return out


def run_cases(model, tokenizer, cases: list[Case], progress=None, label: str = "") -> tuple[dict, list[str]]:
    """Accuracy per task (and overall) of `model` on `cases`, and its answers."""
    answers: list[str] = []
    for k, task in enumerate(TASKS):
        mine = [c for c in cases if c.task == task]
        answers += generate(model, tokenizer, [c.prompt for c in mine], MAX_NEW_TOKENS[task]) if mine else []
        if progress:
            progress(f"{label} generate".strip(), k + 1, len(TASKS))
    acc = {}
    for task in TASKS:
        hits = [is_correct(c, a) for c, a in zip(cases, answers) if c.task == task]
        if not hits and task in COMPLETION:
            continue
        acc[task] = {"accuracy": float(np.mean(hits)) if hits else float("nan"), "count": len(hits)}
        if task in COMPLETION:
            acc[task]["true"] = float(np.mean([names_known(c, a) for c, a in zip(cases, answers) if c.task == task]))
    return acc, answers


def evaluate_generative(workspace, *, run: str | None = None, split: str = "test", limit: int = 100, seed: int = 0,
                        with_base: bool = True, device: str = "cpu", progress=None, precision: str = "auto") -> dict:
    """The four tasks for the run's model and (with `with_base`) its untrained base, side by side. Writes
    `eval-generative-<split>.json` and `predictions-generative-<split>.jsonl` into the run folder."""
    if split not in SPLITS:
        raise KalmkgError(f"unknown split '{split}'; use one of: {', '.join(SPLITS)}")
    with Store.open(workspace) as store:
        triples = store.triples_array((split,))
        train = store.triples_array(("train",))
        everything = store.triples_array()
        tables = (store.entity_table(), store.relation_table(), store.fingerprint())
    if len(triples) == 0:
        raise KalmkgError(f"the {split} split is empty (ingest one, or run `kalmkg split`)")
    sample = sample_triples(triples, limit, seed)
    loaded = load_model(workspace, run=run, device=device, tables=tables, precision=precision)
    known = set(map(tuple, everything.tolist()))
    cases = build_cases(sample, train, known, loaded.entity_labels, loaded.relation_labels, seed=seed,
                        texts=loaded.texts)

    t0 = time.perf_counter()
    results = {"run": run_cases(loaded.model, loaded.tokenizer, cases, progress, "run")}
    if with_base:
        trained = saved_train_config(read_config(loaded.run_dir))  # the base as the run trained on it
        base = load_model(workspace, base=trained.base, device=device, tables=tables, precision=precision,
                          quantize=trained.quantize)
        results["base"] = run_cases(base.model, base.tokenizer, cases, progress, "base")
    summary = {
        "model": loaded.fingerprint, "split": split, "triples": int(len(sample)), "limit": int(limit),
        "seed": int(seed), "shots": SHOTS, "tasks": list(TASKS),
        "accuracy": {name: acc for name, (acc, _) in results.items()},
        "seconds": round(time.perf_counter() - t0, 3),
    }
    out = loaded.run_dir
    eval_path, pred_path = out / f"eval-generative-{split}.json", out / f"predictions-generative-{split}.jsonl"
    lines = []
    for i, case in enumerate(cases):
        rec = {"task": case.task, "triple": [loaded.entity_keys[case.triple[0]], loaded.relation_keys[case.triple[1]],
                                             loaded.entity_keys[case.triple[2]]], "target": case.target}
        for name, (_, answers) in results.items():
            rec[name] = {"answer": answers[i], "correct": is_correct(case, answers[i]),
                         **({"true": names_known(case, answers[i])} if case.task in COMPLETION else {})}
        lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
    atomic_write_text(pred_path, "".join(lines))
    atomic_write_text(eval_path, json.dumps(summary, indent=2) + "\n")
    return {**summary, "eval_path": str(eval_path), "predictions_path": str(pred_path)}
