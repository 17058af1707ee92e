"""The link commands: embed (the entity index), predict (one query), evaluate (the metrics)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from kalmkg.cli.options import (backend_option, base_option, device_option, gguf_option, json_option,
                                precision_option, run_option)
from kalmkg.cli.output import console, print_json, warn
from kalmkg.cli.progress import CountBar
from kalmkg.errors import KalmkgError
from kalmkg.workspace import Workspace


def load_for_command(workspace: Workspace, run: Optional[str], base: Optional[str], device: str, stderr,
                     precision: str = "auto"):
    """The run's (or base's) model; its warnings go to stderr as one line each."""
    from kalmkg.loaded import load_model

    loaded = load_model(workspace, run=run, base=base, device=device, precision=precision)
    for warning in loaded.warnings:
        warn(stderr, warning)
    return loaded


def embed_after_training(workspace: Workspace, run_id: str, device: str, calibrate_on: int | None = None,
                         quiet: bool = False, precision: str = "auto") -> dict:
    """What `kalmkg train` ends with: the new run's entity index, for predict; with `calibrate_on` (a
    number of valid triples, 0: all) the precision of its predictions on held-out triples, for ask.
    Says each in a line (unless `quiet`) and returns them (for --json)."""
    from kalmkg.evaluation.link_prediction import evaluate_run
    from kalmkg.index import embed as run_embed
    from kalmkg.store import Store

    stderr = console(stderr=True)
    loaded = load_for_command(workspace, run_id, None, device, stderr, precision)
    with CountBar(stderr) as bar:
        result = run_embed(workspace, loaded, progress=lambda d, t: bar.stage("embedding", d, t))
    done = {"index": {"path": str(workspace.vectors_dir), "entities": result.total, "encoded": result.encoded}}
    if not quiet:
        console().print(f"entity index: {result.total:,} entities ({result.encoded:,} encoded) -> {workspace.vectors_dir}")
    if calibrate_on is None:
        return done
    with Store.open(workspace) as store:
        has_valid = len(store.triples_array(("valid",))) > 0
    if has_valid:
        with CountBar(stderr) as bar:
            out = evaluate_run(workspace, split="valid", limit=calibrate_on, loaded=loaded, progress=bar.stage)
        done["valid"] = {"metrics": out["metrics"], "fusion": out.get("fusion"),
                         "calibration_path": out.get("calibration_path")}
        if not quiet:
            print_fusion(out)
            print_calibration(out)
    return done


def print_fusion(out: dict) -> None:
    """One line: the structure model's weight and what text, structure and both reach on valid."""
    if not out.get("fusion"):
        return
    mrr = {name: c["both"]["mrr"] for name, c in out["components"].items()}
    console().print(f"structure model: weight {out['fusion']['weight']:g} fitted on {out['queries']:,} valid queries; "
                    f"MRR text {mrr['text']:.3f}, structure {mrr['structure']:.3f}, both "
                    f"{out['metrics']['both']['mrr']:.3f}")


def print_calibration(out: dict, min_precision: float = 0.5) -> None:
    """One line: from which score `ask` says a prediction, as measured on held-out triples."""
    from kalmkg.evaluation.calibration import read_calibration

    path = out.get("calibration_path")
    calibration = read_calibration(Path(path).parent) if path else None
    if calibration is None:
        return
    threshold = calibration.threshold(min_precision)
    said = (f"said from probability {threshold:.3f} (held-out predictions there right "
            f"{calibration.precision_at(threshold).precision:.0%} of the time)" if threshold is not None
            else f"never said (no probability reaches {min_precision:.0%} precision)")
    console().print(f"calibration: first predictions right on {calibration.hit_rate:.0%} of {calibration.queries:,} "
                    f"held-out queries; ask's predictions {said} -> {path}")


