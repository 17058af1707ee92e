"""The `kalmkg` command line: parse, call one function below, print.

Only typer is imported at start-up; everything heavy is imported inside the command that needs it,
so `kalmkg --help` stays fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from kalmkg.errors import KalmkgError
from kalmkg.workspace import ENV_VAR, Workspace

app = typer.Typer(
    name="kalmkg",
    help="Make a language model know a knowledge graph.\n\n"
    "Ingest RDF or TSV into a local store, fine-tune an LLM on it with KaLM, predict links by name, "
    "and answer questions offline through llama.cpp.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _workspace_option(
    ctx: typer.Context,
    workspace: Optional[Path] = typer.Option(
        None, "--workspace", "-w", envvar=ENV_VAR, show_envvar=True,
        help="Workspace folder holding the graph store, runs and models. [default: ./.kalmkg]",
    ),
) -> None:
    ctx.obj = Workspace.resolve(workspace)


def _console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def _print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


# --------------------------------------------------------------------------- ingest
@app.command()
def ingest(
    ctx: typer.Context,
    paths: List[Path] = typer.Argument(..., help="RDF files, TSV/CSV files, or benchmark folders.", show_default=False),
    format: Optional[str] = typer.Option(
        None, "--format", "-f",
        help="Force a format: turtle, ntriples, nquads, trig, rdfxml, jsonld, tsv, csv. [default: by extension]",
    ),
    lang: str = typer.Option("en", "--lang", help="Preferred language of labels and descriptions (then untagged, then any)."),
    split: str = typer.Option("train", "--split", help="Split of triples from single TSV/CSV files: train, valid or test."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
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
    from kalmkg.ingest import ingest as run_ingest
    from kalmkg.ingest import resolve_sources
    from kalmkg.store import SPLITS, Store

    if split not in SPLITS:
        raise KalmkgError(f"unknown split '{split}'; use one of: {', '.join(SPLITS)}")
    workspace: Workspace = ctx.obj
    sources = resolve_sources(paths, format, split)
    console = _console(stderr=True)
    with Store.open(workspace, create=True) as store, _IngestBar(console, quiet=as_json) as bar:
        results = run_ingest(store, sources, lang=lang, progress=bar)
    if as_json:
        _print_json([{**r.counts.__dict__, "source": r.source, "format": r.format, "skipped": r.skipped,
                      "rows_read": r.rows_read, "seconds": round(r.seconds, 3)} for r in results])
        return
    from rich.table import Table

    table = Table(title=f"Ingested into {workspace.root}", title_justify="left")
    for col in ("source", "+triples", "+entities", "+relations", "+attributes", "seconds", "rows/s"):
        table.add_column(col, justify="left" if col == "source" else "right", overflow="fold")
    for r in results:
        name = f"{Path(r.source).name} ({r.format})"
        if r.skipped:
            table.add_row(name, "[dim]same content ingested before: skipped[/dim]", *[""] * 5)
            continue
        c = r.counts
        rate = f"{r.rows_read / r.seconds:,.0f}" if r.seconds > 0 else ""
        table.add_row(name, f"{c.triples:,}", f"{c.entities:,}", f"{c.relations:,}", f"{c.attributes:,}",
                      f"{r.seconds:.2f}", rate)
    changed = sum(r.counts.texts_updated for r in results)
    if changed:
        table.caption = f"{changed:,} existing entities got a new label or description"
    _console().print(table)


class _IngestBar:
    """Rich progress over bytes read, with rows and rows/s; silent when quiet or not a terminal."""

    def __init__(self, console, quiet: bool):
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TransferSpeedColumn

        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
            TransferSpeedColumn(), TextColumn("{task.fields[rows]:,} rows"),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(),
            console=console, disable=quiet, transient=True,
        )
        self.task = None
        self.rows = 0

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def start(self, source, stage: str) -> None:
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.rows = 0
        total = source.size or None
        self.task = self.progress.add_task(f"{stage} {Path(source.name).name}", total=total, rows=0, rate="")

    def advance(self, nbytes: int = 0, rows: int = 0) -> None:
        self.rows += rows
        elapsed = self.progress.tasks[-1].elapsed or 0.0
        rate = f"{self.rows / elapsed:,.0f} rows/s" if elapsed > 0 and self.rows else ""
        self.progress.update(self.task, advance=nbytes, rows=self.rows, rate=rate)

    def done(self, result) -> None:
        pass


# --------------------------------------------------------------------------- stats
@app.command()
def stats(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Print everything as JSON."),
    top: int = typer.Option(20, "--top", help="Relations to list in the table (JSON lists all)."),
) -> None:
    """Counts, relations with their triple counts, degree summary and split sizes.

    \b
    Example:
      kalmkg stats
      kalmkg stats --json | jq .splits
    """
    from kalmkg.store import Store

    with Store.open(ctx.obj) as store:
        data = store.stats(top_relations=None if as_json else top)
    if as_json:
        _print_json(data)
        return
    from rich.table import Table

    console = _console()
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
    console.print(summary)
    rel = Table(title=f"Relations (top {top})" if data["relations"] > top else "Relations", title_justify="left")
    for col, just in (("relation", "left"), ("label", "left"), ("triples", "right"), ("train", "right")):
        rel.add_column(col, justify=just)
    for r in data["relation_counts"]:
        rel.add_row(r["key"], r["label"], f"{r['triples']:,}", f"{r['train']:,}")
    console.print(rel)


# --------------------------------------------------------------------------- entities
@app.command()
def entities(
    ctx: typer.Context,
    query: str = typer.Argument(..., help="A key (IRI or id), a label, a prefix of one, or a misspelling."),
    limit: int = typer.Option(10, "--limit", "-n", help="How many matches to show."),
    as_json: bool = typer.Option(False, "--json", help="Print matches as JSON."),
) -> None:
    """Find entities by key or label: exact, case-insensitive, prefix, substring, then fuzzy.

    \b
    Examples:
      kalmkg entities paris
      kalmkg entities "http://example.org/kg/Paris"
      kalmkg entities "Marie Cury"
    """
    from kalmkg.store import Store

    with Store.open(ctx.obj) as store:
        matches = store.find_entities(query, limit=limit)
    if as_json:
        _print_json(matches)
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
    _console().print(table)


# --------------------------------------------------------------------------- split
@app.command()
def split(
    ctx: typer.Context,
    valid: float = typer.Option(0.05, "--valid", help="Fraction of triples for the validation split."),
    test: float = typer.Option(0.05, "--test", help="Fraction of triples for the test split."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives the same split."),
    force: bool = typer.Option(False, "--force", help="Re-split a graph that already has valid/test triples."),
) -> None:
    """Hold out valid/test triples whose entities and relations all still appear in train.

    \b
    Example:
      kalmkg split --valid 0.05 --test 0.05 --seed 13
    """
    from kalmkg.split import split_store
    from kalmkg.store import Store

    if not (0 <= valid < 1 and 0 <= test < 1 and valid + test < 1):
        raise KalmkgError("--valid and --test must be fractions in [0, 1) that sum to less than 1")
    with Store.open(ctx.obj, write=True) as store:
        counts = split_store(store, valid, test, seed, force)
    _console().print(f"train {counts['train']:,} / valid {counts['valid']:,} / test {counts['test']:,}")


def main() -> None:
    try:
        app()
    except KalmkgError as exc:
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(1)
