"""The `kalmkg` command line: parse, call one function below, print.

Only typer is imported at start-up; everything heavy is imported inside the command that needs it,
so `kalmkg --help` stays fast.
"""

from __future__ import annotations

import json
import os
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
            console=console, disable=quiet or not console.is_terminal, transient=True,
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


# --------------------------------------------------------------------------- train
@app.command()
def train(
    ctx: typer.Context,
    base: str = typer.Option("smollm2-135m", "--base", "-b", help="Base model: smollm2-135m (embedded), a local HF folder, a .gguf file, or a hub id.", rich_help_panel="Model"),
    epochs: float = typer.Option(1.0, "--epochs", help="Passes over the training triples (both directions).", rich_help_panel="Optimisation"),
    max_steps: int = typer.Option(0, "--max-steps", help="Stop after this many optimizer steps (overrides --epochs).", rich_help_panel="Optimisation"),
    batch_size: int = typer.Option(24, "--batch-size", help="Triples per step (the global batch: in-batch negatives).", rich_help_panel="Optimisation"),
    lr: float = typer.Option(1e-4, "--lr", help="Peak learning rate (AdamW, warm-up then cosine).", rich_help_panel="Optimisation"),
    warmup: float = typer.Option(0.05, "--warmup", help="Warm-up as a fraction of the steps.", rich_help_panel="Optimisation"),
    weight_decay: float = typer.Option(0.001, "--weight-decay", rich_help_panel="Optimisation"),
    grad_clip: float = typer.Option(1.0, "--grad-clip", help="Clip the gradient norm (0: off).", rich_help_panel="Optimisation"),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Batches per optimizer step.", rich_help_panel="Optimisation"),
    grad_checkpointing: bool = typer.Option(False, "--grad-checkpointing", help="Recompute activations to save memory.", rich_help_panel="Optimisation"),
    seed: int = typer.Option(0, "--seed", rich_help_panel="Optimisation"),
    margin: float = typer.Option(0.02, "--margin", help="Additive margin gamma on the positive logit.", rich_help_panel="Objective"),
    temperature: float = typer.Option(0.05, "--temperature", help="InfoNCE temperature tau (initial value if learned).", rich_help_panel="Objective"),
    learn_temperature: bool = typer.Option(False, "--learn-temperature", help="Train tau as a parameter.", rich_help_panel="Objective"),
    lm_weight: float = typer.Option(0.01, "--lm-weight", help="Weight lambda of the triple-completion LM loss.", rich_help_panel="Objective"),
    lm_examples: int = typer.Option(4, "--lm-examples", help="Examples per batch that also get the LM loss.", rich_help_panel="Objective"),
    self_negatives: bool = typer.Option(False, "--self-negatives", help="Use each head as a negative for its own query.", rich_help_panel="Objective"),
    prebatch: int = typer.Option(0, "--prebatch", help="Also contrast against the tails of the previous K batches.", rich_help_panel="Objective"),
    lora_r: int = typer.Option(8, "--lora-r", rich_help_panel="Model"),
    lora_alpha: int = typer.Option(16, "--lora-alpha", rich_help_panel="Model"),
    lora_dropout: float = typer.Option(0.05, "--lora-dropout", rich_help_panel="Model"),
    lora_targets: str = typer.Option("gate_proj,up_proj,down_proj", "--lora-targets", help="Comma-separated module names (default: the FFN projections).", rich_help_panel="Model"),
    lora_layers: int = typer.Option(0, "--lora-layers", help="Adapt only the top N layers (0: all); much faster on a CPU.", rich_help_panel="Model"),
    full: bool = typer.Option(False, "--full", help="Full fine-tuning instead of LoRA (small models).", rich_help_panel="Model"),
    max_entity_tokens: int = typer.Option(50, "--max-entity-tokens", help="Cut entity text (name, description) to this many tokens.", rich_help_panel="Data"),
    max_seq_len: int = typer.Option(256, "--max-seq-len", rich_help_panel="Data"),
    bucket: bool = typer.Option(True, "--bucket/--no-bucket", help="Batch examples of similar length together.", rich_help_panel="Data"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1, mps.", rich_help_panel="Optimisation"),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 autocast where the hardware is fast at it), fp32, bf16.", rich_help_panel="Optimisation"),
    eval_every: int = typer.Option(0, "--eval-every", help="Validate every N steps (0: every epoch).", rich_help_panel="Run"),
    eval_limit: int = typer.Option(500, "--eval-limit", help="Valid triples sampled for validation (fixed seed).", rich_help_panel="Run"),
    patience: int = typer.Option(3, "--patience", help="Stop after N validations without a better MRR (0: never).", rich_help_panel="Run"),
    checkpoint_every: int = typer.Option(200, "--checkpoint-every", help="Write a resumable checkpoint every N steps.", rich_help_panel="Run"),
    log_every: int = typer.Option(10, "--log-every", rich_help_panel="Run"),
    run_name: Optional[str] = typer.Option(None, "--run-name", help="Run folder name under runs/ [default: time + base].", rich_help_panel="Run"),
    resume: Optional[str] = typer.Option(None, "--resume", help="Continue a killed run (its id, or 'latest') exactly where it stopped.", rich_help_panel="Run"),
    embed_after: bool = typer.Option(True, "--embed/--no-embed", help="Encode every entity into the index at the end (for predict).", rich_help_panel="Run"),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the resolved config and the first batch's texts, then stop.", rich_help_panel="Run"),
) -> None:
    """Fine-tune a causal LLM on the graph with KaLM (contrastive views + triple completion, LoRA).

    \b
    Writes runs/<id>/ (config.toml, adapter/, tokenizer/, metrics.jsonl, training.png, checkpoint/),
    validates on the valid split (filtered MRR) and keeps the best adapter.
    Under torchrun / accelerate launch the same command trains data-parallel.

    \b
    Examples:
      kalmkg train --max-steps 50
      kalmkg train --epochs 3 --batch-size 32 --lr 2e-4 --learn-temperature
      kalmkg train --base meta-llama/Llama-2-7b-hf --grad-checkpointing
      kalmkg train --resume latest
      torchrun --nproc-per-node 4 -m kalmkg train --batch-size 96
    """
    from kalmkg.training.config import TrainConfig
    from kalmkg.training.loop import train as run_train

    cfg = TrainConfig(
        base=base, lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
        lora_targets=tuple(t.strip() for t in lora_targets.split(",") if t.strip()), lora_layers=lora_layers,
        full=full,
        margin=margin, temperature=temperature, learn_temperature=learn_temperature, lm_weight=lm_weight,
        lm_examples=lm_examples, self_negatives=self_negatives, prebatch=prebatch, batch_size=batch_size,
        epochs=epochs, max_steps=max_steps, lr=lr, weight_decay=weight_decay, warmup=warmup, grad_clip=grad_clip,
        grad_accum=grad_accum, grad_checkpointing=grad_checkpointing, max_entity_tokens=max_entity_tokens,
        max_seq_len=max_seq_len, bucket=bucket, seed=seed, device=device, precision=precision, log_every=log_every,
        checkpoint_every=checkpoint_every, eval_every=eval_every, eval_limit=eval_limit, patience=patience,
    )
    console = _console()
    if dry_run:
        run_train(ctx.obj, cfg, run_id=run_name, dry_run=_print_dry_run)
        return
    resume_id = None if resume is None else (None if resume == "latest" else resume)
    with _TrainBar(_console(stderr=True)) as bar:
        if resume is not None:
            from kalmkg.runs import find_run

            resume_id = find_run(ctx.obj, resume_id).name
            result = run_train(ctx.obj, cfg, resume=resume_id, progress=bar)
        else:
            result = run_train(ctx.obj, cfg, run_id=run_name, progress=bar)
    if result is None:
        return
    best = f"best valid MRR {result.best_metric:.4f}" if result.best_metric is not None else "no valid split"
    console.print(f"run {result.run_id}: {result.steps} steps, {best}"
                  f"{' (stopped early)' if result.stopped_early else ''} -> {result.run_dir}")
    # The main process builds the entity index for predict (other torchrun processes just end).
    if embed_after and (result.run_dir / "adapter").is_dir() and os.environ.get("RANK", "0") == "0":
        _embed_after_training(ctx.obj, result.run_id, device)


