"""Run folders: `runs/<id>/` with config.toml, adapter, tokenizer, metrics.jsonl, checkpoint, plot.

Every file is written to a temporary name and renamed, so a killed process never leaves a
half-written config, checkpoint or adapter behind.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from kalmkg.errors import KalmkgError
from kalmkg.workspace import Workspace


def new_run_id(base: str) -> str:
    short = re.sub(r"[^A-Za-z0-9]+", "-", Path(base).name if os.sep in base else base.split("/")[-1]).strip("-")
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{short.lower()[:24] or 'run'}"


def run_dir(workspace: Workspace, run_id: str) -> Path:
    return workspace.runs_dir / run_id


def latest_run(workspace: Workspace) -> Path:
    """The most recently created run folder that has a config."""
    runs = sorted(p.parent for p in workspace.runs_dir.glob("*/config.toml")) if workspace.runs_dir.exists() else []
    if not runs:
        raise KalmkgError(f"no training run in {workspace.root} (run `kalmkg train` first)")
    return max(runs, key=lambda p: (p / "config.toml").stat().st_mtime)


def find_run(workspace: Workspace, run: str | None) -> Path:
    if run is None:
        return latest_run(workspace)
    path = run_dir(workspace, run)
    if not (path / "config.toml").exists() and (Path(run) / "config.toml").exists():
        path = Path(run)  # a run folder given by its path
    if not (path / "config.toml").exists():
        raise KalmkgError(f"no run '{run}' in {workspace.runs_dir} (see `kalmkg train`)")
    return path


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


# ------------------------------------------------------------------ config.toml
def config_to_toml(sections: dict[str, dict[str, Any]]) -> str:
    """Tables of scalars and lists through tomli-w; a dict value, or a dotted section name, becomes a
    sub-table `[section.key]`. None is left out: TOML has no null, and a missing key reads back as
    unset. Values of other types (paths) are written as their text."""
    import tomli_w

    tables: dict[str, Any] = {}
    for name, values in sections.items():
        table = tables
        for part in name.split("."):
            table = table.setdefault(part, {})
        table.update(_toml_table(values))
    return tomli_w.dumps(tables)


def _toml_table(values: dict[str, Any]) -> dict[str, Any]:
    return {k: _toml_item(v) for k, v in values.items() if v is not None}


def _toml_item(v: Any) -> Any:
    if isinstance(v, dict):
        return _toml_table(v)
    if isinstance(v, (list, tuple)):
        return [_toml_item(x) for x in v]
    return v if isinstance(v, (bool, int, float, str)) else str(v)


def read_config(run: Path) -> dict[str, dict[str, Any]]:
    return read_toml(run / "config.toml")


def read_toml(path: Path) -> dict[str, Any]:
    """A TOML file's tables; a file missing or not TOML is one error line."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise KalmkgError(f"no such file: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise KalmkgError(f"{path} is not TOML: {exc}") from None


def dataclass_from(cls, values: dict[str, Any]):
    """Build a config dataclass from a TOML table, ignoring keys it does not know."""
    known = {f.name: f for f in fields(cls)}
    kwargs = {}
    for k, v in values.items():
        if k in known:
            kwargs[k] = tuple(v) if isinstance(v, list) else v
    return cls(**kwargs)


def as_dict(config) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(config).items()}


# ------------------------------------------------------------------ following and comparing runs
def all_runs(workspace: Workspace) -> list[Path]:
    """Every run folder with a config, oldest first."""
    if not workspace.runs_dir.is_dir():
        return []
    return sorted((p.parent for p in workspace.runs_dir.glob("*/config.toml")),
                  key=lambda p: ((p / "config.toml").stat().st_mtime, p.name))


def read_metrics(run: Path) -> list[dict]:
    """metrics.jsonl's records; a last line cut by a killed process is left out."""
    try:
        lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return [r for r in records if isinstance(r, dict)]


def run_summary(run: Path, status: str | None = None, exports: list[str] | None = None) -> dict[str, Any]:
    """What one run is and how far it got, from its folder: config, training progress (steps, epochs,
    seconds, the last loss terms), validation (the best and the last), and every `kalmkg evaluate`
    result (eval-<split>.json). `status` comes from the store's run table when the caller has it."""
    config = read_config(run)
    train = config.get("train", {})
    records = read_metrics(run)
    steps = [r for r in records if "loss" in r and "step" in r]
    validations = [r for r in records if isinstance(r.get("valid"), dict)]
    best = max(validations, key=lambda r: _number(r["valid"].get("mrr"))) if validations else None
    evaluations = {}
    for path in sorted(run.glob("eval-*.json")):
        try:
            result = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        evaluations[path.stem.removeprefix("eval-")] = {
            "triples": result.get("triples"), "metrics": result.get("metrics"), "created_at": result.get("created_at")}
    last = steps[-1] if steps else {}
    return {
        "id": run.name, "path": str(run), "status": status,
        "created": time.strftime("%Y-%m-%d %H:%M", time.localtime((run / "config.toml").stat().st_mtime)),
        "base": config.get("base", {}).get("name") or train.get("base"),
        "graph_fingerprint": config.get("graph", {}).get("fingerprint"),
        "steps": last.get("step", 0), "epoch": last.get("epoch"),
        "examples": last.get("step", 0) * train.get("batch_size", 0) * train.get("grad_accum", 1),
        "seconds": validations[-1].get("seconds") if validations else None,
        "loss": {k: v for k, v in last.items() if k.startswith("loss") or k.startswith("l_")},
        "best_valid": {"step": best["step"], **best["valid"]} if best else None,
        "last_valid": {"step": validations[-1]["step"], **validations[-1]["valid"]} if validations else None,
        "evaluations": evaluations,
        "adapter": (run / "adapter" / "adapter_model.safetensors").is_file(),
        "checkpoint": (run / "checkpoint").is_dir(),
        "exports": exports or [],
        "graph_changed": any(r.get("event") == "graph_changed" for r in records),
        "config": train,
    }


def _number(x) -> float:
    return float(x) if isinstance(x, (int, float)) else float("-inf")


def config_differences(summaries: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """The training settings that are not the same in every run, with each run's value (None: unset)."""
    keys = sorted({k for s in summaries for k in s["config"]})
    values = {k: [s["config"].get(k) for s in summaries] for k in keys}
    return {k: v for k, v in values.items() if any(x != v[0] for x in v)}
