"""What ``verify`` found: :class:`Problem` (one failed check) and :class:`VerifyReport` (everything).

Also the small formatting helpers the checks share, so every message names elements the same way
(``[row, col]`` indexes, distances in ulps).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

from ..rules.patterns import natural_key

EXIT_FAILED = 3  # CLI exit status when verification finds problems
CHECK_ORDER = ("config", "layout", "index", "tensor", "files", "manifest", "forward")  # report order


@dataclass
class Problem:
    """One failed check: ``subject`` (a tensor or file name) and what is wrong with it."""

    check: str  # config | layout | index | tensor | files | manifest | forward
    subject: str
    message: str

    def __str__(self) -> str:
        return f"{self.subject}: {self.message}"


def sort_problems(problems: list[Problem]) -> None:
    """In report order: by check (:data:`CHECK_ORDER`), then naturally by subject."""
    problems.sort(key=lambda p: (CHECK_ORDER.index(p.check) if p.check in CHECK_ORDER else len(CHECK_ORDER),
                                 natural_key(p.subject)))


def fmt_index(flat: int, shape: tuple[int, ...]) -> str:
    """A flat element index as ``[i, j, ...]`` in ``shape``."""
    return "[" + ", ".join(str(int(i)) for i in np.unravel_index(flat, shape)) + "]" if shape else "[]"


def fmt_ulps(x: float) -> str:
    return "not finite" if not math.isfinite(x) else f"{x:.3g} ulp"


@dataclass
class VerifyReport:
    """Everything verify checked and every problem it found; ``ok`` when there are none."""

    src: str
    dst: str
    mode: str | None
    merged_dtype: str | None
    family: str
    model_type: str
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    bytes_read: int = 0
    seconds: float = 0.0
    workers: int = 1
    manifest: str = "absent"  # ok | failed | absent
    folds_rounded: bool = True  # folded weights stored in bf16/fp16 (else float32/64: no rounding)
    forward: dict | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d

    def summary(self, max_lines: int = 200) -> str:
        c = self.counts
        lines = [f"streamfold verify: {self.src} -> {self.dst} ({self.model_type}, mode {self.mode or '?'}, "
                 f"merged dtype {self.merged_dtype or '?'})"]
        shown = self.problems[:max_lines]
        for p in shown:
            lines.append(f"  FAIL  {p}")
        if len(self.problems) > len(shown):
            lines.append(f"  ... and {len(self.problems) - len(shown)} more problems (use --json for all)")
        lines.append(f"  checked: {c.get('unchanged', 0)} tensors byte-identical (of them "
                     f"{c.get('kept_norms', 0)} norms that cannot fold), {c.get('folded', 0)} folded "
                     f"(every element bit-identical to the exact product rounded once), "
                     f"{c.get('identity', 0)} norms identity, {c.get('absent', 0)} absent, "
                     f"{c.get('biases', 0)} biases, "
                     + (f"{c['dequantized']} dequantized (every element the exact q*s*g rounded once, "
                        f"{c.get('scales_dropped', 0)} scale tensors dropped), " if c.get("dequantized") else "")
                     + f"{c.get('files', 0)} other files; "
                     f"manifest {self.manifest}")
        if "dequant_exact" in c:
            lines.append(f"  dequantized elements: {c['dequant_exact'] + c['dequant_rounded']} ({c['dequant_exact']} "
                         f"exact, {c['dequant_rounded']} rounded once), as the model card states")
        for n in self.notes:
            lines.append(f"  note: {n}")
        if self.forward is not None and "skipped" not in self.forward:
            f = self.forward
            lines.append(f"  forward ({f['tokens']} tokens, float32 numpy): max |logit error| "
                         f"{f['max_abs_error']:.3g} (relative {f['max_rel_error']:.3g}), min cosine "
                         f"{f['min_cosine']:.6f}, argmax agreement {f['argmax_agreement'] * 100:.1f}%")
        verdict = "PASS" if self.ok else f"FAIL ({len(self.problems)} problem{'s' if len(self.problems) != 1 else ''})"
        from ..core.units import human_bytes
        lines.append(f"{verdict}  ({human_bytes(self.bytes_read)} read in {self.seconds:.2f} s, "
                     f"{self.workers} worker{'s' if self.workers != 1 else ''})")
        return "\n".join(lines)
