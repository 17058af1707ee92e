"""The pictures `kalmkg evaluate` writes beside its JSON: MRR per relation (which relations the model
knows, which it does not) and the histogram of the ranks (how far off the misses are)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kalmkg.files import atomic_path

MAX_RELATIONS = 40  # bars in the per-relation chart: the relations with the most queries


def write_charts(out_dir: Path, split: str, ranks: np.ndarray, relations: list[dict]) -> dict[str, str]:
    """eval-<split>-relations.png and eval-<split>-ranks.png; their paths by name. `relations` is the
    summary's per-relation list (label, count, mrr), most queries first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {}
    shown = relations[:MAX_RELATIONS]
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.28 * max(len(shown), 1)))
    labels = [f"{r['label']} ({r['count']})" for r in shown][::-1]
    ax.barh(labels, [r["mrr"] for r in shown][::-1], color="#2759c4")
    ax.set_xlim(0, 1)
    ax.set_xlabel("MRR (filtered, both directions)")
    more = f", the {MAX_RELATIONS} with the most queries" if len(relations) > MAX_RELATIONS else ""
    ax.set_title(f"{split}: MRR per relation (queries){more}")
    fig.tight_layout()
    paths["relations"] = _save(fig, out_dir / f"eval-{split}-relations.png")

    fig, ax = plt.subplots(figsize=(7, 3.5))
    r = np.asarray(ranks, dtype=np.float64)
    top = max(float(r.max()) if r.size else 1.0, 2.0)
    edges = np.unique(np.concatenate([[1, 2, 3, 4, 6, 11], np.geomspace(11, top + 1, 12)]))
    ax.hist(r, bins=edges, color="#c4462b")
    ax.set_xscale("log")
    ax.set_xlabel("rank of the true entity (1 = first)")
    ax.set_ylabel("queries")
    ax.set_title(f"{split}: ranks of {r.size:,} queries (MRR {float((1 / r).mean()) if r.size else float('nan'):.3f})")
    fig.tight_layout()
    paths["ranks"] = _save(fig, out_dir / f"eval-{split}-ranks.png")
    plt.close("all")
    return paths


def _save(fig, path: Path) -> str:
    with atomic_path(path) as staged:
        fig.savefig(staged, dpi=100, format="png")
    return str(path)
