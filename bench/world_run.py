"""A cached workspace for the ask and generation benchmarks: the sample graph, a short KaLM run of the
embedded SmolLM2-135M, and its Q8_0 and Q4_K_M exports (bench/_work/world-<steps>-<lm>/).

Built through the CLI, as a user would: ingest, split, train, export. A second call reuses it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_graphs" / "world.ttl"
QUANTS = ("Q8_0", "Q4_K_M")


def kalmkg(ws: Path, *args: str) -> None:
    cmd = [sys.executable, "-m", "kalmkg", "-w", str(ws), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{out.stderr}")


def prepare(steps: int = 120, lm_weight: float = 0.01, lm_examples: int = 4, extra: tuple[str, ...] = ()) -> Path:
    """The workspace folder (built once); the run is named `world`. `extra`: more `kalmkg train` options
    (e.g. --reading-weight 1), named in the folder."""
    slug = "".join(f"-{a.lstrip('-')}" for a in extra)
    root = ROOT / "bench" / "_work" / f"world-{steps}-lm{lm_weight:g}x{lm_examples}{slug}"
    if (root / "models" / f"world-{QUANTS[-1]}.json").is_file():
        return root
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    kalmkg(tmp, "ingest", str(SAMPLE))
    kalmkg(tmp, "split", "--valid", "0.1", "--test", "0.1", "--seed", "0")
    kalmkg(tmp, "train", "--max-steps", str(steps), "--batch-size", "16", "--lr", "1e-3", "--max-entity-tokens", "16",
           "--lora-layers", "8", "--self-negatives", "--lm-weight", str(lm_weight), "--lm-examples", str(lm_examples),
           "--eval-every", str(max(steps // 2, 1)), "--eval-limit", "30", "--run-name", "world", "--no-embed", *extra)
    for quant in QUANTS:
        kalmkg(tmp, "export", "--run", "world", "--quant", quant, "--name", f"world-{quant}")
    shutil.rmtree(root, ignore_errors=True)
    os.replace(tmp, root)
    print(f"prepared {root} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return root
