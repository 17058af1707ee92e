"""Training the structure model: every train triple and its reciprocal (t, r^-1, h) is a query scored
against every entity (1-N), cross-entropy on the true answer, N3 on the rows used, Adagrad (the recipe
of Lacroix et al., 2018, which makes plain ComplEx one of the strongest link predictors). Validation
after each epoch: filtered MRR, both directions, on a fixed sample of the valid split; the best tables
are kept, and training stops after `patience` epochs without a better one or when its time is up.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from kalmkg.evaluation.metrics import known_answers
from kalmkg.structure import complex as cx
from kalmkg.structure.model import StructureModel, keys_hash


@dataclass(frozen=True)
class StructureSettings:
    """How the structure model trains (the `--structure-*` options of `kalmkg train`)."""

    dim: int = 200  # complex rank: each row is 2 x dim floats
    epochs: int = 100
    reg: float = 0.05  # N3 weight
    minutes: float = 10.0  # time cap (0: none)
    lr: float = 0.1
    batch_size: int = 512
    init: float = 1e-3
    patience: int = 5
    seed: int = 0


def structure_mrr(entities: np.ndarray, relations: np.ndarray, triples: np.ndarray, answers: dict,
                  num_relations: int) -> float:
    """Filtered MRR, both directions, of `triples` under the tables (answers: metrics.known_answers)."""
    if len(triples) == 0:
        return float("nan")
    queries = np.concatenate([triples[:, [0, 1]], np.stack([triples[:, 2], triples[:, 1] + num_relations], 1)])
    targets = np.concatenate([triples[:, 2], triples[:, 0]])
    model = StructureModel(entities, relations, "", "")
    return float((1.0 / model.ranks(queries, targets, answers, num_relations, len(entities))).mean())


def train_structure(train: np.ndarray, valid: np.ndarray, all_triples: np.ndarray, entity_keys, relation_keys,
                    settings: StructureSettings = StructureSettings(),
                    progress: Callable[[int, float], None] | None = None, device: str = "cpu") -> StructureModel:
    """The structure model of a graph: `train` triples [n, 3] learned on `device`, `valid` (a sample)
    choosing the epoch, `all_triples` filtering known answers. `progress(epoch, valid_mrr)` after each
    epoch. The initial tables and the batch order come from a CPU generator: one seed, one model, on
    any device."""
    import torch

    n, r = len(entity_keys), len(relation_keys)
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(settings.seed)
    init = lambda rows: (torch.randn(rows, 2 * settings.dim, generator=gen) * settings.init).to(device)  # noqa: E731
    ent, rel = torch.nn.Parameter(init(n)), torch.nn.Parameter(init(2 * r))
    optimizer = torch.optim.Adagrad([ent, rel], lr=settings.lr)
    queries = torch.as_tensor(np.concatenate([train[:, [0, 1]], np.stack([train[:, 2], train[:, 1] + r], 1)]),
                              dtype=torch.long, device=device)
    answers_of = torch.as_tensor(np.concatenate([train[:, 2], train[:, 0]]), dtype=torch.long, device=device)
    answers = known_answers(all_triples, r)
    best = (-1.0, -1, None)  # (valid MRR, epoch, tables)
    deadline = t0 + 60 * settings.minutes if settings.minutes > 0 else float("inf")
    epoch, why = 0, "epochs"
    for epoch in range(1, settings.epochs + 1):
        order = torch.randperm(len(queries), generator=gen).to(device)
        for start in range(0, len(order), settings.batch_size):
            batch = order[start:start + settings.batch_size]
            q, a = queries[batch], answers_of[batch]
            h, w = ent[q[:, 0]], rel[q[:, 1]]
            loss = torch.nn.functional.cross_entropy(cx.scores(h, w, ent), a)
            loss = loss + settings.reg * (cx.n3(h) + cx.n3(w) + cx.n3(ent[a])) / len(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if time.perf_counter() > deadline:
                break
        tables = (ent.detach().cpu().numpy().copy(), rel.detach().cpu().numpy().copy())
        mrr = structure_mrr(*tables, valid, answers, r) if len(valid) else float("nan")
        if progress:
            progress(epoch, mrr)
        if not np.isfinite(mrr) or mrr > best[0]:
            best = (mrr if np.isfinite(mrr) else -1.0, epoch, tables)
        if time.perf_counter() > deadline:
            why = "time"
            break
        if len(valid) and epoch - best[1] >= settings.patience:
            why = "converged"
            break
    mrr, best_epoch, (entities, relations) = best
    info = {"id": secrets.token_hex(8), "model": "complex", "dim": settings.dim, "reg": settings.reg, "lr": settings.lr,
            "batch_size": settings.batch_size, "epochs": epoch, "best_epoch": best_epoch, "stopped": why,
            "valid_mrr": round(mrr, 4) if mrr >= 0 else None, "valid_triples": int(len(valid)),
            "seconds": round(time.perf_counter() - t0, 2)}
    return StructureModel(entities, relations, keys_hash(entity_keys), keys_hash(relation_keys), info)
