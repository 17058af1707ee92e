"""The paper's WN18RR protocol (KaLM's embedding-based KG completion): ingest WN18RR, train with the
KaLM objective, evaluate the test set (filtered by every known triple, realistic tie-aware ranks, tail,
head and both), and print the table beside the published KaLM and SimKGC rows, with the curve of valid
MRR against the training examples seen.

    python bench/wn18rr.py                          # a GPU: the whole protocol in one 10-minute call
    python bench/wn18rr.py --minutes 60 --json wn18rr.json    # a CPU: the reduced protocol, an hour
    python bench/wn18rr.py --work bench/_work/wn18rr          # again: resumes, skips what is done

Two protocols, chosen by the device (`--protocol` to force one; every setting is also an option):
- gpu: the embedded model with LoRA on every layer, entity texts of 50 tokens (the paper's), batch 256,
  up to the paper's 20 epochs within `--minutes` (5) of training, the full test set (3,134 triples, both
  directions), the structure model trained on the GPU for a minute. Sized for one 10-minute call on an
  H200; a call cut short is resumed by the next one from the run's last checkpoint.
- cpu: the reduced protocol: LoRA on the top 4 layers with the frozen layers' outputs kept (a CPU
  re-encodes the 40,943 entities at every validation; with the cache it runs only the top layers),
  entity texts of 12 tokens, batch 32, `--minutes` (10) of training, a fixed-seed sample of 500 test
  triples. Its figures are not the paper's protocol and the table says so.

Before anything trains, a probe on the device times training steps at the protocol's batch and the
encoding of entity texts; from those the plan sizes the run (the cosine schedule spans the steps that fit
in the budget, validations included) and prints the expected time of every stage. `kalmkg train
--max-minutes` is the hard stop. Each stage runs through the CLI as a user would run it and keeps its
output in `--work`, so a second call picks up where the first was cut: the plan is kept (plan.json), a
run killed mid-training is resumed (`kalmkg train --resume`), the entity index is incremental, and only
the evaluations are redone.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

DATASET = ROOT.parent / "shared" / "datasets" / "WN18RR"
RUN = "wn18rr"
# KALM.md: WN18RR test, filtered, both directions averaged (MRR, H@1, H@3, H@10, MR)
PUBLISHED = (
    ("Llama-2-7B without KaLM (paper)", .010, .004, .010, .020, 15969),
    ("Llama-2-7B + KaLM (paper)", .596, .497, .706, .856, 22),
    ("Mistral-7B + KaLM (paper)", .634, .526, .743, .872, 25),
    ("SimKGC, BERT-base bi-encoder (paper)", .666, .587, .717, .800, 196),
)


@dataclass(frozen=True)
class Protocol:
    """How a call trains and evaluates; each field is also a command-line option of this script."""

    name: str
    minutes: float  # the training loop's budget, validations included (kalmkg train --max-minutes)
    epochs: float  # the most it trains (the paper: 20); fewer when the budget ends first
    batch_size: int  # in-batch negatives: batch - 1
    lora_layers: int  # adapt the top N layers (0: all)
    max_entity_tokens: int
    frozen_cache_mb: int  # keep the frozen layers' outputs (pays off with lora_layers > 0)
    eval_limit: int  # valid triples of each validation: the curve's points
    validations: int  # points on the curve
    test_limit: int  # test triples evaluated (0: all), a fixed-seed sample
    encode_batch: int  # texts per forward pass of embed and evaluate
    structure: str  # complex (fused with the text scores) or none (KaLM alone)
    structure_minutes: float


PROTOCOLS = {
    "gpu": Protocol("gpu", minutes=5.0, epochs=20, batch_size=256, lora_layers=0, max_entity_tokens=50,
                    frozen_cache_mb=0, eval_limit=1000, validations=5, test_limit=0, encode_batch=512,
                    structure="complex", structure_minutes=1.0),
    "cpu": Protocol("cpu", minutes=10.0, epochs=20, batch_size=32, lora_layers=4, max_entity_tokens=12,
                    frozen_cache_mb=4096, eval_limit=200, validations=6, test_limit=500, encode_batch=64,
                    structure="complex", structure_minutes=5.0),
}


# ------------------------------------------------------------------ the probe and the plan
def probe(graph: Path, work: Path, protocol: Protocol, device: str, base: str) -> dict:
    """Seconds per training step at the protocol's batch, and entity texts encoded per second, on `device`."""
    import numpy as np

    from kalmkg import text
    from kalmkg.encode import TorchEncoder
    from kalmkg.evaluation.ranking import encode_texts
    from train_mfu import measure, model_shape, prepare

    t0 = time.perf_counter()
    folder = work / "probe"
    shutil.rmtree(folder, ignore_errors=True)
    setup = prepare(graph, folder, device, "auto", base, batch_size=protocol.batch_size,
                    lora_layers=protocol.lora_layers, max_entity_tokens=protocol.max_entity_tokens)
    shape = model_shape(setup.model, setup.cfg)
    gpu = device.startswith("cuda")
    step = measure(setup, protocol.batch_size, 5 if gpu else 2, shape)
    entities = setup.texts.entities
    pick = np.random.default_rng(0).choice(len(entities), min(len(entities), 4096 if gpu else 256), replace=False)
    encoder = TorchEncoder(setup.model.eval(), setup.tokenizer, device)
    encode_texts(encoder, [text.tail_view(entities[i]) for i in pick[:8]], 8)  # warm-up
    t1 = time.perf_counter()
    encode_texts(encoder, [text.tail_view(entities[i]) for i in pick], protocol.encode_batch)
    rate = len(pick) / (time.perf_counter() - t1)
    shutil.rmtree(folder, ignore_errors=True)
    return {"s_per_step": step["s_per_step"], "texts_per_s": rate, "train_examples": len(setup.tokens.examples),
            "entities": len(entities), "layers": shape.layers, "seconds": time.perf_counter() - t0}


