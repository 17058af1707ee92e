"""Results written so that a reader sees the old or the new one, never half of one: a file replaced by a
rename after fsync, a folder staged beside its place and swapped in. Results get the mode the user's
umask gives (tempfile's 0600 files and 0700 folders would otherwise become the results' modes), and a
write that fails (a full disk, an interrupt) leaves the old result and no partial one.
"""

from __future__ import annotations

import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # not mkstemp, whose files are 0600: created like open() creates them, 0666 under the user's umask
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk or an interrupt leaves the old file and no partial one
        raise


def staging_dir(beside: Path, prefix: str) -> Path:
    """A new, empty folder in `beside` for staging a result that a rename then puts in place. Not
    mkdtemp, whose folders are 0700 (a staged folder that becomes the result would keep that mode):
    os.mkdir gives 0777 under the user's umask."""
    beside.mkdir(parents=True, exist_ok=True)
    while True:
        path = beside / f"{prefix}{os.getpid()}.{secrets.token_hex(6)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` (a file or a folder)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(path.parent, f".{path.name}.")
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
