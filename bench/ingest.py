"""Ingest throughput and peak memory: kalmkg vs a plain baseline, measured in the same run.

    python bench/ingest.py                      # 1M and 5M triples (N-Triples and TSV), baseline on 200k
    python bench/ingest.py --sizes 200000 --baseline-size 50000   # a quick look

Synthetic graphs: n edge triples over n/10 entities and 50 relations, plus one rdfs:label per entity
(N-Triples) or an entities.tsv text file (TSV). The baseline is what one writes first: rdflib
`Graph.parse` (or a csv loop for TSV) and one INSERT per triple into DuckDB, on a slice when it is too
slow for the full file; throughput is compared per triple. Each measurement runs in a fresh process so
that its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RDFS_LABEL = "<http://www.w3.org/2000/01/rdf-schema#label>"


def generate(workdir: Path, n: int, seed: int = 0) -> dict[str, Path]:
    """Write `n` triples as graph.nt and as a TSV folder (cached by size)."""
    nt = workdir / f"graph-{n}.nt"
    tsv = workdir / f"tsv-{n}"
    if nt.exists() and (tsv / "train.tsv").exists():
        return {"nt": nt, "tsv": tsv}
    rng = np.random.default_rng(seed)
    n_entities = max(n // 10, 10)
    tsv.mkdir(parents=True, exist_ok=True)
    chunk = 500_000
    with open(nt, "w") as fnt, open(tsv / "train.tsv", "w") as ftsv:
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            h = rng.integers(0, n_entities, m)
            r = rng.integers(0, 50, m)
            t = rng.integers(0, n_entities, m)
            fnt.write("".join(f"<http://example.org/e/{a}> <http://example.org/r/rel{b}> <http://example.org/e/{c}> .\n"
                              for a, b, c in zip(h.tolist(), r.tolist(), t.tolist())))
            ftsv.write("".join(f"e{a}\trel{b}\te{c}\n" for a, b, c in zip(h.tolist(), r.tolist(), t.tolist())))
        for start in range(0, n_entities, chunk):
            ids = range(start, min(start + chunk, n_entities))
            fnt.write("".join(f'<http://example.org/e/{i}> {RDFS_LABEL} "entity number {i}"@en .\n' for i in ids))
    with open(tsv / "entities.tsv", "w") as fe:
        fe.write("".join(f"e{i}\tentity number {i}\tthe synthetic entity {i}\n" for i in range(n_entities)))
    return {"nt": nt, "tsv": tsv}


def count_lines(path: Path) -> int:
    if path.is_dir():
        return sum(count_lines(p) for p in path.iterdir())
    with open(path, "rb") as fh:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: fh.read(1 << 24), b""))


# ------------------------------------------------------------------ the measured programs (child process)
def run_kalmkg(path: Path, workspace: Path) -> None:
    from kalmkg.ingestion import ingest, resolve_sources
    from kalmkg.store import Store
    from kalmkg.workspace import Workspace

    with Store.open(Workspace(workspace), create=True) as store:
        ingest(store, resolve_sources([path]))


def run_baseline(path: Path, workspace: Path, limit: int) -> None:
    import duckdb

    workspace.mkdir(parents=True, exist_ok=True)
    con = duckdb.connect(str(workspace / "baseline.duckdb"))
    con.execute("CREATE TABLE triples (s VARCHAR, p VARCHAR, o VARCHAR)")
    if path.suffix == ".nt":
        import itertools

        import rdflib

        with open(path) as fh:
            data = "".join(itertools.islice(fh, limit))
        g = rdflib.Graph()
        g.parse(data=data, format="nt")
        rows = ((str(s), str(p), str(o)) for s, p, o in g)
    else:
        import csv
        import itertools

        fh = open(path / "train.tsv", newline="")
        rows = itertools.islice(csv.reader(fh, delimiter="\t"), limit)
    con.execute("BEGIN")
    for row in rows:
        con.execute("INSERT INTO triples VALUES (?, ?, ?)", row)
    con.execute("COMMIT")


def child(args: argparse.Namespace) -> None:
    started = time.perf_counter()
    if args.program == "kalmkg":
        run_kalmkg(Path(args.path), Path(args.workspace))
    else:
        run_baseline(Path(args.path), Path(args.workspace), args.limit)
    seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"seconds": seconds, "peak_mb": peak_mb}))


def measure(program: str, path: Path, workspace: Path, limit: int = 0) -> dict:
    shutil.rmtree(workspace, ignore_errors=True)
    out = subprocess.run(
        [sys.executable, __file__, "--_child", program, str(path), str(workspace), str(limit)],
        check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    shutil.rmtree(workspace, ignore_errors=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 5_000_000])
    parser.add_argument("--baseline-size", type=int, default=200_000)
    parser.add_argument("--workdir", type=Path, default=ROOT / "bench" / "_work")
    parser.add_argument("--_child", nargs=4, metavar=("PROGRAM", "PATH", "WORKSPACE", "LIMIT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        program, path, workspace, limit = args._child
        child(argparse.Namespace(program=program, path=path, workspace=workspace, limit=int(limit)))
        return

    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    baseline_rate: dict[str, float] = {}
    for fmt in ("nt", "tsv"):
        files = generate(args.workdir, args.baseline_size)
        base = measure("baseline", files[fmt], args.workdir / "ws-baseline", args.baseline_size)
        baseline_rate[fmt] = args.baseline_size / base["seconds"]
        rows.append((fmt, "baseline (rdflib/csv + row INSERTs)", args.baseline_size, base, 1.0))
        for n in args.sizes:
            files = generate(args.workdir, n)
            statements = count_lines(files[fmt])
            res = measure("kalmkg", files[fmt], args.workdir / "ws-kalmkg")
            rate = statements / res["seconds"]
            rows.append((fmt, "kalmkg ingest", statements, res, rate / baseline_rate[fmt]))

    header = f"{'format':<7}{'program':<38}{'rows':>11}{'seconds':>9}{'rows/s':>11}{'peak MB':>9}{'vs baseline':>13}"
    print(header)
    print("-" * len(header))
    for fmt, program, n, res, speedup in rows:
        rate = n / res["seconds"]
        print(f"{fmt:<7}{program:<38}{n:>11,}{res['seconds']:>9.2f}{rate:>11,.0f}{res['peak_mb']:>9.0f}{speedup:>12.1f}x")
    print("\nrows = lines of the input (edge triples + label lines / entity text lines); "
          "baseline rows/s is per triple on its slice.")


if __name__ == "__main__":
    main()
