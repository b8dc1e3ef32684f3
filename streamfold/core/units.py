"""Human-readable sizes for summaries and the model card."""
from __future__ import annotations


def human_bytes(n: int) -> str:
    """``1234567`` -> ``"1.23 MB"`` (decimal units, as download sizes are quoted)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
