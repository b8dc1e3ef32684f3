"""The model card's table of changes: one row per norm rule and per group of consumers it scaled.

Tensor names are grouped the way a reader scans them: layer and expert numbers as ``*``, names that
differ in one dotted component merged (``self_attn.{q,k,v}_proj.weight``).
"""
from __future__ import annotations

import os
import re

from ..rules.patterns import generalize, stars
from ..planning.planner import Kind

_DTYPE = {"BF16": "bf16", "F16": "fp16", "F32": "fp32", "F64": "fp64"}


def _brace_values(values: list[str]) -> str:
    pre = os.path.commonprefix(values)
    suf = os.path.commonprefix([v[len(pre):][::-1] for v in values])[::-1]
    mids = [v[len(pre):len(v) - len(suf)] for v in values]
    if any(not m for m in mids):
        pre, suf, mids = "", "", values
    return f"{pre}{{{','.join(mids)}}}{suf}"


def merge_patterns(patterns: list[str]) -> list[str]:
    """Merge names that differ in one dotted component: ``a.q_proj.w, a.k_proj.w`` -> ``a.{q,k}_proj.w``."""
    items = [p.split(".") for p in dict.fromkeys(patterns)]
    changed = True
    while changed:
        changed = False
        for i in range(max((len(p) for p in items), default=0) - 1, -1, -1):
            groups: dict[tuple, list[list[str]]] = {}
            order: list[tuple] = []
            for p in items:
                key = (len(p), tuple(p[:i]), tuple(p[i + 1:])) if i < len(p) else (len(p), tuple(p), None)
                if key not in groups:
                    order.append(key)
                groups.setdefault(key, []).append(p)
            merged = []
            for key in order:
                g = groups[key]
                if len(g) > 1 and key[2] is not None:
                    merged.append(g[0][:i] + [_brace_values([p[i] for p in g])] + g[0][i + 1:])
                    changed = True
                else:
                    merged.extend(g)
            items = merged
    return [".".join(p) for p in items]


def dtype_names(dtypes) -> str:
    """Short dtype names joined: ``{'BF16', 'F32'}`` -> ``bf16/fp32``."""
    return "/".join(sorted(_DTYPE.get(d, d.lower()) for d in set(dtypes)))


def _short(rule: str) -> str:
    parts = [p for p in rule.split(".") if not re.fullmatch(r"\{[a-z]+\}|model|layers|\d+", p)]
    if not parts:
        return rule
    return "_".join(parts[-2:]) if parts[-1] == "norm" and len(parts) > 1 else (
        "model_norm" if parts[-1] == "norm" else parts[-1])


def change_rows(plan, tensors) -> list[tuple[str, str, str]]:
    """(tensor, source, this checkpoint) rows describing every change the plan makes."""
    groups: dict[tuple, list] = {}
    for n in plan.norms:
        groups.setdefault((n.rule, n.status, n.reason), []).append(n)
    identity = "all ones" if plan.offset == 0 else "all zeros (the norm computes `(1 + w) * x`)"
    rows = []
    for (rule, status, reason), norms in groups.items():
        count = f" (x{len(norms)})" if len(norms) > 1 else ""
        norm_t = f"`{stars(rule)}.weight`{count}"
        g_dt = dtype_names(tensors[n.weight].dtype for n in norms)
        if status != "fold":
            rows.append((norm_t, f"learned `g` ({g_dt})", f"unchanged: {reason}"))
            continue
        rows.append((norm_t, f"learned per-channel `g` ({g_dt})",
                     "removed" if plan.mode == "strict" else f"{identity} ({g_dt})"))
        if any(n.bias for n in norms):
            rows.append((f"`{stars(rule)}.bias`", "learned `β`",
                         "removed" if plan.mode == "strict" else "all zeros"))
        pats = merge_patterns([generalize(c.weight) for n in norms for c in n.consumers])
        weights = [_stored(plan, c.weight) for n in norms for c in n.consumers]
        src_dt = dtype_names(tensors[w].dtype for w in weights)
        out_dt = dtype_names(plan.actions[w].out_dtype for w in weights)
        g = f"g_{_short(rule)}"
        rows.append((", ".join(f"`{p}`" for p in pats), f"`W` ({src_dt})", f"`W · diag({g})` ({out_dt})"))
        biases = [c.bias for n in norms for c in n.consumers
                  if c.bias and plan.actions.get(c.bias) is not None and plan.actions[c.bias].kind == Kind.BIAS]
        if biases:
            bp = merge_patterns([generalize(b) for b in biases])
            rows.append((", ".join(f"`{p}`" for p in bp), "`b`", "`b + W · β` (the norm's bias, folded)"))
    return rows


def _stored(plan, weight: str) -> str:
    """The source tensor a consumer's weight is stored as (gpt-oss MXFP4: ``X_blocks`` for ``X``)."""
    qm = plan.quant.consumer(weight) if weight not in plan.actions and plan.quant is not None else None
    return qm.weight if qm is not None else weight
