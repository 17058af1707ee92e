"""ComplEx (Trouillon et al., 2016) with the N3 penalty and reciprocal relations (Lacroix et al., 2018):
score(h, r, t) = Re(<e_h, w_r, conj(e_t)>). A vector of 2k floats holds a complex vector of rank k as
[real | imaginary]. Written with slicing and `@` only, so the same functions score numpy arrays
(prediction, no torch) and torch tensors (training, with gradients).
"""

from __future__ import annotations


def query_factors(heads, relations):
    """[B, 2k] h * r as complex vectors: a query's factor, whose product with an entity is its score."""
    k = heads.shape[1] // 2
    hr, hi = heads[:, :k], heads[:, k:]
    rr, ri = relations[:, :k], relations[:, k:]
    return _cat(hr * rr - hi * ri, hr * ri + hi * rr)


def scores(heads, relations, entities):
    """[B, N] Re(<h, r, conj(t)>) of every query (h, r) against every row t of `entities` [N, 2k]."""
    return query_factors(heads, relations) @ entities.T


def n3(x):
    """The N3 penalty of rows of complex vectors: sum of |x|^3 (the moduli's cubes)."""
    k = x.shape[1] // 2
    return ((x[:, :k] ** 2 + x[:, k:] ** 2) ** 1.5).sum()


def _cat(a, b):
    if hasattr(a, "detach"):
        import torch

        return torch.cat([a, b], dim=1)
    import numpy as np

    return np.concatenate([a, b], axis=1)
