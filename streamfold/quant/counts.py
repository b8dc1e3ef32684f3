"""Dequantized-element counts: how many elements are exact (the stored value IS ``q·s·g``), how many rounded.

Counted per band as it is produced (:mod:`streamfold.run.dequant_count`), carried per shard
(``{tensor: [exact, rounded]}``) through the engine, Ray, the resume journal and ``--stream``, merged
here, stated on the model card in :func:`counts_line`, which ``verify`` reads back with
:func:`parse_counts_line` and compares with its own recount (its oracle's exact mask).
"""
from __future__ import annotations

import re
from typing import Iterable

_LINE = re.compile(r"^- dequantized elements: (\d+) \((\d+) exact, (\d+) rounded once\)$", re.M)


def merge_counts(per_shard: Iterable[dict | None]) -> dict[str, list[int]] | None:
    """One ``{tensor: [exact, rounded]}`` from many shards' (None entries skipped; None if all are)."""
    out: dict[str, list[int]] = {}
    seen = False
    for d in per_shard:
        if d is None:
            continue
        seen = True
        for k, (e, r) in d.items():
            t = out.setdefault(k, [0, 0])
            t[0] += int(e)
            t[1] += int(r)
    return out if seen else None


def totals(counts: dict[str, list[int]] | None) -> tuple[int, int]:
    """``(exact, rounded)`` summed over every tensor (0, 0 for None)."""
    if not counts:
        return 0, 0
    return sum(int(v[0]) for v in counts.values()), sum(int(v[1]) for v in counts.values())


def counts_line(exact: int, rounded: int) -> str:
    """The model card's line stating the counts (one Markdown list item)."""
    return f"- dequantized elements: {exact + rounded} ({exact} exact, {rounded} rounded once)"


def parse_counts_line(text: str) -> tuple[int, int] | None:
    """``(exact, rounded)`` from a card's :func:`counts_line` (None: the card has none, or it does not add up)."""
    m = _LINE.search(text)
    if m is None:
        return None
    n, e, r = (int(x) for x in m.groups())
    return (e, r) if e + r == n else None