def _print_dry_run(info: dict) -> None:
    """The resolved config as the run's config.toml would hold it, then the first batch's texts."""
    from kalmkg.runs import config_to_toml

    out = [f"# base {info['base']} on {info['device']}: {info['train_examples']:,} training examples "
           f"(both directions), {info['steps']:,} steps", config_to_toml({"train": info["config"]}),
           "# first batch (8 examples shown)"]
    for i, ex in enumerate(info["first_batch"]):
        out.append(f"[{i}] hr view:   {ex['hr_view']}\n    tail view: {ex['tail_view']}")
        if ex["lm_target"]:
            out.append(f"    LM target: {ex['lm_target']}")
    sys.stdout.write("\n".join(out) + "\n")


class _TrainBar:
    """Step progress with the loss terms, tau, triples/s and ETA."""

    def __init__(self, console):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.console = console
        self.progress = Progress(
            TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[terms]}"), TimeRemainingColumn(), console=console,
        )
        self.task = None

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def start(self, total_steps, state) -> None:
        self.task = self.progress.add_task("train", total=total_steps, completed=state.step, epoch=state.epoch, terms="")

    def step(self, state, terms, rate) -> None:
        text = f"loss {terms['loss']:.4f} exp {terms['l_exp']:.4f}"
        if terms.get("l_imp") is not None:
            text += f" imp {terms['l_imp']:.3f}"
        text += f" tau {terms['tau']:.4f} acc {terms['acc']:.2f} {rate:.1f} triples/s"
        self.progress.update(self.task, completed=state.step, epoch=state.epoch, terms=text)

    def message(self, text: str) -> None:
        self.progress.console.print(text)

    def stop(self) -> None:
        pass


