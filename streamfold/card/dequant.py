"""The model card's account of ``--dequantize``: what was widened, how many elements are exact vs rounded,
and the size change."""
from __future__ import annotations

import math

from .table import dtype_names
from ..planning.dequant import output_of
from ..planning.planner import Kind, Plan
from ..quant.counts import counts_line, totals
from ..quant.intpack import PACKED


def dequant_note(plan: Plan, tensors: dict, counts: dict[str, list[int]] | None = None) -> str:
    """The card's paragraph on ``--dequantize``: what was widened, what is exact, the size change;
    ``counts``: ``{tensor: [exact, rounded]}`` as the conversion counted them."""
    deq = plan.dequant
    widened = [a for a in plan.actions.values() if a.kind == Kind.DEQUANT]
    folded = sum(1 for a in widened if a.norm is not None)
    out = {a.out_dtype for a in widened}
    before = sum(tensors[x].nbytes for qm in deq.widened.values() for x in qm.tensors)
    after = sum(math.prod(output_of(n, a, tensors[n].shape)[1]) * (4 if a.out_dtype == "F32" else 2)
                for n, a in plan.actions.items() if a.kind == Kind.DEQUANT)
    left = len(deq.quant.modules) - len(deq.widened)
    if counts is not None:
        e, r = totals(counts)
        tally = (f"Of their {e + r} elements, {e} are exact (the stored value is the exact product) and {r} "
                 "were rounded once. ")
    else:
        tally = ""
    return (f"The source is quantized (`{deq.quant.method}`). Converted with `--dequantize`: {len(widened)} quantized "
            f"weights were decoded to {dtype_names(out)} ({folded} folded with their norm: every element is the exact "
            f"product `q · s · g` of code, block scale and norm weight, rounded once to nearest-even; {len(widened) - folded} "
            "fused siblings or expert down projections widened so that loaders see one precision per fused layer: "
            "`q · s` rounded once, exact where it fits, e.g. power-of-two scales into bf16), and their scales dropped; "
            f"those weights grew from {before} to {after} bytes. " + tally
            + ("gpt-oss MXFP4 experts are written as transformers' dequantized parameters (`X` for `X_blocks` and "
               "`X_scales`, shaped `[experts, in, out]`). " if any(qm.layout == "mxfp4" for qm in deq.widened.values())
               else "")
            + ("Integer-packed weights (compressed-tensors `weight_packed`, GPTQ/AWQ `qweight`) are written as their "
               "logical `X.weight` `[out, in]`; their codes, scales and zero points are gone. "
               if any(qm.layout in PACKED for qm in deq.widened.values()) else "")
            + (f"{left} quantized modules are byte-for-byte copies, and `quantization_config` lists the widened ones "
               "as not converted." if left else "Nothing quantized is left, so `quantization_config` was removed."))


def made_lines(plan: Plan, counts: dict[str, list[int]] | None) -> list[str]:
    """The "How this checkpoint was made" list items of a ``--dequantize`` conversion (none otherwise):
    the counts line ``verify`` reads back (:func:`streamfold.quant.counts.parse_counts_line`)."""
    if plan.dequant is None or counts is None:
        return []
    return [counts_line(*totals(counts))]
