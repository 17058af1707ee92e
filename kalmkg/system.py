"""Facts about this installation that messages and reports quote: package versions, folder sizes."""

from __future__ import annotations

import os
from pathlib import Path


def installed_version(dist: str) -> str:
    """The installed version of distribution `dist`, or "not installed"."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def folder_size(folder: Path) -> int:
    """Bytes in the files under `folder` (files that vanish meanwhile count as 0)."""
    total = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                total += (Path(root) / name).stat().st_size
            except OSError:
                pass
    return total
