"""Link-prediction latency: warm in-process queries (query encoding + search) and a cold CLI call.

    python bench/predict_latency.py                              # WN18RR (40,943 entities), SmolLM2-135M
    python bench/predict_latency.py --queries 50 --cold-runs 1   # a quick look
    python bench/predict_latency.py --encode-entities            # real entity vectors (slow on a CPU)

The workload of `kalmkg predict HEAD RELATION ?`: encode one head-relation view with the model, then
rank every entity by cosine similarity. Issue 4's target on this CPU (GGUF backend): warm p50 <= 50 ms,
p95 <= 100 ms over WN18RR's 40,943 entities.

What is measured, and the shortcuts taken:
- The model is the untrained base (`--base`, default the embedded SmolLM2-135M, 576-dim): a trained
  run has the same architecture and, with its LoRA adapter merged at load time, the same cost per query.
- The entity index holds random unit vectors of the model's width, not encoded entities: encoding
  40,943 entity texts with SmolLM2 on 2 CPU cores takes tens of minutes, and search cost does not
  depend on the values. `--encode-entities` encodes them for real. Either way the table is written
  by `kalmkg.index.embed` (through its Encoder interface) and opened fresh by `Predictor`.
- Baseline, measured in the same run: the same query path with LanceDB's own flat scan instead of
  kalmkg's exact in-memory matrix product (both exact; below the ANN threshold kalmkg searches in memory).
- Cold CLI: `python -m kalmkg predict ...` in a fresh process (imports, model and index load, one
  query). Until the `predict` command is registered in cli.py, the same library call in a fresh
  process stands in for it (labelled so).
- GGUF backend: the embedded SmolLM2 *is* a GGUF (Q4_1), so its row runs that file through llama.cpp
  (LLAMA_POOLING_TYPE_LAST) against the same index; for a trained run it needs `kalmkg export`.

Queries are WN18RR train triples (fixed seed), half tail, half head prediction. The workspace is
cached in bench/_work/ so a second run skips ingest and index building.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_GRAPH = ROOT.parent / "shared" / "datasets" / "WN18RR"


class RandomUnitEncoder:
    """Stands in for the model when building the index: seeded random unit vectors of width `dim`."""

    def __init__(self, dim: int, seed: int = 0):
        self.dim = dim
        self.rng = np.random.default_rng(seed)

    def encode(self, texts, batch_size: int = 64) -> np.ndarray:
        v = self.rng.standard_normal((len(texts), self.dim)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)


def prepare(args) -> Path:
    """A workspace holding the graph and an entity index for the base model (cached)."""
    from kalmkg.index import EntityIndex, embed
    from kalmkg.ingestion import ingest, resolve_sources
    from kalmkg.loaded import load_model
    from kalmkg.store import Store
    from kalmkg.workspace import Workspace

    tag = f"{Path(args.graph).name}-{'encoded' if args.encode_entities else 'random'}"
    root = ROOT / "bench" / "_work" / f"predict-{tag}"
    ws = Workspace(root)
    if not ws.exists():
        t0 = time.perf_counter()
        tmp = root.with_name(root.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        with Store.open(Workspace(tmp), create=True) as store:
            ingest(store, resolve_sources([Path(args.graph)]))
        os.replace(tmp, root)
        print(f"ingested {args.graph} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    loaded = load_model(ws, base=args.base, device="cpu")
    if EntityIndex.try_open(ws, loaded)[0] is None:
        t0 = time.perf_counter()
        encoder = None if args.encode_entities else RandomUnitEncoder(loaded.model.config.hidden_size)
        result = embed(ws, loaded, encoder, full=True, batch_size=args.batch_size, backend="torch")
        print(f"built the entity index ({result.total:,} x {result.dim}, "
              f"{'encoded' if args.encode_entities else 'random unit vectors'}) in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr)
    return root


def sample_queries(ws, n: int, seed: int = 0) -> list[tuple[int, int, str]]:
    from kalmkg.store import Store

    with Store.open(ws) as store:
        triples = store.triples_array(("train",))
    rng = np.random.default_rng(seed)
    rows = triples[rng.choice(len(triples), n, replace=len(triples) < n)]
    return [(int(h), int(r), "tail") if i % 2 == 0 else (int(t), int(r), "head")
            for i, (h, r, t) in enumerate(rows.tolist())]


def warm(args, root: Path) -> list[dict]:
    """p50/p95 of in-process queries per backend, and the LanceDB flat-scan baseline."""
    import torch

    from kalmkg.errors import KalmkgError
    from kalmkg.prediction import Predictor
    from kalmkg.loaded import make_encoder
    from kalmkg.workspace import Workspace

    torch.set_num_threads(args.threads)
    ws = Workspace(root)
    t0 = time.perf_counter()
    predictor = Predictor.open(ws, base=args.base, backend="torch", device="cpu")
    predictor.index.vectors()  # read once, as the first query would
    open_s = time.perf_counter() - t0
    queries = sample_queries(ws, args.queries + args.warmup)
    encoders = {"torch": predictor.encoder}
    try:
        encoders["gguf"] = make_encoder(predictor.loaded, "gguf", n_threads=args.threads)
    except KalmkgError as e:
        print(f"gguf backend skipped: {e}", file=sys.stderr)

    def timed(encoder, search) -> dict:
        total, enc, srch = [], [], []
        for i, (e, r, direction) in enumerate(queries):
            t0 = time.perf_counter()
            q = encoder.encode([predictor.query_text(e, r, direction)], 1)
            t1 = time.perf_counter()
            search(q)
            t2 = time.perf_counter()
            if i >= args.warmup:
                total.append(t2 - t0), enc.append(t1 - t0), srch.append(t2 - t1)
        return {"p50": _ms(total, 50), "p95": _ms(total, 95), "encode_p50": _ms(enc, 50),
                "search_p50": _ms(srch, 50), "n": len(total)}

    def full_query(encoder) -> dict:
        predictor.encoder = encoder
        t = []
        for i, (e, r, direction) in enumerate(queries):
            t0 = time.perf_counter()
            predictor.query(e, r, direction, args.k)
            if i >= args.warmup:
                t.append(time.perf_counter() - t0)
        return {"p50": _ms(t, 50), "p95": _ms(t, 95), "encode_p50": None, "search_p50": None, "n": len(t)}

    table = predictor.index.table

    def lance_flat(q):
        table.search(q[0]).distance_type("cosine").limit(args.k).select(["id", "_distance"]).to_arrow()

    rows = []
    for name, encoder in encoders.items():
        rows.append({"path": f"kalmkg {name}: encode + exact in-memory search",
                     **timed(encoder, lambda q: predictor.index.search(q, args.k))})
        rows.append({"path": f"kalmkg {name}: Predictor.query (+ known marks)", **full_query(encoder)})
    rows.append({"path": "baseline torch: encode + LanceDB flat scan", **timed(encoders["torch"], lance_flat)})
    for r in rows:
        r["open_s"] = open_s
    return rows


def _ms(xs, p) -> float:
    return 1000 * float(np.percentile(xs, p))


def cold(args, root: Path, backend: str) -> dict:
    """Wall time of fresh processes answering one query."""
    from kalmkg.cli.app import app
    from kalmkg.store import Store
    from kalmkg.workspace import Workspace

    with Store.open(Workspace(root)) as store:
        ents, rels = store.entity_table()["key"].to_pylist(), store.relation_table()["key"].to_pylist()
    e, r, _ = sample_queries(Workspace(root), 1, seed=1)[0]
    registered = any((c.name or c.callback.__name__) == "predict" for c in app.registered_commands)
    if registered:
        cmd = [sys.executable, "-m", "kalmkg", "-w", str(root), "predict", ents[e], rels[r], "?", "-k", str(args.k),
               "--base", args.base, "--backend", backend, "--json"]
        label = f"cold CLI {backend}: python -m kalmkg predict ... --json"
    else:
        code = ("import sys, json; from kalmkg.prediction import predict; from kalmkg.workspace import Workspace; "
                "r = predict(Workspace.resolve(sys.argv[1]), sys.argv[2], sys.argv[3], '?', k=int(sys.argv[4]), "
                "base=sys.argv[5], backend=sys.argv[6]); print(json.dumps(r.to_json()))")
        cmd = [sys.executable, "-c", code, str(root), ents[e], rels[r], str(args.k), args.base, backend]
        label = f"cold process {backend} (library call; `predict` not in cli.py yet)"
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "OMP_NUM_THREADS": str(args.threads)}
    times = []
    for _ in range(args.cold_runs):
        t0 = time.perf_counter()
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        times.append(time.perf_counter() - t0)
        if out.returncode != 0:
            raise SystemExit(f"cold run failed:\n{out.stderr[-2000:]}")
        json.loads(out.stdout)  # the CLI prints one (indented) JSON document
    return {"path": label, "median_s": float(np.median(times)), "runs": len(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--graph", default=str(DEFAULT_GRAPH))
    parser.add_argument("--base", default="smollm2-135m")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--cold-runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                        help="torch and llama.cpp threads [default: half the logical cores]")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--encode-entities", action="store_true",
                        help="Encode every entity with the model instead of random unit vectors.")
    args = parser.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if not Path(args.graph).exists():
        raise SystemExit(f"{args.graph} not found (pass --graph; the benchmark's default is ../shared/datasets/WN18RR)")

    root = prepare(args)
    rows = warm(args, root)
    backends = ["torch"] + (["gguf"] if any(r["path"].startswith("kalmkg gguf") for r in rows) else [])
    cold_rows = [cold(args, root, b) for b in backends] if args.cold_runs > 0 else []

    from kalmkg.store import Store
    from kalmkg.workspace import Workspace

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    with Store.open(Workspace(root)) as store:
        n_ent = store.stats()["entities"]
    print(f"graph {Path(args.graph).name} ({n_ent:,} entities), base {args.base}, top-{args.k}, "
          f"{rows[0]['n']} warm queries after {args.warmup} warm-up, {args.threads} threads, "
          f"load average {load:.1f}; Predictor.open {rows[0]['open_s']:.1f} s")
    header = f"{'path':<58}{'p50 ms':>9}{'p95 ms':>9}{'encode p50':>12}{'search p50':>12}"
    print(header)
    print("-" * len(header))
    fmt = lambda x: f"{x:.1f}" if x is not None else "-"  # noqa: E731
    for r in rows:
        print(f"{r['path']:<58}{r['p50']:>9.1f}{r['p95']:>9.1f}{fmt(r['encode_p50']):>12}{fmt(r['search_p50']):>12}")
    if "gguf" not in backends:
        print(f"{'kalmkg gguf: encode + exact in-memory search':<58}{'(needs a GGUF: kalmkg export)':>42}")
    for c in cold_rows:
        print(f"{c['path']:<58}{'median ' + format(c['median_s'], '.2f') + ' s':>18} over {c['runs']} runs")


if __name__ == "__main__":
    main()
