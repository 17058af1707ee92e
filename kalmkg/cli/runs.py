"""`kalmkg runs`: the workspace's training runs, listed, shown one at a time, compared side by side.
Read from the run folders (config.toml, metrics.jsonl, eval-*.json) and the store's run table; loads no
model."""

from __future__ import annotations

from typing import List, Optional

import typer

from kalmkg.cli.options import json_option
from kalmkg.cli.output import console, print_json
from kalmkg.errors import KalmkgError
from kalmkg.workspace import Workspace

app = typer.Typer(help="List, show and compare training runs.", no_args_is_help=False)


def _summaries(workspace: Workspace, ids: list[str] | None = None) -> list[dict]:
    from kalmkg import runs
    from kalmkg.export.registry import list_exports
    from kalmkg.store import Store

    folders = [runs.find_run(workspace, i) for i in ids] if ids else runs.all_runs(workspace)
    statuses: dict[str, str] = {}
    current = None
    if workspace.exists():
        with Store.open(workspace) as store:
            statuses, current = store.run_statuses(), store.fingerprint()
    exports: dict[str, list[str]] = {}
    for gguf, info in list_exports(workspace.models_dir):
        exports.setdefault(str(info.get("run_id")), []).append(gguf.name)
    out = []
    for folder in folders:
        summary = runs.run_summary(folder, statuses.get(folder.name), exports.get(folder.name))
        summary["graph_current"] = current is not None and summary["graph_fingerprint"] == current
        out.append(summary)
    return out


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return ""
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return f"{x:,}" if isinstance(x, int) and not isinstance(x, bool) else str(x)


def _evaluated(summary: dict, metric: str, split: str = "test") -> float | None:
    """A metric (both directions) of the run's `kalmkg evaluate --split SPLIT`; None if never evaluated."""
    result = summary["evaluations"].get(split) or {}
    return ((result.get("metrics") or {}).get("both") or {}).get(metric)


@app.callback(invoke_without_command=True)
def runs_command(ctx: typer.Context, as_json: bool = json_option("Print every run's summary as JSON.")) -> None:
    """Every training run of the workspace: status, steps, best validation MRR, test MRR, exports.

    \b
    Examples:
      kalmkg runs
      kalmkg runs show
      kalmkg runs compare 20261201-101500-demo 20261201-113000-long
    """
    if ctx.invoked_subcommand is not None:
        return
    workspace: Workspace = ctx.obj
    summaries = _summaries(workspace)
    if as_json:
        print_json(summaries)
        return
    if not summaries:
        raise KalmkgError(f"no training run in {workspace.root} (run `kalmkg train` first)")
    from rich.table import Table

    table = Table(title=f"Runs in {workspace.runs_dir}", title_justify="left")
    for col in ("run", "status", "created", "steps", "best valid MRR", "test MRR", "exports", "graph"):
        table.add_column(col, justify="left" if col in ("run", "status", "created", "exports", "graph") else "right",
                         overflow="fold", no_wrap=col in ("status", "created", "graph"))
    for s in summaries:
        best = (s["best_valid"] or {}).get("mrr")
        table.add_row(s["id"], s["status"] or "", s["created"], _fmt(s["steps"]), _fmt(best), _fmt(_evaluated(s, "mrr")),
                      ", ".join(s["exports"]), "current" if s["graph_current"] else "[yellow]changed since[/yellow]")
    console().print(table)


