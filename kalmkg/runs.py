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
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    with open(run / "config.toml", "rb") as fh:
        return tomllib.load(fh)


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
