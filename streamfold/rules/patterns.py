"""Rule patterns against tensor names: ``{n}``/``{e}`` placeholders, consumer expansion (layouts: ``layout``).

A family's rules (:mod:`streamfold.rules.schema`) name tensors by patterns such as
``model.layers.{n}.mlp.experts.{e}.up_proj``; the planner and ``detect`` both match them against a
checkpoint's tensor names with these helpers, so the two never disagree on what a pattern means.
"""
from __future__ import annotations

import bisect
import re
from dataclasses import dataclass

from ..core.errors import StreamfoldError
from ..core.reader import TensorInfo


@dataclass
class Consumer:
    """A linear that reads a norm's output: its weight is scaled along ``axis``."""

    weight: str
    axis: int
    bias: str | None = None
    tile: int = 1  # the consumer reads k norm outputs side by side (a patch merger): the scale tiled k times



def common_tile(norm: str, consumers: list[Consumer]) -> int:
    """The tiling every consumer of ``norm`` shares (1: none); mixed tilings are refused."""
    tiles = {c.tile for c in consumers}
    if len(tiles) > 1:
        raise StreamfoldError(f"rules: norm {norm!r} feeds consumers with different tilings {sorted(tiles)}")
    return tiles.pop() if tiles else 1


def stars(rule: str) -> str:
    """A rule's pattern in the notation of consumer patterns: ``layers.{n}.norm`` -> ``layers.*.norm``."""
    return re.sub(r"\{[a-z]+\}", "*", rule)


def generalize(name: str) -> str:
    """A tensor name with its layer/expert numbers as ``*``: ``layers.3.mlp`` -> ``layers.*.mlp``."""
    return re.sub(r"\.\d+\.", ".*.", re.sub(r"\.\d+\.", ".*.", name))


def pattern_regex(pattern: str) -> re.Pattern:
    """A compiled pattern: each ``{key}`` matches digits; a key used twice must match the same digits."""
    seen: set[str] = set()

    def sub(m: re.Match) -> str:
        key = m.group(1)
        if key in seen:
            return f"(?P={key})"
        seen.add(key)
        return f"(?P<{key}>\\d+)"
    return re.compile(re.sub(r"\\\{([a-z]+)\\\}", sub, re.escape(pattern)) + r"\Z")


def config_get(cfg: dict, key: str, default=None):
    """``cfg[key]``, else the multimodal wrapper's ``text_config[key]``, else ``default``. A dotted key
    names a sub-config's field (``text_config.model_type``: the wrapper's language model type)."""
    if key in cfg:
        return cfg[key]
    head, dot, rest = key.partition(".")
    if dot:
        sub = cfg.get(head)
        return config_get(sub, rest, default) if isinstance(sub, dict) else default
    text = cfg.get("text_config")
    if isinstance(text, dict) and key in text:
        return text[key]
    return default


def natural_key(name: str) -> list:
    """Sort key that orders ``layers.2`` before ``layers.10`` (digit runs compare as numbers)."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def present(name: str, tensors: dict) -> str | None:
    """``name`` if the checkpoint has that tensor, else None."""
    return name if name in tensors else None


def looks_like_norm(name: str) -> bool:
    """Whether a tensor name reads as a norm's weight or bias (``...norm.weight``, ``ln_f.bias``)."""
    parts = name.split(".")
    return len(parts) >= 2 and ("norm" in parts[-2] or parts[-2].startswith("ln")) \
        and parts[-1] in ("weight", "bias")


def expand_consumer(consumer, groups: dict, tensors: dict[str, TensorInfo], names: list[str]) -> list[Consumer] | None:
    """Concrete consumers for one pattern, or None when absent from the checkpoint. ``names`` is the
    sorted tensor names: an ``{e}`` pattern scans only those sharing its literal prefix."""
    if isinstance(consumer, str):
        weight, axis, bias = consumer + ".weight", -1, consumer + ".bias"
    else:
        weight, axis, bias = consumer["weight"], consumer.get("axis", -1), consumer.get("bias")
    tile = 1 if isinstance(consumer, str) else consumer.get("tile", 1)
    for key, val in groups.items():
        if val is not None:
            weight = weight.replace("{" + key + "}", val)
            bias = bias.replace("{" + key + "}", val) if bias else bias
    if "{e}" not in weight:
        return [Consumer(weight, axis, bias if bias in tensors else None, tile)] if weight in tensors else None
    rx = pattern_regex(weight)
    prefix = weight.split("{e}", 1)[0]
    found = []
    for t in names[bisect.bisect_left(names, prefix):]:
        if not t.startswith(prefix):
            break
        m = rx.match(t)
        if m:
            b = bias.replace("{e}", m.group("e")) if bias else None
            found.append(Consumer(t, axis, b if b in tensors else None, tile))
    found.sort(key=lambda c: natural_key(c.weight))
    return found or None
