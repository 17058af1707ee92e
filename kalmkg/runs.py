"""Run folders: `runs/<id>/` with config.toml, adapter, tokenizer, metrics.jsonl, checkpoint, plot.

Every file is written to a temporary name and renamed, so a killed process never leaves a
half-written config, checkpoint or adapter behind.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Iterator

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


# ------------------------------------------------------------------ atomic writes
def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` (a file or a folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    target = tmp / "payload"
    try:
        yield target
        if not target.exists():
            raise FileNotFoundError(f"nothing was written for {path}")
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            os.replace(path, old)
        os.replace(target, path)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


# ------------------------------------------------------------------ config.toml
def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def config_to_toml(sections: dict[str, dict[str, Any]]) -> str:
    """Tables of scalars and lists; a dict value becomes a sub-table `[section.key]`. None is left out:
    TOML has no null, and a missing key reads back as unset."""
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items() if v is not None and not isinstance(v, dict)]
        lines.append("")
        nested = {f"{name}.{k}": v for k, v in values.items() if isinstance(v, dict)}
        if nested:
            lines.append(config_to_toml(nested))
    return "\n".join(lines)


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
