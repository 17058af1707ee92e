"""Where a graph's files live: one folder holds the store, vectors, runs and exported models."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

DEFAULT_WORKSPACE = ".kalmkg"
ENV_VAR = "KALMKG_WORKSPACE"


@dataclass(frozen=True)
class Workspace:
    root: Path

    @classmethod
    def resolve(cls, path: str | os.PathLike | None = None) -> "Workspace":
        """An explicit path wins, then $KALMKG_WORKSPACE, then ./.kalmkg."""
        chosen = path if path is not None else os.environ.get(ENV_VAR) or DEFAULT_WORKSPACE
        return cls(Path(chosen).expanduser().absolute())

    @property
    def db_path(self) -> Path:
        return self.root / "kg.duckdb"

    @property
    def runs_dir(self) -> Path:
        return self.root / "runs"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def vectors_dir(self) -> Path:
        return self.root / "vectors.lance"

    def exists(self) -> bool:
        return self.db_path.exists()
