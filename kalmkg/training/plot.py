"""The run's training.png: loss terms and validation MRR against steps, from metrics.jsonl; drawn again at
every validation, so a running run's picture is never older than its last validation."""

from __future__ import annotations

import os
from pathlib import Path

from kalmkg.runs import read_metrics


def plot_metrics(run_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)  # a line cut by a killed process is left out
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if isinstance(r.get("valid"), dict)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("loss", "l_exp", "l_imp", "l_qa"):
        pts = [(r["step"], r[key]) for r in steps if r.get(key) is not None]
        if pts:
            ax1.plot(*zip(*pts), label=key)
    ax1.set_xlabel("step")
    ax1.set_title("training loss")
    ax1.legend()
    if evals:
        ax2.plot([r["step"] for r in evals], [r["valid"]["mrr"] for r in evals], marker="o", label="MRR")
        ax2.plot([r["step"] for r in evals], [r["valid"]["hits@10"] for r in evals], marker="o", label="Hits@10")
        ax2.legend()
    ax2.set_xlabel("step")
    ax2.set_title("validation (filtered)")
    fig.tight_layout()
    tmp = run_dir / ".training.png.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, run_dir / "training.png")
