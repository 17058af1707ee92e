"""Accumulate rows as column lists and hand them out as Arrow tables for the store's staging tables."""

from __future__ import annotations

from typing import Iterator

from kalmkg.store import STAGING_COLUMNS

BATCH_ROWS = 200_000

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
