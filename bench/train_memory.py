"""Peak memory of a short training run as the graph grows: the model and its optimizer should be the
floor, not the graph (issue 16 part 3).

    python bench/train_memory.py                              # 300k, 1M and 3M triples
    python bench/train_memory.py --sizes 300000,10000000      # up to 10M

Synthetic TSV graphs of n triples over n/10 entities and 50 relations (fixed seed; entity names are
their keys). Each size: `kalmkg ingest` (and with `--split`, `kalmkg split`: the run then validates,
which encodes every entity), then `kalmkg train --max-steps 2 --batch-size 8 --no-embed` with
the embedded SmolLM2-135M and the training defaults (the text model: `--structure none`; the structure
model is one row per entity by design), in a fresh process whose peak resident memory
(`os.wait4`'s ru_maxrss) is the figure. The baseline is the smallest size of the same run; the target:
the largest within 1.2x of it. Besides the kernel's peak RSS, which counts the pages of memory-mapped
files the run touched (the model's weights, the graph's arrays), the peak of the anonymous part is
sampled: the process's own memory. Graphs and workspaces are kept in bench/_work/memory/.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / "_work" / "memory"
RELATIONS = 50


def synthetic_graph(n: int, path: Path, seed: int = 0) -> Path:
    """n (head, relation, tail) lines over n // 10 entities, written in chunks (no n-sized strings)."""
    if path.is_file():
        return path
    rng = np.random.default_rng(seed)
    entities = max(n // 10, 2)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as out:
        for start in range(0, n, 1_000_000):
            m = min(1_000_000, n - start)
            h, r, t = rng.integers(0, entities, m), rng.integers(0, RELATIONS, m), rng.integers(0, entities, m)
            out.writelines(f"e{a}\tr{b}\te{c}\n" for a, b, c in zip(h.tolist(), r.tolist(), t.tolist()))
    tmp.replace(path)
    return path


def peak_mb(cmd: list[str]) -> tuple[float, float, float, int]:
    """(peak RSS in MB, peak anonymous RSS in MB, wall seconds, exit code) of a command in a child process.

    The peak RSS is the kernel's (`os.wait4`'s ru_maxrss): it counts the pages of memory-mapped files the
    process touched, which the kernel may drop at any time. The anonymous part (the process's own heap:
    what cannot be dropped) is sampled from /proc every 50 ms."""
    t0 = time.perf_counter()
    anon = 0
    with tempfile.TemporaryFile() as err:  # a file, not a pipe: a chatty child cannot block on a full pipe
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            anon = max(anon, _anon_kb(proc.pid))
            time.sleep(0.05)
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        if code:
            err.seek(0)
            sys.stderr.write(err.read().decode(errors="replace")[-2000:])
    return usage.ru_maxrss / 1024, anon / 1024, time.perf_counter() - t0, code


def _anon_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next((int(line.split()[1]) for line in fh if line.startswith("RssAnon:")), 0)
    except OSError:
        return 0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="300000,1000000,3000000", help="triples per graph, comma-separated")
    p.add_argument("--split", action="store_true",
                   help="split 5 %% valid / 5 %% test first, so the run validates (it encodes every entity)")
    p.add_argument("--train-args", default="", help="more options for `kalmkg train`, e.g. '--frozen-cache-mb 256'")
    args = p.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    WORK.mkdir(parents=True, exist_ok=True)
    kalmkg = [sys.executable, "-m", "kalmkg"]
    rows = []
    for n in sizes:
        graph = synthetic_graph(n, WORK / f"graph-{n}.tsv")
        ws = WORK / f"ws-{n}{'-split' if args.split else ''}"
        if not (ws / "kg.duckdb").exists():
            mb, _, seconds, rc = peak_mb([*kalmkg, "-w", str(ws), "ingest", str(graph)])
            if rc:
                raise SystemExit(f"ingest of {n:,} triples failed")
            print(f"ingest {n:,}: {seconds:.0f} s, peak {mb:,.0f} MB", file=sys.stderr)
            if args.split and peak_mb([*kalmkg, "-w", str(ws), "split"])[3]:
                raise SystemExit(f"split of {n:,} triples failed")
        mb, anon, seconds, rc = peak_mb([*kalmkg, "-w", str(ws), "train", "--max-steps", "2", "--batch-size", "8",
                                         "--no-embed", "--structure", "none", *args.train_args.split()])
        rows.append((n, mb, anon, seconds, rc))
        print(f"train {n:,}: {seconds:.0f} s, peak {mb:,.0f} MB ({anon:,.0f} anonymous)", file=sys.stderr, flush=True)
    floor, anon_floor = rows[0][1], rows[0][2]
    print("\n| triples | entities | peak RSS (MB) | vs the smallest | peak anonymous RSS (MB) | vs the smallest | "
          "wall s (ingest not counted) |")
    print("|---|---|---|---|---|---|---|")
    for n, mb, anon, seconds, rc in rows:
        print(f"| {n:,} | {max(n // 10, 2):,} | {mb:,.0f}{'' if rc == 0 else ' (failed)'} | {mb / floor:.2f}x | "
              f"{anon:,.0f} | {anon / anon_floor:.2f}x | {seconds:.0f} |")


if __name__ == "__main__":
    main()
