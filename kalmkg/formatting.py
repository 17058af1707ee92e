"""Numbers as people read them in messages and reports."""

from __future__ import annotations


def human_size(n: float) -> str:
    """Bytes in SI units, as disk tools print them: 1.5 GB is 1.5e9 bytes."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