def embed(
    ctx: typer.Context,
    run: Optional[str] = run_option(),
    base: Optional[str] = base_option("Embed with an untrained base model instead (a baseline): smollm2-135m, a folder, a .gguf, a hub id."),
    batch_size: int = typer.Option(64, "--batch-size", help="Entities per forward pass."),
    full: bool = typer.Option(False, "--full", help="Re-encode every entity, not only new or changed ones."),
    ann_threshold: int = typer.Option(100_000, "--ann-threshold", help="Build an ANN index (IVF-HNSW-SQ, cosine) from this many entities; exact search below."),
    backend: str = backend_option("torch, or gguf: encode through the run's `kalmkg export` with llama.cpp (the vectors `predict --backend gguf` queries are made by; not faster than torch on a CPU)."),
    gguf: Optional[str] = gguf_option(),
    device: str = device_option(),
    precision: str = precision_option(),
    as_json: bool = json_option("Print the summary as JSON."),
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
      kalmkg embed --backend gguf             # through the run's export (llama.cpp)
      kalmkg embed --device cuda --precision bf16
    """
    if batch_size < 1:
        raise KalmkgError("--batch-size must be at least 1")
    with ctx.obj.writer("embed"):
        _embed(ctx.obj, run, base, batch_size, full, ann_threshold, backend, gguf, device, precision, as_json)


def _embed(workspace: Workspace, run, base, batch_size: int, full: bool, ann_threshold: int, backend: str, gguf,
           device: str, precision: str, as_json: bool) -> None:
    from kalmkg.index import embed as run_embed
    from kalmkg.loaded import make_encoder

    stderr = console(stderr=True)
    loaded = load_for_command(workspace, run, base, device, stderr, precision)
    # torch: None, so that an index already up to date never loads the weights
    encoder = make_encoder(loaded, backend, gguf=gguf) if backend != "torch" else None
    with CountBar(stderr, quiet=as_json) as bar:
        result = run_embed(workspace, loaded, encoder, batch_size=batch_size, full=full, ann_threshold=ann_threshold,
                           progress=lambda d, t: bar.stage("embedding", d, t), backend=backend)
    summary = {"model": loaded.fingerprint, "encoded": result.encoded, "unchanged": result.unchanged,
               "removed": result.removed, "entities": result.total, "rebuilt": result.rebuilt, "ann": result.ann,
               "dim": result.dim, "seconds": round(result.seconds, 3),
               "encode_seconds": round(result.encode_seconds, 3), "path": str(workspace.vectors_dir)}
    if as_json:
        print_json(summary)
        return
    what = "all re-encoded" if result.rebuilt else f"{result.encoded:,} new or changed, {result.unchanged:,} unchanged"
    rate = f", {result.encoded / result.encode_seconds:,.0f} entities/s" if result.encode_seconds > 0 else ""
    search = f"ANN index {result.ann}" if result.ann else "exact search"
    console().print(f"{loaded.fingerprint}: {result.total:,} entities ({what}) in {result.seconds:.1f} s{rate}; "
                    f"{result.dim}-dim, {search} -> {workspace.vectors_dir}")


def predict(
    ctx: typer.Context,
    head: str = typer.Argument(..., help="Head entity (key, label or local name), or '?' to predict heads."),
    relation: str = typer.Argument(..., help="Relation: key, label or local name (capital_of)."),
    tail: str = typer.Argument(..., help="Tail entity, or '?' to predict tails."),
    k: int = typer.Option(10, "-k", "--top", help="How many entities to list."),
    filter_known: bool = typer.Option(False, "--filter-known", help="Hide answers the graph already has (show only new links)."),
    run: Optional[str] = run_option(),
    base: Optional[str] = base_option("Use an untrained base model (needs `kalmkg embed --base` first)."),
    backend: str = backend_option(),
    gguf: Optional[str] = gguf_option(),
    device: str = device_option("cpu", "cpu, cuda, mps (one query: the CPU is usually fastest to start)."),
    precision: str = precision_option(),
    as_json: bool = json_option("Print the results as JSON."),
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
    from kalmkg.prediction import predict as run_predict

    result = run_predict(ctx.obj, head, relation, tail, k=k, filter_known=filter_known, run=run, base=base,
                         backend=backend, device=device, gguf=gguf, precision=precision)
    if as_json:
        print_json(result.to_json())
        return
    for warning in result.warnings:
        warn(console(stderr=True), warning)
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
    if result.structure_weight is not None:
        notes.insert(1, f"score = cosine + structure model (weight {result.structure_weight:g})")
    table.caption = "; ".join(notes)
    console().print(table)


def evaluate(
    ctx: typer.Context,
    split: str = typer.Option("test", "--split", help="valid or test."),
    limit: int = typer.Option(0, "--limit", help="Evaluate a fixed-seed sample of N triples (0: all)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the --limit sample."),
    run: Optional[str] = run_option(),
    base: Optional[str] = base_option("Evaluate an untrained base model (the baseline): smollm2-135m, a folder, a .gguf, a hub id."),
    batch_size: int = typer.Option(64, "--batch-size", help="Texts per forward pass."),
    no_index: bool = typer.Option(False, "--no-index", help="Encode the entities here even when the entity index is fresh."),
    backend: str = backend_option("torch, or gguf: encode through the run's `kalmkg export` with llama.cpp (the vectors `predict --backend gguf` queries are made by; not faster than torch on a CPU)."),
    gguf: Optional[str] = gguf_option(),
    generative: bool = typer.Option(False, "--generative", help="Generation-based evaluation instead: tail, head and relation prediction and triple classification (3-shot, greedy), the run beside its untrained base."),
    device: str = device_option(),
    precision: str = precision_option(),
    as_json: bool = json_option("Print the result as JSON."),
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
      kalmkg evaluate --backend gguf               # queries through the run's export (llama.cpp)
    """
    from kalmkg.evaluation.link_prediction import evaluate_run
    from kalmkg.loaded import load_model, make_encoder

    if limit < 0:
        raise KalmkgError("--limit must be 0 (all) or a positive number of triples")
    if generative:
        if base is not None:
            raise KalmkgError("--generative evaluates a run beside its own base; drop --base (use --run)")
        _evaluate_generative(ctx.obj, run=run, split=split, limit=limit, seed=seed, device=device, as_json=as_json,
                             precision=precision)
        return
    stderr = console(stderr=True)
    loaded = load_model(ctx.obj, run=run, base=base, device=device, precision=precision)  # warnings: in `out`
    encoder = make_encoder(loaded, backend, gguf=gguf) if backend != "torch" else None
    with CountBar(stderr, quiet=as_json) as bar:
        out = evaluate_run(ctx.obj, split=split, limit=limit, seed=seed, batch_size=batch_size, device=device,
                           use_index=not no_index, loaded=loaded, encoder=encoder, progress=bar.stage)
    for warning in out.get("warnings", []):
        warn(stderr, warning)
    if as_json:
        print_json(out)
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
    for part, s in ((part, c["both"]) for part, c in out.get("components", {}).items()):
        table.add_row(f"both, {part} alone", f"{s['mrr']:.4f}", f"{s['hits@1']:.4f}", f"{s['hits@3']:.4f}",
                      f"{s['hits@10']:.4f}", f"{s['mr']:.1f}", f"{s['count']:,}", style="dim")
    vectors = "from the index" if t["entity_vectors"] == "index" else f"encoded in {t['entity_encoding_s']:.1f} s"
    fused = (f"text + structure model (weight {out['fusion']['weight']:g}, fitted on valid); "
             if out.get("fusion") else "")
    table.caption = (f"{fused}entity vectors {vectors}; queries encoded in {t['query_encoding_s']:.1f} s, "
                     f"ranked in {t['ranking_s']:.2f} s -> {out['eval_path']}")
    console().print(table)
    print_calibration(out)
    if out.get("index_not_used") and not no_index and t["entity_vectors"] != "index":
        stderr.print(f"note: entity index not used: {out['index_not_used']}", style="dim", soft_wrap=True)


def _evaluate_generative(workspace: Workspace, *, run, split, limit, seed, device, as_json, precision) -> None:
    """`evaluate --generative`: the run beside its base on the four generation tasks."""
    from kalmkg.evaluation.generative import TASKS, evaluate_generative

    with CountBar(console(stderr=True), quiet=as_json) as bar:
        out = evaluate_generative(workspace, run=run, split=split, limit=limit, seed=seed, device=device,
                                  progress=bar.stage, precision=precision)
    if as_json:
        print_json(out)
        return
    from rich.table import Table

    acc = out["accuracy"]
    table = Table(title=f"{out['model']} on {split}: generative, {out['triples']:,} triples, {out['shots']}-shot, greedy",
                  title_justify="left")
    table.add_column("task")
    for name in acc:
        table.add_column("untrained base" if name == "base" else "run", justify="right")
    names = {"tail": "tail prediction", "head": "head prediction", "relation": "relation prediction",
             "classification": "triple classification", "tail-completion": "tail, training's format",
             "head-completion": "head, training's format"}
    for task in TASKS:
        if task not in acc["run"]:  # the completion tasks need the run's entity texts
            continue
        table.add_row(names[task], *[f"{acc[name][task]['accuracy']:.1%}" for name in acc])
        if "true" in acc["run"][task]:
            table.add_row("  ... names a known answer", *[f"{acc[name][task]['true']:.1%}" for name in acc],
                          style="dim")
    table.caption = "accuracy: the held-out answer; a known answer: any of the query's, train included"
    console().print(table)
    console().print(f"answers: {out['predictions_path']}", soft_wrap=True)
