"""The entity index's ANN build as the graph grows: build time, peak memory, recall and query time of
kalmkg's partitioning against the rule it replaced, in the same run (issue 16 part 3).

    python bench/ann_build.py                                   # 100k and 300k rows, both rules
    python bench/ann_build.py --sizes 1000000 --baseline-max 0  # 1M rows, kalmkg's rule alone

Each (size, rule) runs in a fresh process: a LanceDB table of n unit vectors of SmolLM2's width (576)
is written the way `kalmkg embed` writes it (8,192 rows at a time; `embed` then compacts the table, 1.2 s
for 100k rows, which this bench leaves out for both rules), then the index is built with
`kalmkg.index._build_ann` (kalmkg: IVF partitions of 10,000 rows, each its own HNSW graph, three quarters
of them probed) or with the rule before it (the baseline: one partition per million rows, all probed), and
queried through `EntityIndex.search`, the code `predict` runs (refined on the full vectors).

The vectors are synthetic and clustered (2,000 centres plus a direction they all share, as a language
model's embeddings share one), since encoding a million entity texts takes hours on a CPU. Recall@10 is
against exact search over the same vectors, for queries drawn from the same clusters but not in the
table. Peak RSS is the kernel's for the whole process; "build" is the peak while building minus the
peak before it (the table writing).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DIM = 576
CENTRES = 2000


def _vectors(rng, centres, shared, m: int) -> np.ndarray:
    v = shared + centres[rng.integers(0, len(centres), m)] + 0.8 * rng.standard_normal((m, DIM), dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def child(n: int, rule: str, queries: int) -> dict:
    os.environ.setdefault("LANCEDB_LOG", "error")
    import lancedb
    import pyarrow as pa
    from lancedb.index import HnswSq

    import kalmkg.index as index

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((CENTRES, DIM), dtype=np.float32)
    shared = 2 * rng.standard_normal(DIM, dtype=np.float32)
    work = Path(tempfile.mkdtemp(prefix="ann-build-"))
    try:
        db = lancedb.connect(str(work))
        schema = index._schema(DIM, {})
        table, kept = None, np.lib.format.open_memmap(work / "v.npy", mode="w+", dtype=np.float32, shape=(n, DIM))
        for start in range(0, n, 8192):
            v = _vectors(rng, centres, shared, min(8192, n - start))
            kept[start:start + len(v)] = v
            ids = np.arange(start, start + len(v), dtype=np.int32)
            batch = pa.table({"id": pa.array(ids), "key": [f"e{i}" for i in ids], "label": [f"e{i}" for i in ids],
                              "hash": ["0" * 16] * len(v),
                              "vector": pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), DIM)},
                             schema=schema)
            if table is None:
                table = db.create_table("entities", data=batch, schema=schema)
            else:
                table.add(batch)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        t0 = time.perf_counter()
        if rule == "kalmkg":
            partitions = index.ann_partitions(n)
            index._build_ann(table, n)
            meta = {"rows": str(n), "ann_partitions": str(partitions)}
        else:
            partitions = max(1, n // 1_000_000)
            table.create_index("vector", config=HnswSq(distance_type="cosine", num_partitions=partitions))
            meta = {"rows": str(n)}  # unstamped: probed by the rule of then
        build_s = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        ix = index.EntityIndex(table, meta, index._has_ann(table))
        q = _vectors(rng, centres, shared, queries)
        truth = np.argsort(-(q @ np.asarray(kept).T), axis=1)[:, :10]
        ix.search(q[:2], 10)  # warm
        t0 = time.perf_counter()
        ids, _ = ix.search(q, 10)
        query_ms = 1000 * (time.perf_counter() - t0) / queries
        recall = np.mean([len(set(a.tolist()) & set(b.tolist())) / 10 for a, b in zip(ids, truth)])
        return {"rows": n, "rule": rule, "partitions": partitions, "probes": index.ann_probes(meta, n),
                "build_s": build_s, "peak_mb": peak, "build_mb": peak - before, "recall": float(recall),
                "query_ms": query_ms}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="100000,300000", help="rows, comma-separated")
    p.add_argument("--baseline-max", type=int, default=300_000,
                   help="largest size the baseline runs at (one HNSW graph of 1M rows takes about half an hour)")
    p.add_argument("--queries", type=int, default=50)
    p.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(int(args.child[0]), args.child[1], args.queries)))
        return
    rows = []
    for n in sorted(int(s) for s in args.sizes.split(",")):
        for rule in (["baseline"] if n <= args.baseline_max else []) + ["kalmkg"]:
            out = subprocess.run([sys.executable, __file__, "--child", str(n), rule, "--queries", str(args.queries)],
                                 capture_output=True, text=True, cwd=ROOT)
            if out.returncode != 0:
                raise SystemExit(f"{rule} at {n:,} rows failed:\n{out.stderr[-2000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{n:,} rows, {rule}: build {r['build_s']:.0f} s, recall@10 {r['recall']:.3f}", file=sys.stderr,
                  flush=True)
    print("\n| rows | rule | partitions (probed) | build s | peak RSS MB | build's own MB | recall@10 | query ms |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        name = "kalmkg: 10k rows a partition, 3/4 probed" if r["rule"] == "kalmkg" else "baseline: 1M rows a partition"
        print(f"| {r['rows']:,} | {name} | {r['partitions']} ({r['probes']}) | {r['build_s']:.0f} | {r['peak_mb']:,.0f} "
              f"| {r['build_mb']:,.0f} | {r['recall']:.3f} | {r['query_ms']:.1f} |")


if __name__ == "__main__":
    main()
