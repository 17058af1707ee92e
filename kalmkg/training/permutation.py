"""A random permutation of 0..n-1 that is computed, not stored: position i -> its element, for any set
of positions at once, in memory proportional to the positions asked for. An epoch over 20M examples
needs no 160 MB index array (pure; numpy only).

A balanced Feistel network over the smallest 2^(2k) >= n, keyed by the seed: a bijection of
[0, 2^(2k)) for any round function; elements >= n walk the cycle (apply again) until they fall inside
[0, n), which keeps it a bijection of [0, n) (the domain is < 4n, so few walks are needed).
"""

from __future__ import annotations

import numpy as np

ROUNDS = 8
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


class Permutation:
    """`perm[positions]` is the permuted order at those positions; the same (n, seed) gives the same order."""

    def __init__(self, n: int, seed):
        self.n = int(n)
        bits = max(1, (max(self.n - 1, 1).bit_length() + 1) // 2)  # half of the domain's bits
        self._half, self._low = np.uint64(bits), np.uint64((1 << bits) - 1)
        self._keys = np.random.default_rng(seed).integers(0, 1 << 63, ROUNDS, dtype=np.uint64)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, positions) -> np.ndarray:
        if isinstance(positions, slice):
            positions = np.arange(*positions.indices(self.n))
        x = np.asarray(positions, dtype=np.int64)
        if x.size and (x.min() < 0 or x.max() >= self.n):
            raise IndexError(f"positions outside 0..{self.n - 1}")
        out = self._round_trip(x.astype(np.uint64))
        outside = out >= self.n
        while outside.any():  # cycle walking: a value of the larger domain, mapped again
            out[outside] = self._round_trip(out[outside])
            outside = out >= self.n
        return out.astype(np.int64)

    def _round_trip(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> self._half, x & self._low
        for key in self._keys:
            left, right = right, left ^ (_mix(right, key) & self._low)
        return (left << self._half) | right


def _mix(x: np.ndarray, key: np.uint64) -> np.ndarray:
    """A 64-bit hash of x under key (splitmix64's finalizer): the Feistel round function."""
    with np.errstate(over="ignore"):
        z = (x + key) & _MASK64
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))
