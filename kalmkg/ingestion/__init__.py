"""`kalmkg ingest`: read files into the store, all of them or none.

Every source is read into staging tables as string keys, then merged into the id-based tables in
one transaction for the whole command, so a bad file in the middle of several leaves the store as
it was. A source whose content was ingested before is skipped (re-ingest adds nothing).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from kalmkg.errors import KalmkgError
from kalmkg.ingestion.sources import (
    PENDING_TAG,
    RDF_FORMATS,
    ContentCheck,
    Source,
    blank_prefix,
    file_fingerprint,
    fingerprint,
    resolve_source,
    source_digest,
    streams_once,
)
from kalmkg.store import MergeCounts, Store

__all__ = ["IngestResult", "IngestProgress", "ingest", "resolve_sources"]


@dataclass
class IngestResult:
    source: str
    format: str
    skipped: bool  # same content ingested before
    counts: MergeCounts = field(default_factory=MergeCounts)
    empty: bool = False  # valid RDF that states no triple (only prefixes, a base, comments): nothing to ingest
    rows_read: int = 0
    seconds: float = 0.0


class IngestProgress:
    """Callbacks the CLI implements to draw progress; the default does nothing."""

    def start(self, source: Source, stage: str) -> None: ...
    def advance(self, nbytes: int = 0, rows: int = 0) -> None: ...
    def done(self, result: IngestResult) -> None: ...


def resolve_sources(paths: Iterable[Path], fmt: str | None = None, split: str = "train") -> list[Source]:
    """Classify every path up front so a typo in the last one fails before any work."""
    return [resolve_source(Path(p), fmt, split) for p in paths]


def ingest(store: Store, sources: list[Source], *, lang: str = "en",
           progress: IngestProgress | None = None) -> list[IngestResult]:
    """Ingest every source, all or nothing; raises KalmkgError (and changes nothing) on bad input.

    Phase 1 reads every source into staging tables, so a bad file fails before anything is
    written; phase 2 merges them in one transaction.
    """
    progress = progress or IngestProgress()
    results: list[IngestResult] = []
    staged: list[tuple[int, Source, IngestResult, float]] = []
    compressed: list[Source] = []  # read once each: their files' hashes are remembered with the content's
    seen: set[str] = set()
    store.reset_staging()
    for src, source in enumerate(sources):
        started = time.time()
        progress.start(source, "checking")
        # a compressed file oxigraph parses is hashed and checked as it is parsed (decompressed once); its
        # compressed bytes are what is known before (sources.py)
        check = ContentCheck(source.files[0].path) if streams_once(source) else None
        (fingerprint if check is None else file_fingerprint)(source, on_bytes=lambda n: progress.advance(nbytes=n))
        result = IngestResult(source.name, source.format, skipped=True)
        results.append(result)
        known = source.file_sha256 or source.sha256
        if known in seen or store.source_ingested(known):
            progress.done(result)
            continue
        seen.add(known)
        progress.start(source, "reading")
        for table, batch in _read(source, lambda n: progress.advance(nbytes=n), check):
            store.stage(table, src, batch)
            result.rows_read += batch.num_rows
            progress.advance(rows=batch.num_rows)
        if check is not None:
            source.sha256 = source_digest(source, [check.finish()])
            compressed.append(source)
            if source.sha256 in seen or store.source_ingested(source.sha256):  # another compression of it
                store.unstage(src)
                result.rows_read = 0
                progress.done(result)
                continue
            seen.add(source.sha256)
            store.rename_staged_blank_nodes(src, blank_prefix(PENDING_TAG), blank_prefix(source.tag))
        if result.rows_read == 0:
            if source.format in RDF_FORMATS.values():  # valid RDF with nothing in it: said, not refused
                result.empty, result.skipped = True, False
                progress.done(result)
                continue
            raise KalmkgError(f"{source.name}: no triples found")
        result.skipped = False
        result.seconds = time.time() - started
        staged.append((src, source, result, started))
    with store.transaction():
        for src, source, result, started in staged:
            progress.start(source, "merging")
            merge_started = time.time()
            ingest_id = store.next_ingest_id()
            result.counts = store.merge_staged(src, ingest_id, lang)
            store.log_ingest(ingest_id, source.name, source.format, source.sha256, result.counts, started)
            result.seconds += time.time() - merge_started
            progress.done(result)
        for source in compressed:
            store.log_source_file(source.file_sha256, source.sha256)
    store.reset_staging()
    return results


def _read(source: Source, on_bytes: Callable[[int], None], check: ContentCheck | None = None):
    from kalmkg.ingestion.delimited import read_texts, read_triples
    from kalmkg.ingestion.rdf import read_rdf

    for f in source.files:
        if f.kind == "rdf":
            yield from read_rdf(f.path, f.format, source.tag, on_bytes, f.compression, check)
        elif f.kind == "triples":
            yield from read_triples(f, on_bytes)
        else:
            yield from read_texts(f)
            on_bytes(f.size)