def make_plan(protocol: Protocol, measured: dict, test_triples: int) -> dict:
    """How many steps fit in the budget beside the validations, and what each stage is expected to take."""
    rate, n_ent = measured["texts_per_s"], measured["entities"]
    full_encode = n_ent / rate
    first_validation = full_encode + 2 * protocol.eval_limit / rate
    # with the frozen layers' outputs kept, later validations run only the adapted layers
    kept = protocol.frozen_cache_mb > 0 and 0 < protocol.lora_layers < measured["layers"]
    later = first_validation * (protocol.lora_layers / measured["layers"] if kept else 1.0)
    validations_s = first_validation + (protocol.validations - 1) * later
    budget = 60 * protocol.minutes
    train_s = max(budget - validations_s, 0.25 * budget)
    steps_per_epoch = measured["train_examples"] // protocol.batch_size
    steps = max(protocol.validations, min(int(protocol.epochs * steps_per_epoch), int(train_s / measured["s_per_step"])))
    tested = min(protocol.test_limit or test_triples, test_triples)
    expected = {
        "training": min(budget, steps * measured["s_per_step"] + validations_s),
        "structure model (at most)": 60 * protocol.structure_minutes if protocol.structure != "none" else 0.0,
        "entity index": full_encode,
        "evaluation (valid fit, test)": 2 * (protocol.eval_limit + tested) / rate,
    }
    return {"protocol": asdict(protocol), "steps": steps, "epochs": steps / max(1, steps_per_epoch),
            "eval_every": -(-steps // protocol.validations), "test_triples": tested,  # last validation: last step "test_triples": tested,
            "examples_per_step": protocol.batch_size, "measured": measured, "expected_s": expected}


def print_plan(plan: dict, device: str) -> None:
    p, m = plan["protocol"], plan["measured"]
    print(f"protocol {p['name']} on {device}: {plan['steps']:,} steps of {p['batch_size']} "
          f"({plan['epochs']:.2f} epochs of {m['train_examples']:,} examples), {p['validations']} validations on "
          f"{p['eval_limit']} valid triples, test on {plan['test_triples']:,} triples", flush=True)
    print(f"measured: {m['s_per_step']:.2f} s/step, {m['texts_per_s']:.0f} entity texts/s "
          f"(probe {m['seconds']:.0f} s)", flush=True)
    parts = ", ".join(f"{k} ~{v / 60:.1f} min" for k, v in plan["expected_s"].items())
    print(f"expected: {parts}; total ~{sum(plan['expected_s'].values()) / 60:.1f} min", flush=True)


# ------------------------------------------------------------------ the stages, through the CLI
def cli(ws: Path, *args: str) -> str:
    """`kalmkg -w ws ARGS`: its progress lines go to this script's stderr, its stdout is returned."""
    cmd = [sys.executable, "-m", "kalmkg", "-w", str(ws), *args]
    out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"failed ({out.returncode}): {' '.join(cmd)}")
    return out.stdout