# --------------------------------------------------------------------------- embed, predict, evaluate
class _CountBar:
    """Rich progress over counts (entities, queries), one line per stage; silent when quiet or not a terminal."""

    def __init__(self, console, quiet: bool = False):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.progress = Progress(
            TextColumn("{task.description:<10}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            TimeRemainingColumn(), console=console, disable=quiet or not console.is_terminal, transient=True,
        )
        self.tasks: dict = {}

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        self.progress.__exit__(*exc)

    def stage(self, name: str, done: int, total: int) -> None:
        if name not in self.tasks:
            self.tasks[name] = self.progress.add_task(name, total=total)
        self.progress.update(self.tasks[name], completed=done, total=total)


def _load_for_command(workspace, run, base, device, console):
    """The run's (or base's) model; its warnings go to stderr as one line each."""
    from kalmkg.loaded import load_model

    loaded = load_model(workspace, run=run, base=base, device=device)
    for warning in loaded.warnings:
        console.print(f"warning: {warning}", style="yellow", soft_wrap=True)
    return loaded


def _embed_after_training(workspace, run_id: str, device: str) -> None:
    from kalmkg.index import embed as run_embed

    console = _console(stderr=True)
    loaded = _load_for_command(workspace, run_id, None, device, console)
    with _CountBar(console) as bar:
        result = run_embed(workspace, loaded, progress=lambda d, t: bar.stage("embedding", d, t))
    _console().print(f"entity index: {result.total:,} entities ({result.encoded:,} encoded) -> {workspace.vectors_dir}")


# --------------------------------------------------------------------------- embed
@app.command()
def embed(
    ctx: typer.Context,
    run: Optional[str] = typer.Option(None, "--run", "-r", help="Run id. [default: the latest run]"),
    base: Optional[str] = typer.Option(None, "--base", "-b", help="Embed with an untrained base model instead (a baseline): smollm2-135m, a folder, a .gguf, a hub id."),
    batch_size: int = typer.Option(64, "--batch-size", help="Entities per forward pass."),
    full: bool = typer.Option(False, "--full", help="Re-encode every entity, not only new or changed ones."),
    ann_threshold: int = typer.Option(100_000, "--ann-threshold", help="Build an ANN index (IVF-HNSW-SQ, cosine) from this many entities; exact search below."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1, mps."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Encode every entity (as a tail view) into the workspace's vector index, for predict and evaluate.

    Incremental: after `kalmkg ingest`, only entities that are new or whose text changed are encoded.
    Another run (or --base) re-encodes everything. An index that does not fit the model or the graph
    is never searched: predict says to run `kalmkg embed`.

    \b
    Examples:
      kalmkg embed
      kalmkg embed --run 20250101-120000-smollm2-135m --batch-size 128
      kalmkg embed --full
      kalmkg embed --base smollm2-135m        # the untrained baseline's vectors
    """
    from kalmkg.index import embed as run_embed

    if batch_size < 1:
        raise KalmkgError("--batch-size must be at least 1")
    console = _console(stderr=True)
    loaded = _load_for_command(ctx.obj, run, base, device, console)
    with _CountBar(console, quiet=as_json) as bar:
        result = run_embed(ctx.obj, loaded, batch_size=batch_size, full=full, ann_threshold=ann_threshold,
                           progress=lambda d, t: bar.stage("embedding", d, t))
    summary = {"model": loaded.fingerprint, "encoded": result.encoded, "unchanged": result.unchanged,
               "removed": result.removed, "entities": result.total, "rebuilt": result.rebuilt, "ann": result.ann,
               "dim": result.dim, "seconds": round(result.seconds, 3),
               "encode_seconds": round(result.encode_seconds, 3), "path": str(ctx.obj.vectors_dir)}
    if as_json:
        _print_json(summary)
        return
    what = "all re-encoded" if result.rebuilt else f"{result.encoded:,} new or changed, {result.unchanged:,} unchanged"
    rate = f", {result.encoded / result.encode_seconds:,.0f} entities/s" if result.encode_seconds > 0 else ""
    search = f"ANN index {result.ann}" if result.ann else "exact search"
    _console().print(f"{loaded.fingerprint}: {result.total:,} entities ({what}) in {result.seconds:.1f} s{rate}; "
                     f"{result.dim}-dim, {search} -> {ctx.obj.vectors_dir}")


# --------------------------------------------------------------------------- predict
@app.command()
def predict(
    ctx: typer.Context,
    head: str = typer.Argument(..., help="Head entity (key, label or local name), or '?' to predict heads."),
    relation: str = typer.Argument(..., help="Relation: key, label or local name (capital_of)."),
    tail: str = typer.Argument(..., help="Tail entity, or '?' to predict tails."),
    k: int = typer.Option(10, "-k", "--top", help="How many entities to list."),
    filter_known: bool = typer.Option(False, "--filter-known", help="Hide answers the graph already has (show only new links)."),
    run: Optional[str] = typer.Option(None, "--run", "-r", help="Run id. [default: the latest run]"),
    base: Optional[str] = typer.Option(None, "--base", "-b", help="Use an untrained base model (needs `kalmkg embed --base` first)."),
    backend: str = typer.Option("torch", "--backend", help="torch, or gguf (the run's `kalmkg export` through llama.cpp)."),
    gguf: Optional[str] = typer.Option(None, "--gguf", help="With --backend gguf: which export (models/<name>.gguf). [default: the run's newest]"),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda, mps (one query: the CPU is usually fastest to start)."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
) -> None:
    """Rank every entity for the open slot of HEAD RELATION ? or ? RELATION TAIL.

    Names resolve through the store: key, label or local name, case-insensitive. Quote '?' so the
    shell does not expand it. Head prediction asks the model the inverse query ("inverse of RELATION").
    Entities already linked in the graph are marked known.

    \b
    Examples:
      kalmkg predict Paris capital_of '?'
      kalmkg predict '?' "capital of" France -k 5
      kalmkg predict "Marie Curie" "field of work" '?' --filter-known
      kalmkg predict Paris capital_of '?' --backend gguf      # after `kalmkg export`
      kalmkg predict http://example.org/kg/Berlin capital_of '?' --json | jq '.results[0]'
    """
    from kalmkg.predict import predict as run_predict

    result = run_predict(ctx.obj, head, relation, tail, k=k, filter_known=filter_known, run=run, base=base,
                         backend=backend, device=device, gguf=gguf)
    if as_json:
        _print_json(result.to_json())
        return
    console = _console()
    for warning in result.warnings:
        _console(stderr=True).print(f"warning: {warning}", style="yellow", soft_wrap=True)
    from rich.table import Table

    query = result.to_json()["query"]
    title = " ".join(f"[bold]{w}[/bold]" if w == "?" else w for w in query)
    table = Table(title=f"{title}   ({result.model})", title_justify="left")
    for col, just in (("#", "right"), ("entity", "left"), ("key", "left"), ("score", "right"), ("known", "center")):
        table.add_column(col, justify=just, overflow="fold")
    for c in result.candidates:
        table.add_row(str(c.rank), c.label, c.key, f"{c.score:.4f}", "✓" if c.known else "",
                      style="dim" if c.known else None)
    notes = [f"{result.hidden_known:,} known answers hidden" if filter_known else "✓ = already in the graph",
             f"encode {result.encode_ms:.0f} ms, search {result.search_ms:.0f} ms"]
    table.caption = "; ".join(notes)
    console.print(table)


# --------------------------------------------------------------------------- evaluate
@app.command()
def evaluate(
    ctx: typer.Context,
    split: str = typer.Option("test", "--split", help="valid or test."),
    limit: int = typer.Option(0, "--limit", help="Evaluate a fixed-seed sample of N triples (0: all)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the --limit sample."),
    run: Optional[str] = typer.Option(None, "--run", "-r", help="Run id. [default: the latest run]"),
    base: Optional[str] = typer.Option(None, "--base", "-b", help="Evaluate an untrained base model (the baseline): smollm2-135m, a folder, a .gguf, a hub id."),
    batch_size: int = typer.Option(64, "--batch-size", help="Texts per forward pass."),
    no_index: bool = typer.Option(False, "--no-index", help="Encode the entities here even when the entity index is fresh."),
    generative: bool = typer.Option(False, "--generative", help="Generation-based evaluation instead: tail, head and relation prediction and triple classification (3-shot, greedy), the run beside its untrained base."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1, mps."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Filtered link-prediction metrics (MR, MRR, Hits@1/3/10) for tail, head and both, as the paper does.

    Every entity is ranked for every query by exact search; other known answers (train/valid/test)
    are removed; ties count as the mean of the best and worst rank (PyKEEN's realistic rank); head
    prediction is tail prediction of the inverse query. Entity vectors come from the index when it
    is fresh (`kalmkg embed`), else they are encoded first. Writes eval-<split>.json and
    predictions-<split>.jsonl into runs/<id>/ (for --base: <workspace>/evals/base-<name>/).

    \b
    Examples:
      kalmkg evaluate
      kalmkg evaluate --split valid --limit 500
      kalmkg evaluate --base smollm2-135m --limit 500    # the untrained baseline
      kalmkg evaluate --json | jq .metrics.both
      kalmkg evaluate --generative --limit 100     # the run beside its base
    """
    from kalmkg.evaluation.link_prediction import evaluate_run

    if limit < 0:
        raise KalmkgError("--limit must be 0 (all) or a positive number of triples")
    if generative:
        if base is not None:
            raise KalmkgError("--generative evaluates a run beside its own base; drop --base (use --run)")
        _evaluate_generative(ctx.obj, run, split, limit, seed, device, as_json)
        return
    console = _console(stderr=True)
    with _CountBar(console, quiet=as_json) as bar:
        out = evaluate_run(ctx.obj, run=run, base=base, split=split, limit=limit, seed=seed, batch_size=batch_size,
                           device=device, use_index=not no_index, progress=bar.stage)
    for warning in out.get("warnings", []):
        console.print(f"warning: {warning}", style="yellow", soft_wrap=True)
    if as_json:
        _print_json(out)
        return
    from rich.table import Table

    m, t = out["metrics"], out["timing"]
    sample = f", sample of {out['triples']:,} (seed {seed})" if limit else ""
    table = Table(title=f"{out['model']} on {split}: {out['triples']:,} triples x 2 directions, "
                        f"{out['entities']:,} entities{sample}", title_justify="left")
    for col in ("", "MRR", "Hits@1", "Hits@3", "Hits@10", "MR", "queries"):
        table.add_column(col, justify="left" if not col else "right")
    for direction in ("tail", "head", "both"):
        s = m[direction]
        table.add_row(direction, f"{s['mrr']:.4f}", f"{s['hits@1']:.4f}", f"{s['hits@3']:.4f}", f"{s['hits@10']:.4f}",
                      f"{s['mr']:.1f}", f"{s['count']:,}", style="bold" if direction == "both" else None)
    vectors = "from the index" if t["entity_vectors"] == "index" else f"encoded in {t['entity_encoding_s']:.1f} s"
    table.caption = (f"entity vectors {vectors}; queries encoded in {t['query_encoding_s']:.1f} s, "
                     f"ranked in {t['ranking_s']:.2f} s -> {out['eval_path']}")
    _console().print(table)
    if out.get("index_not_used") and not no_index and t["entity_vectors"] != "index":
        console.print(f"note: entity index not used: {out['index_not_used']}", style="dim", soft_wrap=True)


def _evaluate_generative(workspace, run, split, limit, seed, device, as_json) -> None:
    from kalmkg.evaluation.generative import TASKS, evaluate_generative

    console = _console(stderr=True)
    with _CountBar(console, quiet=as_json) as bar:
        out = evaluate_generative(workspace, run=run, split=split, limit=limit, seed=seed, device=device,
                                  progress=bar.stage)
    if as_json:
        _print_json(out)
        return
    from rich.table import Table

    acc = out["accuracy"]
    table = Table(title=f"{out['model']} on {split}: generative, {out['triples']:,} triples, {out['shots']}-shot, greedy",
                  title_justify="left")
    table.add_column("task")
    for name in acc:
        table.add_column("untrained base" if name == "base" else "run", justify="right")
    names = {"tail": "tail prediction", "head": "head prediction", "relation": "relation prediction",
             "classification": "triple classification"}
    for task in TASKS:
        table.add_row(names[task], *[f"{acc[name][task]['accuracy']:.1%}" for name in acc])
    table.caption = f"accuracy; answers in {out['predictions_path']}"
    _console().print(table)


# --------------------------------------------------------------------------- export
@app.command()
def export(
    ctx: typer.Context,
    run: Optional[str] = typer.Option(None, "--run", help="Run id under runs/. [default: the latest run]"),
    quant: Optional[str] = typer.Option(
        None, "--quant", "-q",
        help="F16, Q8_0, Q6_K, Q5_K_M or Q4_K_M. [default: Q8_0 below 1B parameters, Q4_K_M above]",
    ),
    name: Optional[str] = typer.Option(None, "--name", help="Output name: models/<name>.gguf. [default: <run>-<quant>]"),
    ollama: bool = typer.Option(False, "--ollama", help="Also write models/<name>.Modelfile for `ollama create`."),
    as_json: bool = typer.Option(False, "--json", help="Print the result (paths, sizes, verification) as JSON."),
) -> None:
    """Merge a run's LoRA into its base and write a quantized GGUF for llama.cpp, verified against torch.

    Stages: merge (float32), save (HF folder), convert (llama.cpp's converter),
    quantize (llama.cpp), verify (llama.cpp vs torch: last-token embeddings,
    cosine >= 0.99 for F16/Q8_0, looser for K-quants; a greedy continuation).
    Writes models/<name>.gguf (with run, graph fingerprint and pooling in its
    metadata) and models/<name>.json; a failed stage leaves neither behind.

    \b
    Examples:
      kalmkg export
      kalmkg export --quant Q4_K_M --ollama
      kalmkg export --run 20250101-120000-smollm2-135m --quant F16 --name smollm-kg
    """
    from kalmkg.export.pipeline import export_run

    with _ExportStages(_console(stderr=True), quiet=as_json) as stages:
        result = export_run(ctx.obj, run, quant, name, ollama, stages)
    v = result.verification
    if as_json:
        _print_json({"name": result.name, "path": str(result.path), "metadata": str(result.metadata_path),
                     "modelfile": str(result.modelfile) if result.modelfile else None, "run_id": result.run_id,
                     "quant": result.quant, "n_params": result.n_params, "size_bytes": result.size_bytes,
                     "replaced": result.replaced, "seconds": result.seconds, "verification": v.as_dict()})
        return
    console = _console()
    greedy = ("same greedy continuation" if v.greedy_match else
              "greedy continuation differs after the first token" if v.first_token_match else
              "greedy first token differs (a near tie)")
    console.print(f"run {result.run_id} -> {result.path} ({result.quant}, {result.size_bytes / 1e6:,.1f} MB"
                  f"{', replaced the previous file' if result.replaced else ''})")
    console.print(f"verified: min cosine {v.min_cosine:.5f} over {v.texts} texts (needs >= {v.threshold}), {greedy}")
    if result.modelfile is not None:
        console.print(f"ollama: cd {result.modelfile.parent} && ollama create {result.name} -f {result.modelfile.name}")


class _ExportStages:
    """A line per finished stage (time and what it made), a spinner on the running one (terminals only)."""

    def __init__(self, console, quiet: bool):
        self.console = console
        self.quiet = quiet
        self.status = None
        self.label = ""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._stop()

    def _stop(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None

    def stage(self, name: str, index: int, total: int) -> None:
        self._stop()
        self.label = f"[{index + 1}/{total}] {name:<8}"
        if not self.quiet and self.console.is_terminal:
            self.status = self.console.status(f"{self.label} ...")
            self.status.start()

    def stage_done(self, name: str, seconds: float, detail: str = "") -> None:
        self._stop()
        if not self.quiet:
            self.console.print(f"{self.label} {seconds:6.1f}s  {detail}", markup=False)

    def message(self, text: str) -> None:
        self.console.print(f"note: {text}", markup=False)  # stderr, so --json output stays clean


# --------------------------------------------------------------------------- ask
@app.command()
def ask(
    ctx: typer.Context,
    question: str = typer.Argument(..., help="A question in plain words; quote it for the shell."),
    model: Optional[str] = typer.Option(
        None, "--model", "-m",
        help="A .gguf file, a name under models/, or smollm2-135m (the untrained embedded base). "
        "[default: the newest `kalmkg export`]",
    ),
    hops: int = typer.Option(2, "--hops", help="How far from the entities the question names to look: 1 or 2."),
    max_facts: int = typer.Option(8, "--max-facts", help="Facts given to the model."),
    no_context: bool = typer.Option(False, "--no-context", help="Ask the model alone, without facts (what training put into its weights)."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0 is greedy (the same answer every time)."),
    max_tokens: int = typer.Option(96, "--max-tokens", help="Longest answer, in tokens."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed (with --temperature > 0)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="llama.cpp threads. [default: every core this process may use]"),
    as_json: bool = typer.Option(False, "--json", help="Print answer, facts, linked entities and timings as JSON."),
) -> None:
    """Answer QUESTION from the graph, offline, with an exported GGUF through llama.cpp.

    The entities the question names are linked to the graph (labels, then fuzzy
    matches), the facts around them (1-2 hops) are ranked by relevance to the
    question, and the best ones go into the model's chat template as numbered
    facts. The answer streams, then the facts it was given are listed as citations.
    A question that names nothing in the graph gets "Nothing in the graph
    matches" instead of an invented answer. No torch is imported.

    \b
    Examples:
      kalmkg ask "What is the nationality of Marie Curie's spouse?"
      kalmkg ask "Who founded Apple?" --hops 1 --max-facts 4
      kalmkg ask "Who was Marie Curie married to?" --no-context      # the model alone
      kalmkg ask "Where was Bill Gates born?" --model smollm2-135m   # the untrained base
      kalmkg ask "Which countries border Germany?" --json | jq .facts
    """
    import time

    from kalmkg.qa.ask import AskConfig, Asker, context_lines
    from kalmkg.store import Store

    config = AskConfig(hops=hops, max_facts=max_facts, no_context=no_context, temperature=temperature,
                       max_tokens=max_tokens, seed=seed)  # checks the options before a model is loaded
    if threads is not None and threads < 1:
        raise KalmkgError("--threads must be at least 1")
    if not question.strip():
        raise KalmkgError("an empty question")
    with Store.open(ctx.obj):  # a missing graph fails before a model is loaded
        pass
    t0 = time.perf_counter()
    asker = Asker(ctx.obj, model, n_threads=threads, embed=not no_context)
    load_s = time.perf_counter() - t0

    def stream(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    answer = asker.ask(question, config, on_token=None if as_json else stream)
    answer.seconds["load"] = round(load_s, 4)
    if as_json:
        _print_json(answer.to_json())
        return
    sys.stdout.write("\n")
    if answer.facts or answer.descriptions:
        sys.stdout.write("\nFacts given to the model:\n")
        for line in context_lines(answer.facts, answer.descriptions):
            sys.stdout.write(f"  {line}\n")
    sys.stdout.flush()  # the answer and facts before the status line on stderr
    links = ", ".join(f"{lk.label} ({lk.match})" for lk in answer.links) or "none"
    ttft = answer.seconds.get("first_token")
    timing = f"; load {load_s:.1f} s, retrieve {answer.seconds['retrieve']:.2f} s"
    timing += f", first token {ttft:.2f} s" if ttft is not None else ""
    mode = "no context" if no_context else f"linked: {links}"
    _console(stderr=True).print(f"{mode}; model {answer.model}{timing}", style="dim", markup=False, soft_wrap=True)


# --------------------------------------------------------------------------- doctor
@app.command()
def doctor(
    ctx: typer.Context,
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    retest: bool = typer.Option(False, "--retest", help="Run llama.cpp's self-test again instead of using the cached verdict."),
) -> None:
    """Print the environment for a bug report: versions, CPU, torch and its
    device, the llama.cpp build (features, CUDA) and its self-test, the
    workspace, cache folders and free disk.

    Exits 1 with one error line when llama.cpp fails its self-test (e.g. built
    for instructions this CPU does not grant); the line says how to rebuild.

    \b
    Examples:
      kalmkg doctor
      kalmkg doctor --json > environment.json
    """
    from kalmkg.doctor import format_report, problem, report

    data = report(ctx.obj, retest=retest)
    if as_json:
        _print_json(data)
    else:
        sys.stdout.write(format_report(data) + "\n")
    sys.stdout.flush()
    failure = problem(data)
    if failure:
        raise KalmkgError(failure)


def _quiet_libraries() -> None:
    """The CLI draws its own progress: silence the ML libraries' bars and advisory warnings."""
    import os
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*requires_grad=True to a scalar.*")


def _click():
    """The click that parses our command line: recent typer releases vendor their own copy."""
    try:
        from typer import _click as click
    except ImportError:
        import click
    return click


def main() -> None:
    click = _click()
    no_args_help = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2 only
    _quiet_libraries()
    try:
        code = app(standalone_mode=False)
    except KalmkgError as exc:
        sys.stderr.write(f"error: {exc}\n")
        sys.exit(1)
    except no_args_help as exc:  # bare `kalmkg`: the help, as click does
        exc.show()
        sys.exit(2)
    except click.exceptions.UsageError as exc:  # a missing argument, a bad option value: one line
        command = exc.ctx.command_path if exc.ctx is not None else "kalmkg"
        sys.stderr.write(f"error: {exc.format_message()} (see `{command} --help`)\n")
        sys.exit(1)
    except click.exceptions.ClickException as exc:
        sys.stderr.write(f"error: {exc.format_message()}\n")
        sys.exit(1)
    except click.exceptions.Abort:
        sys.stderr.write("aborted\n")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