@app.command("show")
def show(ctx: typer.Context, run: Optional[str] = typer.Argument(None, help="Run id.", show_default="the latest run"),
         as_json: bool = json_option("Print the summary as JSON.")) -> None:
    """One run in full: its settings, how far it trained, validation and evaluation results.

    \b
    Example:
      kalmkg runs show 20261201-101500-demo --json
    """
    from kalmkg import runs

    workspace: Workspace = ctx.obj
    summary = _summaries(workspace, [run or runs.latest_run(workspace).name])[0]
    if as_json:
        print_json(summary)
        return
    from rich.table import Table

    out = console()
    head = Table(show_header=False, title=f"Run {summary['id']}", title_justify="left")
    head.add_column(style="bold")
    head.add_column(overflow="fold")
    best, last = summary["best_valid"] or {}, summary["last_valid"] or {}
    for name, value in (
        ("folder", summary["path"]), ("status", summary["status"] or "not in the store"), ("created", summary["created"]),
        ("base", summary["base"]), ("graph", "the store's current graph" if summary["graph_current"] else
                                    f"{summary['graph_fingerprint']} (the store holds another graph now)"),
        ("steps / epoch / examples", f"{_fmt(summary['steps'])} / {_fmt(summary['epoch'])} / {_fmt(summary['examples'])}"),
        ("training seconds", _fmt(summary["seconds"], 1)),
        ("last loss terms", "  ".join(f"{k} {_fmt(v)}" for k, v in summary["loss"].items() if v is not None)),
        ("best valid MRR", f"{_fmt(best.get('mrr'))} at step {best['step']}" if best else "no validation"),
        ("last valid MRR", f"{_fmt(last.get('mrr'))} at step {last['step']}" if last else ""),
        ("adapter / checkpoint", f"{'yes' if summary['adapter'] else 'no'} / {'yes' if summary['checkpoint'] else 'no'}"),
        ("exports", ", ".join(summary["exports"]) or "none"),
    ):
        head.add_row(name, str(value))
    out.print(head)
    if summary["evaluations"]:
        out.print(_evaluation_table(summary))
    settings = Table(title="Settings (config.toml \\[train])", title_justify="left", show_header=False)
    settings.add_column(style="bold")
    settings.add_column(overflow="fold")
    for k, v in summary["config"].items():
        settings.add_row(k, str(v))
    out.print(settings)


def _evaluation_table(summary: dict):
    from rich.table import Table

    table = Table(title="Evaluations (filtered, realistic ranks)", title_justify="left")
    for col in ("split", "direction", "triples", "MRR", "H@1", "H@3", "H@10", "MR"):
        table.add_column(col, justify="left" if col in ("split", "direction") else "right")
    for split, result in summary["evaluations"].items():
        for direction, m in (result.get("metrics") or {}).items():
            table.add_row(split, direction, _fmt(result.get("triples")), _fmt(m.get("mrr")), _fmt(m.get("hits@1")),
                          _fmt(m.get("hits@3")), _fmt(m.get("hits@10")), _fmt(m.get("mr"), 1))
    return table


# rows of `kalmkg runs compare`: (label, how to read it from a summary)
COMPARED = (
    ("status", lambda s: s["status"]),
    ("base", lambda s: s["base"]),
    ("steps", lambda s: s["steps"]),
    ("examples", lambda s: s["examples"]),
    ("training seconds", lambda s: s["seconds"]),
    ("best valid MRR", lambda s: (s["best_valid"] or {}).get("mrr")),
    ("best valid H@10", lambda s: (s["best_valid"] or {}).get("hits@10")),
    ("test MRR", lambda s: _evaluated(s, "mrr")),
    ("test H@1", lambda s: _evaluated(s, "hits@1")),
    ("test H@10", lambda s: _evaluated(s, "hits@10")),
    ("graph", lambda s: "current" if s["graph_current"] else "changed since"),
)


@app.command("compare")
def compare(ctx: typer.Context, run_ids: List[str] = typer.Argument(..., help="Two or more run ids."),
            as_json: bool = json_option("Print the metrics and the differing settings as JSON.")) -> None:
    """Runs side by side: their metrics, and the settings in which they differ.

    \b
    Example:
      kalmkg runs compare 20261201-101500-demo 20261201-113000-long
    """
    from kalmkg import runs

    if len(run_ids) < 2:
        raise KalmkgError("compare needs two or more run ids (see `kalmkg runs`)")
    summaries = _summaries(ctx.obj, run_ids)
    metrics = {label: [read(s) for s in summaries] for label, read in COMPARED}
    differences = runs.config_differences(summaries)
    if as_json:
        print_json({"runs": [s["id"] for s in summaries], "metrics": metrics, "settings_that_differ": differences})
        return
    from rich.table import Table

    table = Table(title="Runs compared", title_justify="left")
    table.add_column("")
    for s in summaries:
        table.add_column(s["id"], justify="right", overflow="fold")
    for label, values in metrics.items():
        table.add_row(label, *[_fmt(v) for v in values])
    if differences:
        table.add_section()
        for key, values in differences.items():
            table.add_row(f"[bold]{key}[/bold]", *[_fmt(v) for v in values])
    else:
        table.caption = "the runs' settings are the same"
    console().print(table)
