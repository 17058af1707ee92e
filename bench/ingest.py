"""Ingest throughput and peak memory: kalmkg vs a plain baseline, measured in the same run.

    python bench/ingest.py                      # 1M and 5M triples (N-Triples, TSV, Turtle)
    python bench/ingest.py --formats ttl        # Turtle only: rdflib's parse vs kalmkg, and compressed input
    python bench/ingest.py --sizes 200000 --baseline-size 50000   # a quick look

Synthetic graphs: n edge triples over n/10 entities and 50 relations, plus one rdfs:label per entity
(N-Triples, Turtle) or an entities.tsv text file (TSV). The Turtle file writes each subject once with
its predicate-object lists (`;`, `,`), as Turtle is written. Baselines:
- N-Triples and TSV: what one writes first, rdflib `Graph.parse` (or a csv loop for TSV) and one INSERT
  per triple into DuckDB, on a slice (`--baseline-size`) because it is too slow for the full file;
  throughput is compared per triple.
- Turtle: rdflib's `Graph.parse` alone on the whole file of the first size (nothing stored), against
  kalmkg's whole ingest (parse, staging, merge into DuckDB); and kalmkg on the same Turtle compressed
  with gzip, bzip2 and xz against the uncompressed file.
Each measurement runs in a fresh process so that its peak RSS is its own.
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


def generate_turtle(workdir: Path, n: int, seed: int = 0) -> Path:
    """The graph of `generate(n)` as Turtle, subjects grouped (cached by size)."""
    ttl = workdir / f"graph-{n}.ttl"
    if ttl.exists():
        return ttl
    rng = np.random.default_rng(seed)
    n_entities = max(n // 10, 10)
    h, r, t = rng.integers(0, n_entities, n), rng.integers(0, 50, n), rng.integers(0, n_entities, n)
    order = np.lexsort((t, r, h))
    h, r, t = h[order], r[order], t[order]
    starts = np.flatnonzero(np.r_[True, h[1:] != h[:-1]])
    ends = np.r_[starts[1:], n]
    with open(ttl, "w") as out:
        out.write("@prefix e: <http://example.org/e/> .\n@prefix r: <http://example.org/r/> .\n"
                  "@prefix rdfs: <http://www.w3.org/2000/01/rdf-schema#> .\n\n")
        lines = []
        for a, b in zip(starts.tolist(), ends.tolist()):
            body = " ;\n    ".join(f"r:rel{rr} e:{tt}" for rr, tt in zip(r[a:b].tolist(), t[a:b].tolist()))
            lines.append(f"e:{h[a]} {body} .\n")
            if len(lines) >= 100_000:
                out.write("".join(lines))
                lines.clear()
        out.write("".join(lines))
        for start in range(0, n_entities, 500_000):
            out.write("".join(f'e:{i} rdfs:label "entity number {i}"@en .\n'
                              for i in range(start, min(start + 500_000, n_entities))))
    return ttl


def compressed(path: Path, kind: str) -> Path:
    """`path` compressed with gzip, bzip2 or xz (cached)."""
    import bz2
    import gzip
    import lzma

    out = path.with_name(path.name + "." + kind)
    if not out.exists():
        opener = {"gz": lambda f: gzip.open(f, "wb", compresslevel=6), "bz2": lambda f: bz2.open(f, "wb"),
                  "xz": lambda f: lzma.open(f, "wb", preset=1)}[kind]
        with open(path, "rb") as src, opener(out) as dst:
            shutil.copyfileobj(src, dst, 1 << 22)
    return out


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


def run_kalmkg_read(path: Path) -> None:
    """kalmkg's reading stage alone: parse and route into staging batches, nothing stored."""
    from kalmkg.ingestion import resolve_sources
    from kalmkg.ingestion.rdf import read_rdf

    f = resolve_sources([path])[0].files[0]
    sum(batch.num_rows for _, batch in read_rdf(f.path, f.format, "bench", None, f.compression))


def run_baseline(path: Path, workspace: Path, limit: int) -> None:
    import duckdb

    workspace.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".ttl":  # rdflib's parse alone, the whole file
        import rdflib

        rdflib.Graph().parse(str(path), format="turtle")
        return
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
    elif args.program == "kalmkg-read":
        run_kalmkg_read(Path(args.path))
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
    parser.add_argument("--formats", nargs="+", choices=("nt", "tsv", "ttl"), default=["nt", "tsv", "ttl"])
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
    for fmt in [f for f in args.formats if f != "ttl"]:
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
    if "ttl" in args.formats:
        first = generate_turtle(args.workdir, args.sizes[0])
        triples = args.sizes[0] + max(args.sizes[0] // 10, 10)  # edges + labels
        base = measure("baseline", first, args.workdir / "ws-baseline")
        rows.append(("ttl", "baseline: rdflib Graph.parse alone", triples, base, 1.0))
        read = measure("kalmkg-read", first, args.workdir / "ws-kalmkg")
        rows.append(("ttl", "kalmkg reading alone (parse + batches)", triples, read, base["seconds"] / read["seconds"]))
        plain = None
        for n in args.sizes:
            res = measure("kalmkg", generate_turtle(args.workdir, n), args.workdir / "ws-kalmkg")
            m = n + max(n // 10, 10)
            plain = plain or res
            rows.append(("ttl", "kalmkg ingest", m, res, (m / res["seconds"]) / (triples / base["seconds"])))
        for kind in ("gz", "bz2", "xz"):
            res = measure("kalmkg", compressed(first, kind), args.workdir / "ws-kalmkg")
            rows.append((f"ttl.{kind}", f"kalmkg ingest ({res['seconds'] / plain['seconds']:.2f}x uncompressed time)",
                         triples, res, (triples / res["seconds"]) / (triples / base["seconds"])))

    header = f"{'format':<8}{'program':<48}{'rows':>11}{'seconds':>9}{'rows/s':>11}{'peak MB':>9}{'vs baseline':>13}"
    print(header)
    print("-" * len(header))
    for fmt, program, n, res, speedup in rows:
        rate = n / res["seconds"]
        print(f"{fmt:<8}{program:<48}{n:>11,}{res['seconds']:>9.2f}{rate:>11,.0f}{res['peak_mb']:>9.0f}{speedup:>12.1f}x")
    print("\nrows = lines of the input (edge triples + label lines / entity text lines), for Turtle its "
          "triples; N-Triples/TSV baseline rows/s is per triple on its slice; Turtle's baseline is rdflib's parse "
          "of the first size, nothing stored.")


if __name__ == "__main__":
    main()
