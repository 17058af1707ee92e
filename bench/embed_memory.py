"""Peak memory of writing the entity index as the graph grows: LanceDB's table and its ANN index for
1M entities should cost about what 100k cost (issue 16 part 3).

    python bench/embed_memory.py                                  # 100k and 1M entities
    python bench/embed_memory.py --sizes 1000000,10000000         # graphs of that many triples

The graphs and workspaces of bench/train_memory.py (n triples, n/10 entities; made here when missing).
Each size: `kalmkg.index.embed` of the untrained embedded base, in a fresh process, with every entity
encoded (`full`) by a stand-in encoder: a seeded hash of each text to a unit vector of the model's width
(576). The encoder is not what is measured: a CPU takes hours to run the model over a million entities,
and its memory does not grow with the graph; what is measured is everything around it (the keys, texts
and hashes, the table writer, the ANN index, the metadata). The figures: the kernel's peak RSS and the
peak of the anonymous part, as in train_memory.py; the baseline is the smallest size of the same run.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from train_memory import WORK, peak_mb, synthetic_graph  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DIM = 576


class HashEncoder:
    """Unit vectors from a hash of each text: the same text, the same vector, at numpy speed."""

    dim = DIM

    def encode(self, texts: list[str], batch_size: int = 64) -> np.ndarray:
        seeds = [int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8).digest(), "little") for t in texts]
        out = np.stack([np.random.default_rng(s).standard_normal(DIM, dtype=np.float32) for s in seeds]) \
            if seeds else np.zeros((0, DIM), dtype=np.float32)
        return out / np.linalg.norm(out, axis=1, keepdims=True)


def child(workspace: Path) -> None:
    """The measured process: embed every entity of `workspace` with the stand-in encoder."""
    from kalmkg.index import embed
    from kalmkg.loaded import load_model
    from kalmkg.workspace import Workspace

    ws = Workspace(workspace)
    loaded = load_model(ws, base="smollm2-135m")
    t0 = time.perf_counter()
    result = embed(ws, loaded, HashEncoder(), full=True)
    print(f"{result.total} entities, ann {result.ann}, {time.perf_counter() - t0:.0f} s", file=sys.stderr)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", default="1000000,10000000", help="triples per graph (n/10 entities), comma-separated")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(Path(args.child))
    sizes = sorted(int(s) for s in args.sizes.split(","))
    WORK.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in sizes:
        graph = synthetic_graph(n, WORK / f"graph-{n}.tsv")
        ws = WORK / f"ws-{n}"
        if not (ws / "kg.duckdb").exists() and peak_mb([sys.executable, "-m", "kalmkg", "-w", str(ws), "ingest",
                                                         str(graph)])[3]:
            raise SystemExit(f"ingest of {n:,} triples failed")
        mb, anon, seconds, rc = peak_mb([sys.executable, str(Path(__file__).resolve()), "--child", str(ws)])
        rows.append((n, mb, anon, seconds, rc))
        print(f"embed {n // 10:,} entities: {seconds:.0f} s, peak {mb:,.0f} MB ({anon:,.0f} anonymous)",
              file=sys.stderr, flush=True)
    floor, anon_floor = rows[0][1], rows[0][2]
    print("\n| entities | peak RSS (MB) | vs the smallest | peak anonymous RSS (MB) | vs the smallest | wall s |")
    print("|---|---|---|---|---|---|")
    for n, mb, anon, seconds, rc in rows:
        print(f"| {n // 10:,} | {mb:,.0f}{'' if rc == 0 else ' (failed)'} | {mb / floor:.2f}x | {anon:,.0f} | "
              f"{anon / anon_floor:.2f}x | {seconds:.0f} |")


if __name__ == "__main__":
    main()
