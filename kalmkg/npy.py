"""Arrays too large for memory: written in pieces as numpy `.npy` files and read memory-mapped.

A run over a graph of millions of triples keeps its examples and known answers on disk: the writer
appends rows with plain file writes (the page cache holds them, not the process), and a reader maps
the file, so a step touches the pages of its own rows only. The format is numpy's own (`np.load`
reads the files), with the header written again once the row count is known.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

# room for the header: numpy's dict with a shape of any realistic size, padded to 64-byte alignment
_HEADER_BYTES = 128


class NpyWriter:
    """Rows appended to a `.npy` file of `dtype` and row shape `row_shape` (() for a vector); use as a
    context manager. A writer that fails leaves no file behind."""

    def __init__(self, path: Path, dtype, row_shape: tuple[int, ...] = ()):
        self.path, self.dtype, self.row_shape = Path(path), np.dtype(dtype), tuple(row_shape)
        self.rows = 0
        self._fh = None

    def __enter__(self) -> "NpyWriter":
        self._fh = open(self.path, "wb")
        self._fh.write(b"\0" * _HEADER_BYTES)
        return self

    def write(self, rows) -> None:
        rows = np.ascontiguousarray(rows, dtype=self.dtype)
        if rows.shape[1:] != self.row_shape:
            raise ValueError(f"rows of shape {rows.shape[1:]} given to a writer of rows {self.row_shape}")
        self._fh.write(rows.tobytes())
        self.rows += len(rows)

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self._fh.seek(0)
                self._fh.write(_header(self.dtype, (self.rows, *self.row_shape)))
        finally:
            self._fh.close()
            if exc_type is not None:
                self.path.unlink(missing_ok=True)


def _header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """numpy's format 1.0 header for a C-ordered array, padded with spaces to exactly _HEADER_BYTES."""
    text = repr({"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": shape})
    prefix = b"\x93NUMPY\x01\x00"
    room = _HEADER_BYTES - len(prefix) - 2
    body = text.encode("latin1").ljust(room - 1) + b"\n"
    if len(body) != room:
        raise ValueError(f"an array of shape {shape} has too long a header")
    return prefix + len(body).to_bytes(2, "little") + body


def write_npy(path: Path, array) -> None:
    """An in-memory array as a `.npy` file `open_npy` maps."""
    array = np.asarray(array)
    with NpyWriter(path, array.dtype, array.shape[1:]) as out:
        out.write(array)


def open_npy(path: Path) -> np.ndarray:
    """The array of a `.npy` file, memory-mapped read-only (an empty one as a plain array: numpy cannot
    map zero bytes)."""
    array = np.load(path, mmap_mode="r", allow_pickle=False)
    return np.array(array) if array.size == 0 else array


class RowFile:
    """Fixed-width float32 rows in a scratch file, written at any row and read back in slices with plain
    reads (`rows[a:b]`): vectors of millions of entities that the page cache holds, not the process."""

    def __init__(self, path: Path, rows: int, width: int):
        self.path, self.rows, self.width = Path(path), int(rows), int(width)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        os.ftruncate(self._fd, self.rows * self.width * 4)

    def write(self, at, vectors) -> None:
        """Row at[i] := vectors[i]; a run of consecutive rows is written at once."""
        at = np.asarray(at, dtype=np.int64)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(at), self.width)
        order = np.argsort(at, kind="stable")
        at, vectors = at[order], vectors[order]
        breaks = np.flatnonzero(np.diff(at) != 1) + 1
        for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, len(at)]):
            if hi > lo:
                os.pwrite(self._fd, vectors[lo:hi].tobytes(), int(at[lo]) * self.width * 4)

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, rows: slice) -> np.ndarray:
        lo, hi, _ = rows.indices(self.rows)
        hi = max(lo, hi)
        out = np.empty((hi - lo, self.width), dtype=np.float32)
        if out.size and os.preadv(self._fd, [memoryview(out).cast("B")], lo * self.width * 4) != out.nbytes:
            raise OSError(f"{self.path} is shorter than its {self.rows} rows")
        return out

    def close(self) -> None:
        os.close(self._fd)
        self.path.unlink(missing_ok=True)
