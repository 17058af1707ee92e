"""Link prediction against a peer: PyKEEN (RotatE and ComplEx) and kalmkg trained on the same split of a
graph in the same run, evaluated on the same test triples by the same protocol (filtered by every known
triple, realistic tie-aware ranks, both directions), each with its wall time on this machine.

    python bench/link_prediction.py                                  # UMLS, one kalmkg recipe
    python bench/link_prediction.py --kalmkg-steps 100,540 --json lp.json
    python bench/link_prediction.py --skip-pykeen --kalmkg-steps 540  # kalmkg only

PyKEEN is a benchmark-only dependency (`pip install pykeen`). Its models train through
`pykeen.pipeline.pipeline` on the split's labelled triples, entities and relations numbered over all
three files (as kalmkg's store numbers them), the test ranks filtered by train and valid as well.

kalmkg runs as a user runs it, through the CLI in a fresh workspace: `ingest` the folder, `train` (which
ends by building the entity index and fitting the structure model's weight on valid), `evaluate` on
test. Its wall time counts all of that, the model's loading included. The evaluation reports the fused
ranking and, beside it, the text model (KaLM) and the structure model each alone, so the share of each
is visible. `--structure none` in `--kalmkg-args` trains the paper's KaLM alone.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATASETS = ROOT.parent / "shared" / "datasets"
# The README's UMLS recipe (LoRA on the top 16 layers, entity texts of 8 tokens, batch 32, lr 1e-3)
KALMKG_ARGS = "--max-entity-tokens 8 --lora-layers 16 --lr 1e-3 --batch-size 32 --warmup 0.03 --eval-limit 300"
# What a KG engineer would run with PyKEEN: RotatE as the issue measured it, ComplEx trained 1-N
PYKEEN_MODELS = {
    "RotatE": dict(model="RotatE", model_kwargs=dict(embedding_dim=200), training_loop="sLCWA",
                   negative_sampler_kwargs=dict(num_negs_per_pos=32), optimizer="Adam",
                   optimizer_kwargs=dict(lr=1e-3), training_kwargs=dict(num_epochs=300, batch_size=256)),
    "ComplEx": dict(model="ComplEx", model_kwargs=dict(embedding_dim=200), training_loop="LCWA",
                    loss="CrossEntropyLoss", optimizer="Adam", optimizer_kwargs=dict(lr=1e-3),
                    training_kwargs=dict(num_epochs=100, batch_size=256)),
}
COLUMNS = ("mrr", "hits@1", "hits@3", "hits@10", "mr")


def read_split(folder: Path) -> dict[str, list[list[str]]]:
    out = {}
    for split, name in (("train", "train.tsv"), ("valid", "dev.tsv"), ("test", "test.tsv")):
        path = folder / name if (folder / name).is_file() else folder / f"{split}.tsv"
        out[split] = [line.rstrip("\n").split("\t")[:3] for line in path.read_text(encoding="utf-8").splitlines()
                      if line.strip()]
    return out


def run_pykeen(name: str, split: dict, seed: int) -> dict:
    import numpy as np
    from pykeen.pipeline import pipeline
    from pykeen.triples import TriplesFactory

    every = [t for rows in split.values() for t in rows]
    entity_to_id = {e: i for i, e in enumerate(sorted({x for h, _, t in every for x in (h, t)}))}
    relation_to_id = {r: i for i, r in enumerate(sorted({r for _, r, _ in every}))}
    factories = {s: TriplesFactory.from_labeled_triples(np.array(rows, dtype=str), entity_to_id=entity_to_id,
                                                         relation_to_id=relation_to_id)
                 for s, rows in split.items()}
    t0 = time.perf_counter()
    result = pipeline(training=factories["train"], validation=factories["valid"], testing=factories["test"],
                      random_seed=seed, device="cpu", evaluator="RankBasedEvaluator",
                      evaluation_kwargs=dict(additional_filter_triples=[factories["train"].mapped_triples,
                                                                        factories["valid"].mapped_triples]),
                      **PYKEEN_MODELS[name])
    seconds = time.perf_counter() - t0
    metric = result.metric_results.get_metric
    names = {"mrr": "inverse_harmonic_mean_rank", "hits@1": "hits_at_1", "hits@3": "hits_at_3",
             "hits@10": "hits_at_10", "mr": "arithmetic_mean_rank"}
    # PyKEEN's "head" side predicts heads, as kalmkg's head direction does
    by_side = {side: {k: float(metric(f"{side}.realistic.{v}")) for k, v in names.items()}
               for side in ("tail", "head", "both")}
    return {"program": f"PyKEEN {name}", "seconds": seconds, "metrics": by_side, "config": _plain(PYKEEN_MODELS[name])}


def run_kalmkg(graph: Path, work: Path, steps: int, extra_args: str, seed: int) -> dict:
    ws = work / f"kalmkg-{steps}"
    shutil.rmtree(ws, ignore_errors=True)
    t0 = time.perf_counter()
    kalmkg(ws, "ingest", str(graph))
    args = ["train", "--max-steps", str(steps), "--eval-every", str(max(1, steps // 4)), "--seed", str(seed),
            "--run-name", "bench", *extra_args.split()]
    said = kalmkg(ws, *args).splitlines()
    out = json.loads(kalmkg(ws, "evaluate", "--run", "bench", "--json"))
    seconds = time.perf_counter() - t0
    structure = _structure_info(ws / "runs" / "bench")
    return {"program": f"kalmkg, {steps} steps", "seconds": seconds, "metrics": out["metrics"],
            "components": out.get("components", {}), "fusion": out.get("fusion"), "structure": structure,
            "command": "kalmkg " + " ".join(args), "train_said": said}


def kalmkg(ws: Path, *args: str) -> str:
    cmd = [sys.executable, "-m", "kalmkg", "-w", str(ws), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{out.stderr[-2000:]}")
    return out.stdout


def _structure_info(run_dir: Path) -> dict | None:
    from kalmkg.structure.model import StructureModel

    model = StructureModel.load(run_dir)
    return model.info if model is not None else None


def _plain(value):
    return json.loads(json.dumps(value, default=str))


def print_table(rows: list[dict], peer_seconds: float | None) -> None:
    print("| program | wall s | vs PyKEEN RotatE's time | MRR | Hits@1 | Hits@3 | Hits@10 | MR | tail MRR | head MRR |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        parts = [(row["program"], row["metrics"], row["seconds"])]
        parts += [(f"... {name} alone", m, None) for name, m in row.get("components", {}).items()]
        for program, m, seconds in parts:
            ratio = f"{seconds / peer_seconds:.2f}x" if seconds and peer_seconds else ""
            b = m["both"]
            print(f"| {program} | {f'{seconds:.0f}' if seconds else ''} | {ratio} | {b['mrr']:.3f} | "
                  f"{b['hits@1']:.3f} | {b['hits@3']:.3f} | {b['hits@10']:.3f} | {b['mr']:.1f} | "
                  f"{m['tail']['mrr']:.3f} | {m['head']['mrr']:.3f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--graph", type=Path, default=DATASETS / "UMLS", help="a folder of train/dev/test TSV files")
    parser.add_argument("--kalmkg-steps", default="100", help="comma-separated: one kalmkg run per step count")
    parser.add_argument("--kalmkg-args", default=KALMKG_ARGS, help="more `kalmkg train` options")
    parser.add_argument("--pykeen", default="RotatE,ComplEx", help="PyKEEN models to train")
    parser.add_argument("--skip-pykeen", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "_work" / "link-prediction")
    parser.add_argument("--json", type=Path, help="write every figure here")
    args = parser.parse_args()
    if not (args.graph / "train.tsv").is_file():
        raise SystemExit(f"no train.tsv in {args.graph}")
    split = read_split(args.graph)
    print(f"{args.graph.name}: {len(split['train']):,} train, {len(split['valid']):,} valid, "
          f"{len(split['test']):,} test triples", file=sys.stderr)
    rows = []
    if not args.skip_pykeen:
        for name in [n for n in args.pykeen.split(",") if n]:
            rows.append(run_pykeen(name, split, args.seed))
            print(f"{rows[-1]['program']}: {rows[-1]['seconds']:.0f} s, MRR {rows[-1]['metrics']['both']['mrr']:.3f}",
                  file=sys.stderr)
    args.work.mkdir(parents=True, exist_ok=True)
    for steps in [int(s) for s in args.kalmkg_steps.split(",") if s]:
        rows.append(run_kalmkg(args.graph, args.work, steps, args.kalmkg_args, args.seed))
        print(f"{rows[-1]['program']}: {rows[-1]['seconds']:.0f} s, MRR {rows[-1]['metrics']['both']['mrr']:.3f}",
              file=sys.stderr)
    peer = next((r["seconds"] for r in rows if r["program"] == "PyKEEN RotatE"), None)
    print_table(rows, peer)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
