"""Where commands write: tables and lines through rich on stdout, progress and warnings on stderr, JSON as
plain text on stdout (so `| jq` always sees clean JSON)."""

from __future__ import annotations

import json
import sys


def console(stderr: bool = False):
    from rich.console import Console

    return Console(stderr=stderr, highlight=False)


def print_json(data) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")


def warn(console, text: str) -> None:
    """A library warning: one yellow line on the given (stderr) console."""
    console.print(f"warning: {text}", style="yellow", soft_wrap=True)
