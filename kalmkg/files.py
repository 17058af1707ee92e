"""Results written so that a reader sees the old or the new one, never half of one: a file replaced by a
rename after fsync, a folder staged beside its place and swapped in. Results get the mode the user's
umask gives (tempfile's 0600 files and 0700 folders would otherwise become the results' modes), and a
write that fails (a full disk, an interrupt) leaves the old result and no partial one.

A process killed with -9 runs no clean-up: what it staged stays behind under a name that carries its
pid, and the next write beside it removes the staging of processes that no longer run.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import secrets
import shutil
import socket
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


def check_output(path: Path, *, folder: bool, ours: Callable[[Path], bool] = lambda p: False) -> None:
    """Before a result replaces `path` (atomic_path): refuse a folder for a file and a file for a folder,
    and a folder holding what kalmkg did not write there (`ours` says what it did), so that no user
    folder is swapped away."""
    from kalmkg.errors import KalmkgError

    if not path.exists():
        return
    if path.is_dir() != folder:
        raise KalmkgError(f"{path} is a {'folder' if path.is_dir() else 'file'}: give a {'folder' if folder else 'file'} "
                          "path that is new or holds an earlier result")
    if folder and any(True for _ in path.iterdir()) and not ours(path):
        raise KalmkgError(f"{path} holds files kalmkg did not write there: give a new or empty folder")


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # not mkstemp, whose files are 0600: created like open() creates them, 0666 under the user's umask
    sweep_staging(path.parent, f".{path.name}.")
    tmp = path.parent / f".{path.name}.{os.getpid()}.{_HOST}{secrets.token_hex(4)}"
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
    sweep_staging(beside, prefix)
    while True:
        path = beside / f"{prefix}{os.getpid()}.{_HOST}{secrets.token_hex(4)}"
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` (a file or a folder). A file
    replaces a file in one rename; a folder is exchanged with the old one in one step where the system
    can (Linux), so there is no moment without either."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = staging_dir(path.parent, f".{path.name}.")
    target = tmp / "payload"
    try:
        yield target
        if not target.exists():
            raise FileNotFoundError(f"nothing was written for {path}")
        if not path.exists() or not (path.is_dir() or target.is_dir()):
            os.replace(target, path)
        elif not _exchange(target, path):  # the old one is now in tmp, removed below
            old = tmp / "old"  # elsewhere: two renames; only a kill between them leaves `path` missing
            os.replace(path, old)
            try:
                os.replace(target, path)
            except BaseException:
                os.replace(old, path)
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# A staged name is prefix + pid + "." + this host's tag + 8 random hex digits: pids are only compared on
# the host (and pid namespace, by its host name) that made them.
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:4]


def sweep_staging(beside: Path, prefix: str) -> None:
    """Remove what processes of this host that no longer run staged in `beside` under `prefix`."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\." + _HOST + r"[0-9a-f]{8}")
    try:
        entries = list(os.scandir(beside))
    except OSError:
        return
    for entry in entries:
        match = pattern.fullmatch(entry.name)
        if match is None or _running(int(match.group(1))):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            try:
                os.unlink(entry.path)
            except OSError:
                pass


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux's renameat2 with RENAME_EXCHANGE); False where it is not there."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    renameat2 = getattr(libc, "renameat2", None)  # glibc >= 2.28
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # a file system or kernel without it
        return False
    raise OSError(err, os.strerror(err), str(b))
