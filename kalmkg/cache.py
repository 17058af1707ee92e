"""Where kalmkg keeps what it can rebuild: converted base models, llama.cpp builds, self-test verdicts.

Standard library only: the llama.cpp build step imports it before kalmkg's dependencies are installed.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "KALMKG_CACHE"


def cache_root() -> Path:
    """``$KALMKG_CACHE``, else ``$XDG_CACHE_HOME/kalmkg`` (``~/.cache/kalmkg``)."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "kalmkg"
