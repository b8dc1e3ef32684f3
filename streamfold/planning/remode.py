"""Plan a checkpoint that may already be FlashNorm: fold it, say there is nothing to do, or change its mode.

:func:`plan_checkpoint` is the planner convert and inspect call. A checkpoint with norms to fold gets
:func:`streamfold.planning.planner.make_plan`. One that is already folded (see :mod:`streamfold.planning.detect`) gets:

- :class:`AlreadyFlashNorm` when the request changes nothing (no ``mode``, or its own mode);
- a refusal of ``merged_dtype="float32"``: its folded weights were rounded when it was made (or are
  float32 already), and the unrounded products need the original norms;
- otherwise a mode change that touches no weight: compat -> strict drops the identity norms (their
  values were checked to be the identity by detect); strict -> compat restores an identity norm for
  every norm the rules say was folded (``Plan.added``): ones for ``w`` norms, zeros for ``1 + w``,
  and a zero LayerNorm bias for families whose LayerNorm has one. Its dtype is the dtype the source's
  norms had, read from the checkpoint: a present norm of the same rule, else any other norm tensor
  left in it (kept norms), else config ``torch_dtype`` / ``dtype``, else the commonest dtype of the
  tensors that are not folded weights (those may be float32 from ``--merged-dtype float32``). Each is
  placed in the shard of its first consumer.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .detect import NORM_BIAS_FAMILIES, FlashNormState, detect
from ..core.errors import AlreadyFlashNorm, StreamfoldError
from ..core.files import FLASHNORM_VERSION
from ..rules.patterns import config_get, looks_like_norm
from .planner import MERGED_ALIASES, MODES, Action, NormPlan, Plan, make_plan
from ..core.reader import TensorInfo
from ..quant.formats import classify
from .compose import resolve

_TORCH_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32", "float64": "F64"}


@dataclass(frozen=True)
class NewTensor:
    """A tensor the output gains (an identity norm restored): created in ``shard``, filled with ``value``."""

    name: str
    shard: str
    dtype: str
    shape: tuple[int, ...]
    value: float


def plan_checkpoint(cfg: dict, tensors: dict[str, TensorInfo], read: Callable[[str], np.ndarray] | None, *,
                    mode: str | None = None, merged_dtype: str | None = None, rules: dict | None = None,
                    shard_of: dict[str, str] | None = None, src: str = "the checkpoint",
                    dequantize=None, fold_vision: bool = False) -> Plan:
    """The plan for converting ``tensors``: a fold, or a mode change of an already-FlashNorm checkpoint.

    ``mode`` / ``merged_dtype`` None mean the defaults (``compat`` / ``source``), and for an already
    folded checkpoint "keep its mode". Raises :class:`AlreadyFlashNorm` when nothing would change, and
    :class:`StreamfoldError` for requests that cannot be met. ``shard_of`` maps tensor names to shard
    files (default: each header's file name); ``src`` names the checkpoint in messages."""
    if mode not in (None, *MODES):
        raise StreamfoldError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    if merged_dtype is not None:  # aliases (fp32, bf16, ...) as make_plan takes them
        want = MERGED_ALIASES.get(str(merged_dtype).lower())
        if want is None:
            raise StreamfoldError(f"merged dtype must be one of {', '.join(MERGED_ALIASES)}, not {merged_dtype!r}")
        merged_dtype = want
    if not isinstance(cfg.get("model_type"), str):  # make_plan says what is wrong
        return make_plan(cfg, tensors, read, mode=mode or "compat", merged_dtype=merged_dtype or "source",
                         rules=rules, dequantize=dequantize, fold_vision=fold_vision)
    state = detect(cfg, tensors, read, rules)
    if state.inconsistent:
        raise StreamfoldError(f"{src}: {state.inconsistent}")
    if not state.folded:
        return make_plan(cfg, tensors, read, mode=mode or "compat", merged_dtype=merged_dtype or "source",
                         rules=rules, dequantize=dequantize, fold_vision=fold_vision)
    if fold_vision and cfg.get("flashnorm_vision") is not True:
        raise StreamfoldError(f"{src}: --fold-vision: this is already a FlashNorm checkpoint ({state.how}) whose vision "
                              "tower was not folded; streamfold folds a tower only with its language model, from the "
                              "original: convert the original checkpoint with --fold-vision")
    quant = classify(cfg, tensors)  # refuses what cannot be classified; quantized tensors are copied
    if merged_dtype == "float32":
        dts = sorted({tensors[c.weight].dtype for n in state.norms for c in n.consumers})
        why = ("they are float32 already (it was converted with --merged-dtype float32)" if dts == ["F32"] else
               f"they were rounded to {'/'.join(dts)} when it was made")
        raise StreamfoldError(f"{src}: --merged-dtype float32 cannot be applied: this is already a FlashNorm "
                              f"checkpoint ({state.how}) and its folded weights cannot be recovered unrounded "
                              f"({why}); convert the original checkpoint with --merged-dtype float32")
    if mode is None or mode == state.mode:
        raise AlreadyFlashNorm(state.line(src), state)
    version = state.flags.get("flashnorm_version")
    if version is not None and version != FLASHNORM_VERSION:
        raise StreamfoldError(f"{src}: config.json has flashnorm_version {version!r}; this streamfold understands "
                              f"version {FLASHNORM_VERSION} only, so it will not change the mode")
    fam = resolve(cfg, tensors, rules).fam
    if mode == "strict" and fam.get("strict_refused"):
        raise StreamfoldError(f"{state.model_type}: strict mode is not exact for this architecture "
                              f"({fam['strict_refused']}); use --mode compat")
    plan = _remode(state, cfg, tensors, mode, shard_of or {n: t.path.name for n, t in tensors.items()})
    plan.quant = quant
    plan.vision = cfg.get("flashnorm_vision") is True  # the tower was folded with it: the flag carries over
    return plan


def _norm_dtype(state: FlashNormState, rule: str, cfg: dict, tensors: dict[str, TensorInfo]) -> str:
    """The dtype a restored norm gets (see the module docstring for the order of evidence)."""
    same = [n.dtype for n in state.norms if n.rule == rule and n.dtype]
    if same:
        return same[0]
    present = [n.dtype for n in state.norms if n.dtype]
    if present:
        return present[0]
    consumers = {c.weight for n in state.norms for c in n.consumers}
    kept = [t.dtype for name, t in tensors.items() if looks_like_norm(name) and len(t.shape) == 1
            and name not in consumers]
    if kept:
        return Counter(kept).most_common(1)[0][0]
    for key in ("torch_dtype", "dtype"):
        got = _TORCH_DTYPES.get(str(config_get(cfg, key)).replace("torch.", ""))
        if got:
            return got
    rest = Counter(t.dtype for name, t in tensors.items() if name not in consumers and t.dtype in _TORCH_DTYPES.values())
    return rest.most_common(1)[0][0] if rest else "F32"


def _has_bias(state: FlashNormState, rule: str) -> bool:
    same = [n.bias for n in state.norms if n.rule == rule and n.status != "absent"]
    return same[0] if same else state.family in NORM_BIAS_FAMILIES


def _remode(state: FlashNormState, cfg: dict, tensors: dict[str, TensorInfo], mode: str,
            shard_of: dict[str, str]) -> Plan:
    norms: list[NormPlan] = []
    actions: dict[str, Action] = {}
    added: list[NewTensor] = []
    for n in state.norms:
        bias = n.name + ".bias"
        absent = n.status == "absent"
        has_bias = n.bias or (absent and mode == "compat" and (n.norm_bias or _has_bias(state, n.rule)))
        if mode == "strict":
            what = "already folded: absent" if absent else "already folded: identity norm removed"
        else:
            what = "already folded: identity norm restored" if absent else "already folded: identity norm kept"
        p = NormPlan(n.rule, n.name, n.weight, bias if has_bias else None, "fold", what, list(n.consumers))
        norms.append(p)
        if mode == "strict":
            for t in (n.weight, bias):
                if t in tensors:
                    actions[t] = Action("drop", tensors[t].dtype, p)
        elif absent:
            shard, dtype = shard_of[n.consumers[0].weight], _norm_dtype(state, n.rule, cfg, tensors)
            added.append(NewTensor(n.weight, shard, dtype, (n.width,),
                                   1.0 - (state.offset if n.offset is None else n.offset)))
            if has_bias:
                added.append(NewTensor(bias, shard, dtype, (n.width,), 0.0))
    for name, t in tensors.items():
        actions.setdefault(name, Action("copy", t.dtype))
    return Plan(state.family, state.model_type, state.offset, state.tied, mode, "source", norms, actions, [],
                added=added, flashnorm=state)


def describe_remode(plan: Plan) -> str:
    """A mode-change plan as text (what ``inspect --mode M`` prints under the state)."""
    state: FlashNormState = plan.flashnorm
    lines = [f"mode change {state.mode} -> {plan.mode}: no weight changes (the folded weights are copied)"]
    groups: dict[tuple, int] = {}
    for n in plan.norms:
        groups[(n.rule, n.reason)] = groups.get((n.rule, n.reason), 0) + 1
    for (rule, reason), k in groups.items():
        lines.append(f"  {rule}  x{k}: {reason.replace('already folded: ', '')}")
    dropped = plan.count("drop")
    lines.append(f"tensors: {dropped} removed, {len(plan.added)} restored as identity, "
                 f"{plan.count('copy')} copied unchanged")
    return "\n".join(lines)
