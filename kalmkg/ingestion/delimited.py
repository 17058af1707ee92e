"""TSV/CSV readers: `head<TAB>relation<TAB>tail` triple files and `id<TAB>text` text files.

Triple files stream through Arrow's multi-threaded CSV reader in large blocks; the rare error path
re-reads the file line by line to name the offending line.
"""

from __future__ import annotations

import io
from typing import Callable, Iterator

from kalmkg.errors import KalmkgError
from kalmkg.ingestion.batches import BATCH_ROWS, MAX_VALUE_CHARS, Batch, value_too_long
from kalmkg.ingestion.sources import SourceFile, open_source

_HEADERS = ({"head", "relation", "tail"}, {"subject", "predicate", "object"}, {"h", "r", "t"})


# Arrow's CSV block: a row must fit in one. An ASCII row at MAX_VALUE_CHARS does; a longer row in bytes
# (multibyte text) is refused as `_raise_bad_line` says.
BLOCK_BYTES = MAX_VALUE_CHARS + (1 << 20)


def _delimiter(f: SourceFile) -> str:
    return "," if f.format == "csv" else "\t"


def _split_line(line: str, delimiter: str) -> list[str]:
    """TSV has no quoting; CSV fields may be quoted."""
    if delimiter == "\t":
        return line.split(delimiter)
    import csv

    return next(csv.reader([line]), [])


def _lines(f: SourceFile):
    """The file's text, decompressed when it is compressed."""
    return io.TextIOWrapper(io.BufferedReader(open_source(f.path, f.compression), 1 << 20), encoding="utf-8")


def _numbered_lines(f: SourceFile) -> Iterator[tuple[int, str]]:
    """(line number, line without its end) of the file; a line over MAX_VALUE_CHARS is an error, found
    without reading it whole (a 10 GB line must not fill memory first)."""
    with _lines(f) as fh:
        lineno = 0
        while True:
            line = fh.readline(MAX_VALUE_CHARS + 1)
            if not line:
                return
            lineno += 1
            if len(line) > MAX_VALUE_CHARS and not line.endswith("\n"):
                raise KalmkgError(value_too_long(f"{f.path}:{lineno}", "a line"))
            yield lineno, line.rstrip("\r\n")


def _has_header(f: SourceFile, delimiter: str) -> bool:
    with _lines(f) as fh:
        first = _split_line(fh.readline(MAX_VALUE_CHARS + 1).rstrip("\r\n"), delimiter)
    return {c.strip().lower() for c in first} in _HEADERS and len(first) == 3


def read_triples(f: SourceFile, on_bytes: Callable[[int], None] | None = None) -> Iterator[Batch]:
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as csv

    delimiter = _delimiter(f)
    names = ["h", "r", "t"]
    read = csv.ReadOptions(column_names=names, block_size=BLOCK_BYTES,
                           skip_rows=1 if _has_header(f, delimiter) else 0)
    parse = csv.ParseOptions(delimiter=delimiter, quote_char='"' if f.format == "csv" else False)
    convert = csv.ConvertOptions(column_types={n: pa.string() for n in names}, strings_can_be_null=False,
                                 quoted_strings_can_be_null=False)
    stream = open_source(f.path, f.compression, on_bytes)
    try:
        reader = csv.open_csv(stream, read_options=read, parse_options=parse, convert_options=convert)
        split = pa.scalar(f.split)
        while True:
            try:
                record_batch = reader.read_next_batch()
            except StopIteration:
                break
            table = pa.Table.from_batches([record_batch])
            empty = pc.or_(pc.or_(pc.equal(table["h"], ""), pc.equal(table["r"], "")), pc.equal(table["t"], ""))
            longest = max(pc.max(pc.utf8_length(table[n])).as_py() or 0 for n in names)
            if pc.any(empty).as_py() or longest > MAX_VALUE_CHARS:
                _raise_bad_line(f, delimiter)
            yield "stage_edges", table.append_column("split", pa.repeat(split, table.num_rows))
    except pa.ArrowInvalid:
        _raise_bad_line(f, delimiter)
        raise
    finally:
        stream.close()


def _raise_bad_line(f: SourceFile, delimiter: str) -> None:
    """Find the first malformed triple line and raise an error naming it."""
    sep = "tab" if delimiter == "\t" else "comma"
    path = f.path
    for lineno, line in _numbered_lines(f):
        if not line:
            continue
        parts = _split_line(line, delimiter)
        if len(parts) != 3:
            raise KalmkgError(
                f"{path}:{lineno}: expected 3 {sep}-separated columns (head, relation, tail), found {len(parts)}"
            )
        if not all(parts):
            raise KalmkgError(f"{path}:{lineno}: empty head, relation or tail")
    raise KalmkgError(f"{path}: malformed {sep}-separated file (or a line longer than {BLOCK_BYTES:,} bytes)")


def _text_rows(f: SourceFile) -> Iterator[tuple[str, ...]]:
    delimiter = _delimiter(f)
    for lineno, line in _numbered_lines(f):
        if not line.strip():
            continue
        parts = line.split(delimiter)
        if len(parts) not in (2, 3) or (f.role == "long" and len(parts) != 2) or not parts[0]:
            expected = "2 columns (id, description)" if f.role == "long" else \
                "2 columns (id, text) or 3 (id, label, description)"
            raise KalmkgError(f"{f.path}:{lineno}: expected {expected}, found {len(parts)}")
        yield tuple(p.strip() for p in parts)


def read_texts(f: SourceFile, batch_rows: int = BATCH_ROWS) -> Iterator[Batch]:
    """`id<TAB>text` (a label, or "name, description"), `id<TAB>label<TAB>description`, or for a
    `*long*` file `id<TAB>description`. Streams in batches, so memory does not grow with the file."""
    import pyarrow as pa

    # KG-BERT style entity text is "name, description" (WN18RR); a plain label list has commas in
    # only a few names ("Washington, D.C."), so split only when nearly every line has one.
    split_text = False
    if f.role == "text" and f.target == "entity":
        two = with_comma = 0
        for r in _text_rows(f):
            if len(r) == 2:
                two += 1
                with_comma += ", " in r[1]
        split_text = two > 0 and with_comma >= 0.9 * two

    cols: dict[str, list] = {"key": [], "field": [], "rank": [], "value": []}

    def add(key: str, field: str, rank: int, value: str) -> None:
        if value:
            cols["key"].append(key)
            cols["field"].append(field)
            cols["rank"].append(rank)
            cols["value"].append(value)

    def flush() -> Batch:
        n = len(cols["key"])
        table = pa.table({
            "key": pa.array(cols["key"], pa.string()), "target": pa.array([f.target] * n, pa.string()),
            "field": pa.array(cols["field"], pa.string()), "rank": pa.array(cols["rank"], pa.int32()),
            "lang": pa.array([""] * n, pa.string()), "value": pa.array(cols["value"], pa.string()),
        })
        for c in cols.values():
            c.clear()
        return "stage_texts", table

    for r in _text_rows(f):
        if f.role == "long":
            add(r[0], "description", 0, r[1])
        elif len(r) == 3:
            add(r[0], "label", 0, r[1])
            add(r[0], "description", 0, r[2])
        elif split_text and ", " in r[1]:
            name, desc = r[1].split(", ", 1)
            add(r[0], "label", 0, name)
            add(r[0], "description", 1, desc)
        else:
            add(r[0], "label", 0, r[1])
        if len(cols["key"]) >= batch_rows:
            yield flush()
    if cols["key"]:
        yield flush()
