"""Where a graph's files live: one folder holds the store, vectors, runs and exported models; and the
lock that lets one command at a time write there."""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from kalmkg.errors import WorkspaceBusy

DEFAULT_WORKSPACE = ".kalmkg"
ENV_VAR = "KALMKG_WORKSPACE"
WRITER_LOCK = "writer.lock"


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

    @contextmanager
    def writer(self, command: str, create: bool = False) -> Iterator[None]:
        """Hold the workspace's writer lock while `command` runs: a second writing command (ingest,
        split, train, embed, export) gets "workspace is busy", naming the one that writes. The lock is
        the kernel's (flock), so a process that dies, even by kill -9, lets it go. Readers take no lock.
        Not re-entrant: the CLI takes it once per command. No lock where flock is missing (Windows), nor
        for a workspace that does not exist unless `create` (the command then fails on its own)."""
        try:
            import fcntl
        except ImportError:
            fcntl = None
        if fcntl is None or not (create or self.root.is_dir()):
            yield
            return
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / WRITER_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise WorkspaceBusy(f"workspace is busy: {_holder(fd)} is writing {self.root} "
                                    "(wait for it to finish)") from None
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps({"command": command, "pid": os.getpid(),
                                     "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
            yield
        finally:
            os.close(fd)


def _holder(fd: int) -> str:
    """Who holds the lock, as its holder wrote it."""
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"`kalmkg {info['command']}` (pid {info['pid']}, since {info['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another kalmkg command"
