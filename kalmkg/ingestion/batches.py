"""Accumulate rows as column lists and hand them out as Arrow tables for the store's staging tables."""

from __future__ import annotations

from typing import Iterator

from kalmkg.store import STAGING_COLUMNS

BATCH_ROWS = 200_000
# The longest IRI, literal or text line read (oxigraph's own limit for one term): a model reads the first
# few dozen tokens of a text, and a value this long is a broken or hostile file, not a graph.
MAX_VALUE_CHARS = 16 * 2**20


def value_too_long(where: str, what: str, size: int | None = None) -> str:
    """The one error line of a value over MAX_VALUE_CHARS (`size` None: not read to its end)."""
    of = f" of {size:,} characters" if size is not None else ""
    return f"{where}: {what}{of} is over kalmkg's limit of {MAX_VALUE_CHARS:,} characters for one value"

Batch = tuple[str, "object"]  # (staging table name, pyarrow.Table)


class Batcher:
    """Columnar buffers for the three staging tables; `full()` says when to flush."""

    def __init__(self, batch_rows: int = BATCH_ROWS):
        self.batch_rows = batch_rows
        self.columns = {t: [[] for _ in cols] for t, cols in STAGING_COLUMNS.items()}
        self.rows = 0

    def full(self) -> bool:
        return self.rows >= self.batch_rows

    def flush(self) -> Iterator[Batch]:
        import pyarrow as pa

        for table, cols in self.columns.items():
            if cols[0]:
                names = STAGING_COLUMNS[table]
                yield table, pa.table({n: pa.array(c, pa.string() if n != "rank" else pa.int32())
                                       for n, c in zip(names, cols)})
                for c in cols:
                    c.clear()
        self.rows = 0
