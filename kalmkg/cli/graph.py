"""The graph commands: ingest, stats, entities, split, sql, dump."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer

from kalmkg.cli.options import json_option
from kalmkg.cli.output import console, print_json, warn
from kalmkg.cli.progress import IngestBar
from kalmkg.errors import KalmkgError
from kalmkg.store import SPLITS, Store
from kalmkg.workspace import Workspace


def ingest(
    ctx: typer.Context,
    paths: List[Path] = typer.Argument(..., help="RDF files, TSV/CSV files, or benchmark folders.", show_default=False),
    format: Optional[str] = typer.Option(
        None, "--format", "-f",
        help="Force a format: turtle, ntriples, nquads, trig, rdfxml, jsonld, tsv, csv.", show_default="by extension",
    ),
    lang: str = typer.Option("en", "--lang", help="Preferred language of labels and descriptions (then untagged, then any)."),
    split: str = typer.Option("train", "--split", help="Split of triples from single TSV/CSV files: train, valid or test."),
    as_json: bool = json_option("Print the summary as JSON."),
) -> None:
    """Read graph files into the workspace's store.

    \b
    RDF: Turtle (.ttl), N-Triples (.nt), N-Quads (.nq), TriG, RDF/XML (.rdf/.owl), JSON-LD (.jsonld).
      IRIs are entities; rdfs:label / skos:prefLabel / schema:name / foaf:name give labels,
      rdfs:comment / schema:description / skos:definition / dcterms:description give descriptions;
      other literals are stored as attributes, not edges.
    TSV/CSV: head<TAB>relation<TAB>tail files; entity2text.txt / entities.tsv and
      relation2text.txt / relations.tsv (id<TAB>text or id<TAB>label<TAB>description);
      a folder in the KG-BERT layout (train.tsv, dev.tsv, test.tsv, entity2text.txt, ...) keeps its splits.
    All files of one command are ingested together or not at all; content ingested before is skipped.

    \b
    Examples:
      kalmkg ingest sample_graphs/world.ttl
      kalmkg ingest dump.nt more.nt --lang de
      kalmkg ingest ../shared/datasets/WN18RR
    """
    from kalmkg.ingestion import ingest as run_ingest
    from kalmkg.ingestion import resolve_sources

    if split not in SPLITS:
        raise KalmkgError(f"unknown split '{split}'; use one of: {', '.join(SPLITS)}")
    workspace: Workspace = ctx.obj
    sources = resolve_sources(paths, format, split)
    with workspace.writer("ingest", create=True), Store.edit(workspace, create=True) as store, \
            IngestBar(console(stderr=True), quiet=as_json) as bar:
        results = run_ingest(store, sources, lang=lang, progress=bar)
    for r in results:
        if r.empty:
            warn(console(stderr=True), f"{r.source}: valid {r.format} without a single triple; nothing ingested")
    if as_json:
        print_json([{**r.counts.__dict__, "source": r.source, "format": r.format, "skipped": r.skipped,
                     "empty": r.empty, "rows_read": r.rows_read, "seconds": round(r.seconds, 3)} for r in results])
        return
    from rich.table import Table

    table = Table(title=f"Ingested into {workspace.root}", title_justify="left")
    for col in ("source", "+triples", "+entities", "+relations", "+attributes", "seconds", "rows/s"):
        table.add_column(col, justify="left" if col == "source" else "right", overflow="fold")
    for r in results:
        name = f"{Path(r.source).name} ({r.format})"
        if r.skipped or r.empty:
            why = "no triples: nothing ingested" if r.empty else "same content ingested before: skipped"
            table.add_row(name, f"[dim]{why}[/dim]", *[""] * 5)
            continue
        c = r.counts
        rate = f"{r.rows_read / r.seconds:,.0f}" if r.seconds > 0 else ""
        table.add_row(name, f"{c.triples:,}", f"{c.entities:,}", f"{c.relations:,}", f"{c.attributes:,}",
                      f"{r.seconds:.2f}", rate)
    changed = sum(r.counts.texts_updated for r in results)
    if changed:
        table.caption = f"{changed:,} existing entities got a new label or description"
    console().print(table)


def stats(
    ctx: typer.Context,
    as_json: bool = json_option("Print everything as JSON."),
    top: int = typer.Option(20, "--top", help="Relations to list in the table (JSON lists all)."),
) -> None:
    """Counts, relations with their triple counts, degree summary and split sizes.

    \b
    Example:
      kalmkg stats
      kalmkg stats --json | jq .splits
    """
    with Store.open(ctx.obj) as store:
        data = store.stats(top_relations=None if as_json else top)
    if as_json:
        print_json(data)
        return
    from rich.table import Table

    out = console()
    s = data["splits"]
    deg = data["degree"]
    summary = Table(show_header=False, title=f"Graph in {ctx.obj.root}", title_justify="left")
    summary.add_column(style="bold")
    summary.add_column(justify="right")
    for name, value in (
        ("entities", f"{data['entities']:,}"), ("  with description", f"{data['entities_with_description']:,}"),
        ("relations", f"{data['relations']:,}"), ("triples", f"{data['triples']:,}"),
        ("  train / valid / test", f"{s['train']:,} / {s['valid']:,} / {s['test']:,}"),
        ("attributes", f"{data['attributes']:,}"),
        ("degree min / median / mean / p99 / max",
         f"{deg['min']} / {deg['median']} / {deg['mean']:.2f} / {deg['p99']} / {deg['max']}"),
        ("isolated entities", f"{deg['isolated']:,}"),
    ):
        summary.add_row(name, value)
    out.print(summary)
    rel = Table(title=f"Relations (top {top})" if data["relations"] > top else "Relations", title_justify="left")
    for col, just in (("relation", "left"), ("label", "left"), ("triples", "right"), ("train", "right")):
        rel.add_column(col, justify=just)
    for r in data["relation_counts"]:
        rel.add_row(r["key"], r["label"], f"{r['triples']:,}", f"{r['train']:,}")
    out.print(rel)


def entities(
    ctx: typer.Context,
    query: str = typer.Argument(..., help="A key (IRI or id), a label, a prefix of one, or a misspelling."),
    limit: int = typer.Option(10, "--limit", "-n", help="How many matches to show."),
    as_json: bool = json_option("Print matches as JSON."),
) -> None:
    """Find entities by key or label: exact, case-insensitive, prefix, substring, then fuzzy.

    \b
    Examples:
      kalmkg entities paris
      kalmkg entities "http://example.org/kg/Paris"
      kalmkg entities "Marie Cury"
    """
    with Store.open(ctx.obj) as store:
        matches = store.find_entities(query, limit=limit)
    if as_json:
        print_json(matches)
        return
    if not matches:
        raise KalmkgError(f"no entity matches '{query}'")
    from rich.table import Table

    table = Table()
    for col in ("label", "key", "match", "description"):
        table.add_column(col, overflow="fold")
    for m in matches:
        desc = m["description"] or ""
        table.add_row(m["label"], m["key"], m["match"], desc if len(desc) <= 80 else desc[:77] + "...")
    console().print(table)


def split(
    ctx: typer.Context,
    valid: float = typer.Option(0.05, "--valid", help="Fraction of triples for the validation split."),
    test: float = typer.Option(0.05, "--test", help="Fraction of triples for the test split."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives the same split."),
    force: bool = typer.Option(False, "--force", help="Re-split a graph that already has valid/test triples."),
    as_json: bool = json_option("Print the split sizes as JSON."),
) -> None:
    """Hold out valid/test triples whose entities and relations all still appear in train.

    \b
    Example:
      kalmkg split --valid 0.05 --test 0.05 --seed 13
    """
    from kalmkg.split import split_store
    if not (0 <= valid < 1 and 0 <= test < 1 and valid + test < 1):
        raise KalmkgError("--valid and --test must be fractions in [0, 1) that sum to less than 1")
    with ctx.obj.writer("split"), Store.edit(ctx.obj) as store:
        counts = split_store(store, valid, test, seed, force)
    if as_json:
        print_json(counts)
        return
    console().print(f"train {counts['train']:,} / valid {counts['valid']:,} / test {counts['test']:,}")


def sql(
    ctx: typer.Context,
    query: str = typer.Argument(..., help="One SQL statement (DuckDB's dialect) over the store's tables."),
    as_json: bool = json_option("Print the rows as a JSON list of objects."),
    max_rows: int = typer.Option(50, "--max-rows", help="Rows the table shows (JSON has all)."),
) -> None:
    """Read-only SQL over the graph store: tables entities, relations, triples, attributes, ingests, runs.

    Ids in triples and attributes are the entities' and relations' `id`s. The store is opened
    read-only and without access to other files: no statement can change the graph, read or write
    files, or attach databases.

    \b
    Examples:
      kalmkg sql "SELECT r.label, count(*) AS n FROM triples t JOIN relations r ON r.id = t.relation GROUP BY 1 ORDER BY n DESC"
      kalmkg sql "SELECT key, label FROM entities WHERE label ILIKE '%curie%'" --json
    """
    with Store.open(ctx.obj) as store:
        columns, rows = store.read_only_query(query)
    if as_json:
        print_json([dict(zip(columns, row)) for row in rows])
        return
    from rich.table import Table

    table = Table(caption=f"{len(rows):,} rows" + (f", the first {max_rows:,} shown" if len(rows) > max_rows else ""))
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in rows[:max_rows]:
        table.add_row(*["" if v is None else str(v) for v in row])
    console().print(table)


def dump(
    ctx: typer.Context,
    format: str = typer.Option("nt", "--format", "-f", help="nt (N-Triples) or parquet (a folder of tables)."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="File (nt) or folder (parquet) to write.",
                                       show_default="stdout for nt"),
) -> None:
    """Write the graph back out: N-Triples that `kalmkg ingest` reads back, or Parquet tables.

    \b
    nt: every triple, the labels and descriptions that were given, the attributes. Keys that are
      no IRI (TSV ids) become urn:kalmkg:key:<key>. Splits are not RDF: use parquet to keep them.
    parquet: triples.parquet (head, relation, tail, split by key), entities.parquet,
      relations.parquet, attributes.parquet.
    A file or folder is written whole or not at all.

    \b
    Examples:
      kalmkg dump > graph.nt
      kalmkg dump --format parquet --out graph-tables/
    """
    from kalmkg.dump import FORMATS, PARQUET_TABLES, dump_ntriples, dump_parquet
    from kalmkg.files import atomic_path, check_output

    if format not in FORMATS:
        raise KalmkgError(f"unknown dump format '{format}'; use one of: {', '.join(FORMATS)}")
    if format == "parquet" and out is None:
        raise KalmkgError("--format parquet writes a folder: give it with --out DIR")
    if out is not None:  # an earlier dump may be replaced, nothing else
        tables = {f"{name}.parquet" for name in PARQUET_TABLES}
        check_output(out, folder=format == "parquet", ours=lambda d: {p.name for p in d.iterdir()} <= tables)
    with Store.open(ctx.obj) as store:
        if out is None:
            dump_ntriples(store, sys.stdout.buffer)
            sys.stdout.buffer.flush()
            return
        with atomic_path(out) as staged:
            if format == "parquet":
                counts = dump_parquet(store, staged)
            else:
                with open(staged, "wb") as fh:
                    counts = {"lines": dump_ntriples(store, fh)}
    console(stderr=True).print(", ".join(f"{n:,} {name}" for name, n in counts.items()) + f" -> {out}", soft_wrap=True)