def run_state(ws: Path) -> tuple[str | None, bool]:
    """(the run's status in the store, whether it has a checkpoint to resume from)."""
    from kalmkg.store import Store
    from kalmkg.training.checkpoint import has_checkpoint
    from kalmkg.workspace import Workspace

    workspace = Workspace(ws)
    if not workspace.db_path.exists():
        return None, False
    with Store.open(workspace) as store:
        status = store.run_status(RUN)
    return status, has_checkpoint(ws / "runs" / RUN / "checkpoint")


def train_command(plan: dict, device: str, base: str) -> list[str]:
    p = plan["protocol"]
    return ["train", "--base", base, "--run-name", RUN, "--device", device, "--no-embed",
            "--max-steps", str(plan["steps"]), "--max-minutes", f"{p['minutes']:g}",
            "--batch-size", str(p["batch_size"]), "--lora-layers", str(p["lora_layers"]),
            "--max-entity-tokens", str(p["max_entity_tokens"]), "--frozen-cache-mb", str(p["frozen_cache_mb"]),
            "--eval-every", str(plan["eval_every"]), "--eval-limit", str(p["eval_limit"]), "--patience", "0",
            "--checkpoint-every", str(max(1, plan["eval_every"] // 2)),
            "--structure", p["structure"], "--structure-minutes", f"{p['structure_minutes']:g}"]


def train_stage(ws: Path, plan: dict, device: str, base: str) -> str:
    status, resumable = run_state(ws)
    if status == "finished":
        return "finished before: kept"
    if status is not None and resumable:
        cli(ws, "train", "--resume", RUN)
        return "resumed from its checkpoint"
    shutil.rmtree(ws / "runs" / RUN, ignore_errors=True)  # started but killed before its first checkpoint
    cli(ws, *train_command(plan, device, base))
    return "trained"


def evaluate_stage(ws: Path, plan: dict, device: str) -> dict:
    """The entity index, the structure model's weight fitted on valid, the test evaluation."""
    p = plan["protocol"]
    batch = ["--batch-size", str(p["encode_batch"]), "--device", device]
    cli(ws, "embed", "--run", RUN, *batch)
    if p["structure"] != "none":
        cli(ws, "evaluate", "--run", RUN, "--split", "valid", "--limit", str(p["eval_limit"]), *batch)
    return json.loads(cli(ws, "evaluate", "--run", RUN, "--split", "test", "--limit", str(p["test_limit"]),
                          "--seed", "0", "--json", *batch))


# ------------------------------------------------------------------ what it prints
def read_curve(ws: Path, examples_per_step: int) -> list[dict]:
    lines = (ws / "runs" / RUN / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    return [{"step": r["step"], "examples": r["step"] * examples_per_step, "minutes": r.get("seconds", 0) / 60,
             **{k: r["valid"][k] for k in ("mrr", "hits@1", "hits@10", "count")}} for r in records if "valid" in r]


def print_curve(curve: list[dict], train_examples: int) -> None:
    print("| step | examples seen | epochs | minutes | valid MRR | Hits@1 | Hits@10 |")
    print("|---|---|---|---|---|---|---|")
    for c in curve:
        print(f"| {c['step']:,} | {c['examples']:,} | {c['examples'] / train_examples:.2f} | {c['minutes']:.1f} | "
              f"{c['mrr']:.3f} | {c['hits@1']:.3f} | {c['hits@10']:.3f} |")


def print_table(result: dict, plan: dict, base: str) -> None:
    p = plan["protocol"]
    sample = "all" if plan["test_triples"] >= result["test_total"] else f"a fixed-seed sample of {plan['test_triples']:,}"
    print(f"WN18RR test ({sample} of {result['test_total']:,} triples, both directions), filtered, realistic ranks; "
          f"kalmkg: {base}, protocol {p['name']}, {plan['epochs']:.2f} planned epochs")
    print("| model | MRR | Hits@1 | Hits@3 | Hits@10 | MR | tail MRR | head MRR |")
    print("|---|---|---|---|---|---|---|---|")
    for name, *row in PUBLISHED:
        print(f"| {name} | {row[0]:.3f} | {row[1]:.3f} | {row[2]:.3f} | {row[3]:.3f} | {row[4]} | | |")
    ours = [("kalmkg (KaLM + structure model, fused)" if p["structure"] != "none" else "kalmkg (KaLM)",
             result["metrics"])]
    labels = {"text": "... KaLM text encoder alone", "structure": "... structure model alone"}
    ours += [(labels.get(k, k), m) for k, m in result.get("components", {}).items()]
    for name, m in ours:
        b = m["both"]
        print(f"| {name} | {b['mrr']:.3f} | {b['hits@1']:.3f} | {b['hits@3']:.3f} | {b['hits@10']:.3f} | "
              f"{b['mr']:.0f} | {m['tail']['mrr']:.3f} | {m['head']['mrr']:.3f} |")


def machine(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    from kalmkg.llamacpp.environment import cpu_model

    return f"{cpu_model()}, {_cores()} cores"


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--graph", type=Path, default=DATASET, help="WN18RR's folder (train/dev/test.tsv, texts)")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "_work" / "wn18rr",
                        help="where the workspace, the plan and the result stay between calls")
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--protocol", choices=sorted(PROTOCOLS), help="default: gpu on CUDA, cpu elsewhere")
    for name, kind in Protocol.__annotations__.items():
        if name != "name":
            parser.add_argument(f"--{name.replace('_', '-')}", type={"float": float, "int": int}.get(kind, str))
    parser.add_argument("--fresh", action="store_true", help="throw away what --work holds and start over")
    parser.add_argument("--json", type=Path, help="write the plan, the curve and the result here")
    args = parser.parse_args()
    if not (args.graph / "train.tsv").is_file():
        raise SystemExit(f"no train.tsv in {args.graph}")

    from kalmkg.device import pick_device

    device = pick_device(args.device)
    protocol = PROTOCOLS[args.protocol or ("gpu" if device.startswith("cuda") else "cpu")]
    protocol = replace(protocol, **{k: v for k, v in vars(args).items() if k in Protocol.__annotations__ and v is not None})
    if args.fresh:
        shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True, exist_ok=True)
    ws, plan_file, started = args.work / "ws", args.work / "plan.json", time.perf_counter()

    # the plan: measured once and kept, so a resumed call trains the schedule the first call began
    if plan_file.exists():
        plan = json.loads(plan_file.read_text())
        print(f"plan kept from an earlier call ({plan_file}; this call's protocol options are not used: "
              "--fresh starts over)", flush=True)
    else:
        test_triples = sum(1 for line in (args.graph / "test.tsv").read_text(encoding="utf-8").splitlines() if line)
        plan = make_plan(protocol, probe(args.graph, args.work, protocol, device, args.base), test_triples)
        plan["machine"], plan["base"] = machine(device), args.base
        plan_file.write_text(json.dumps(plan, indent=1) + "\n")
    print_plan(plan, plan.get("machine", device))

    cli(ws, "ingest", str(args.graph))  # all or nothing; files already in are skipped
    stages = {}
    t0 = time.perf_counter()
    stages["training"] = train_stage(ws, plan, device, plan["base"])
    train_s = time.perf_counter() - t0
    result = evaluate_stage(ws, plan, device)
    eval_s = time.perf_counter() - t0 - train_s
    result["test_total"] = sum(1 for line in (args.graph / "test.tsv").read_text(encoding="utf-8").splitlines() if line)
    curve = read_curve(ws, plan["examples_per_step"])
    print(f"training: {stages['training']} ({train_s / 60:.1f} min in this call); index and evaluation "
          f"{eval_s / 60:.1f} min; this call {(time.perf_counter() - started) / 60:.1f} min", flush=True)
    print_curve(curve, plan["measured"]["train_examples"])
    print()
    print_table(result, plan, plan["base"])
    if args.json:
        args.json.write_text(json.dumps({"plan": plan, "curve": curve, "result": result, "stages": stages,
                                         "python": platform.python_version()}, indent=1) + "\n")


if __name__ == "__main__":
    main()
