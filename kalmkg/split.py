"""A deterministic transductive split: valid/test triples only use entities and relations seen in train."""

from __future__ import annotations

import numpy as np

from kalmkg.errors import KalmkgError
from kalmkg.store import SPLITS

TRAIN, VALID, TEST = 0, 1, 2


def transductive_split(head: np.ndarray, relation: np.ndarray, tail: np.ndarray,
                       n_valid: int, n_test: int, seed: int) -> np.ndarray:
    """Return a split code (TRAIN/VALID/TEST) per triple.

    Triples are visited in a seeded random order; one is held out only while its head, tail and
    relation keep at least one other training triple, so every held-out triple is answerable by a
    model that saw only train. The result depends on the input order, so callers pass triples in a
    canonical order (by key). Fewer than asked are held out when the graph is too sparse.
    """
    n = len(head)
    codes = np.full(n, TRAIN, dtype=np.int8)
    n_entities = int(max(head.max(initial=-1), tail.max(initial=-1))) + 1
    entity_degree = np.bincount(head, minlength=n_entities) + np.bincount(tail, minlength=n_entities)
    relation_count = np.bincount(relation, minlength=int(relation.max(initial=-1)) + 1)
    order = np.random.default_rng(seed).permutation(n)
    wanted = [(VALID, n_valid), (TEST, n_test)]
    which, remaining = wanted[0]
    # Python ints in the loop: numpy scalar indexing per element is several times slower.
    deg = entity_degree.tolist()
    rel = relation_count.tolist()
    h_list, r_list, t_list = head.tolist(), relation.tolist(), tail.tolist()
    for i in order.tolist():
        while remaining == 0 and wanted:
            wanted.pop(0)
            if not wanted:
                return codes
            which, remaining = wanted[0]
        h, r, t = h_list[i], r_list[i], t_list[i]
        need = 2 if h == t else 1  # a self-loop counts twice in its entity's degree
        if rel[r] > 1 and deg[h] > need and (h == t or deg[t] > 1):
            rel[r] -= 1
            deg[h] -= 1
            deg[t] -= 1
            codes[i] = which
            remaining -= 1
    return codes


def split_store(store, valid: float, test: float, seed: int, force: bool = False) -> dict[str, int]:
    """Re-split every triple of the store; refuses to overwrite a given split unless `force`."""
    import pyarrow as pa

    table = store.triples_by_key()
    n = table.num_rows
    if n == 0:
        raise KalmkgError("the graph has no triples to split")
    held_out = sum(1 for s in table["split"].to_pylist() if s != "train")
    if held_out and not force:
        raise KalmkgError(f"the graph already has {held_out:,} valid/test triples; pass --force to re-split")
    codes = transductive_split(
        table["head"].to_numpy(), table["relation"].to_numpy(), table["tail"].to_numpy(),
        round(n * valid), round(n * test), seed,
    )
    names = np.array(SPLITS, dtype=object)[codes]
    with store.transaction():
        store.assign_splits(pa.table({"head": table["head"], "relation": table["relation"],
                                      "tail": table["tail"], "split": pa.array(names, pa.string())}))
    return {s: int((codes == i).sum()) for i, s in enumerate(SPLITS)}
