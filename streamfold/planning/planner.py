"""Plan a conversion from headers alone: every norm, its consumers, and what happens to each tensor.

The plan reads ``config.json``, the index and shard headers, plus the (tiny) norm vectors; it never
touches weight data, so ``inspect`` is instant and every shape or naming problem surfaces before any
output exists.

A quantized source (``quantization_config``) is classified by :mod:`streamfold.quant.formats` and folded
partially: consumers are resolved by their logical names (``X.weight`` of ``X.weight_packed``, gpt-oss's
``experts.gate_up_proj`` of ``..._blocks``), a norm folds only when none of its consumers is quantized
(otherwise it is kept and the reason names the quantized consumer), and every quantized tensor is a copy.
With ``dequantize`` they are widened instead (``Kind.DEQUANT``; :mod:`streamfold.planning.dequant`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Callable

import numpy as np

from ..core.dtypes import FOLDABLE
from ..core.errors import StreamfoldError
from ..core.fold import merged_out_dtype
from ..core.reader import TensorInfo
from ..quant.formats import Quantization, classify
from ..rules.patterns import Consumer, common_tile, config_get, expand_consumer, generalize, looks_like_norm, \
    natural_key, pattern_regex, present, stars
from ..rules.schema import check_text_model
from .compose import is_tied, resolve, untiled
from .dequant import Dequant, check_shape, dequantize_mode, logical_infos, out_dtype as dequant_dtype, \
    quantized_keep

MODES = ("compat", "strict")
MERGED_DTYPES = ("source", "float32")
# Accepted spellings. "bf16" asks for folded weights stored in bf16: "source" for a bf16 source, refused otherwise.
MERGED_ALIASES = {"source": "source", "float32": "float32", "fp32": "float32", "f32": "float32",
                  "bf16": "bf16", "bfloat16": "bf16"}


@dataclass
class NormPlan:
    """One norm instance and its fate: ``fold`` or ``keep`` (with the reason)."""

    rule: str
    name: str
    weight: str
    bias: str | None
    status: str
    reason: str = ""
    consumers: list[Consumer] = field(default_factory=list)
    scale: np.ndarray | None = None  # float32 ``offset + w``
    offset: int | None = None  # the rule's own convention, when it differs from the family's
    shift: np.ndarray | None = None  # LayerNorm bias to fold into consumer biases, if non-zero
    tower: bool = False  # a vision-tower rule's norm (--fold-vision)


class Kind(StrEnum):
    """What happens to one source tensor (a ``str``, so it prints and serialises as its value)."""

    COPY = "copy"  # bytes unchanged
    SCALE = "scale"  # multiplied by ``norm.scale`` along ``axis``
    FILL = "fill"  # set to ``value`` (a folded norm's identity, compat mode)
    BIAS = "bias"  # source bias + W @ shift (W = ``norm``'s consumer weight ``source``)
    DROP = "drop"  # removed (a folded norm, strict mode; a widened weight's scales)
    DEQUANT = "dequant"  # a quantized weight decoded to bf16/f32, times ``norm.scale`` if ``norm`` is set


@dataclass
class Action:
    """What the writer does with one source tensor (see :class:`Kind`)."""

    kind: Kind
    out_dtype: str
    norm: NormPlan | None = None
    axis: int = -1
    value: float = 0.0
    source: str | None = None
    quant: object | None = None  # DEQUANT: the module's streamfold.quant.formats.QuantModule


@dataclass
class Plan:
    """A whole conversion, printable (``describe``) and serialisable (``to_dict``)."""

    family: str
    model_type: str
    offset: int
    tied: bool
    mode: str
    merged_dtype: str
    norms: list[NormPlan]
    actions: dict[str, Action]
    unknown_norms: list[str]
    # Mode changes of an already-folded checkpoint (streamfold.planning.remode): tensors to create (identity
    # norms restored in strict -> compat), and the source's FlashNormState. Empty / None for folds.
    added: list = field(default_factory=list)
    flashnorm: object | None = None
    # --dequantize: the widening decisions (streamfold.planning.dequant.Dequant), None otherwise
    dequant: object | None = None
    quant: Quantization | None = None  # the source's quantized modules (copied byte for byte)
    layout: str | None = None  # the tensor-name layout when not save_pretrained's (rules.layout.Laid.describe)
    composed: object | None = None  # a composed wrapper (planning.compose.Composed)
    vision: bool = False  # --fold-vision: the tower's rules applied (config.json's flashnorm_vision)

    @property
    def folded(self) -> list[NormPlan]:
        return [n for n in self.norms if n.status == "fold"]

    @property
    def kept(self) -> list[NormPlan]:
        return [n for n in self.norms if n.status == "keep"]

    def count(self, kind: Kind) -> int:
        return sum(1 for a in self.actions.values() if a.kind == kind)

    def groups(self) -> list[dict]:
        """Norms grouped by rule and outcome, with consumer patterns: the readable summary."""
        out: dict[tuple, dict] = {}
        for n in self.norms:
            key = (n.rule, n.status, n.reason)
            g = out.setdefault(key, {"norm": stars(n.rule), "status": n.status, "reason": n.reason,
                                     "count": 0, "consumers": []})
            g["count"] += 1
            for c in n.consumers:
                pat = generalize(c.weight)
                if pat not in g["consumers"]:
                    g["consumers"].append(pat)
        return list(out.values())

    def to_dict(self) -> dict:
        return {
            "family": self.family, "model_type": self.model_type, "mode": self.mode,
            "merged_dtype": self.merged_dtype, "tied_embeddings": self.tied,
            "norm_convention": "1 + w" if self.offset else "w",
            "norms": self.groups(),
            "each_norm": [{"norm": n.name, "status": n.status, "reason": n.reason,
                           "consumers": [c.weight for c in n.consumers]} for n in self.norms],
            "unknown_norms": self.unknown_norms,
            "tensors": {str(k): self.count(k) for k in (Kind.SCALE, Kind.BIAS, Kind.FILL, Kind.DROP, Kind.COPY,
                                                        Kind.DEQUANT) if k != Kind.DEQUANT or self.dequant},
            "quantization": self.quant_summary(),
            "layout": self.layout,
            "composed": self.composed.to_dict() if self.composed is not None else None,
            "fold_vision": self.vision_summary(),
        }

    def vision_summary(self) -> dict | None:
        """With --fold-vision: how many tower norms fold and stay, and their groups (None without it)."""
        tower = {stars(n.rule) for n in self.norms if n.tower}
        return {"folded": sum(n.tower and n.status == "fold" for n in self.norms), "kept": sum(
            n.tower and n.status == "keep" for n in self.norms), "norms": [g for g in self.groups()
                                                                          if g["norm"] in tower]} if self.vision else None

    def quant_summary(self) -> dict | None:
        """The quantized source's method and module count per format (None when not quantized)."""
        if self.quant is None or not self.quant.quantized:
            return None
        formats: dict[str, int] = {}
        for qm in self.quant.modules.values():
            formats[qm.describe()] = formats.get(qm.describe(), 0) + 1
        return {"method": self.quant.method, "modules": len(self.quant.modules), "formats": formats}

    def describe(self, each: bool = False) -> str:
        """The plan as text: one line per norm family, or per norm with ``each``."""
        lines = [f"model_type {self.model_type} (family {self.family}), norm multiplies by "
                 f"{'1 + w' if self.offset else 'w'}, tied embeddings: {'yes' if self.tied else 'no'}",
                 f"mode {self.mode}, merged dtype {self.merged_dtype}"]
        lines += [self.composed.describe()] if self.composed is not None else []
        lines += [f"tensor names: {self.layout} (written back the same way)"] if self.layout else []
        lines += [f"--fold-vision: vision tower folded too ({v['folded']} tower norms folded, {v['kept']} kept)"
                  for v in (self.vision_summary(),) if v]
        q = self.quant_summary()
        if q and self.dequant is not None:
            lines.append(self.dequant.describe())
        elif q:
            kinds = ", ".join(f"{n} modules {k}" for k, n in q["formats"].items())
            lines.append(f"quantized source ({q['method']}): {kinds}; their tensors are copied byte for byte, "
                         "quantization_config unchanged; only norms whose consumers are all unquantized fold")
        for g in self.groups():
            head = f"  {g['status'].upper():4}  {g['norm']}  x{g['count']}"
            if g["status"] == "fold":
                note = f"  ({g['reason']})" if g["reason"] else ""
                lines.append(f"{head}  -> {', '.join(g['consumers'])}{note}")
            else:
                lines.append(f"{head}  ({g['reason']})")
        if each:
            lines.append("each norm:")
            for n in self.norms:
                what = ", ".join(c.weight for c in n.consumers) if n.status == "fold" else n.reason
                lines.append(f"  {n.status.upper():4}  {n.weight}  {'-> ' if n.status == 'fold' else ''}{what}")
        for name in self.unknown_norms:
            lines.append(f"  NOTE  {name}: looks like a norm but no rule covers it; copied unchanged")
        t = self.to_dict()["tensors"]
        deq = f", {t['dequant']} dequantized" if t.get("dequant") else ""
        lines.append(f"tensors: {t['scale']} folded{deq}, {t['bias']} biases updated, {t['fill']} set to "
                     f"identity, {t['drop']} dropped, {t['copy']} copied unchanged")
        return "\n".join(lines)


def make_plan(cfg: dict, tensors: dict[str, TensorInfo], read: Callable[[str], np.ndarray] | None, *,
              mode: str = "compat", merged_dtype: str = "source",
              rules: dict[str, dict] | None = None, dequantize=None, fold_vision: bool = False) -> Plan:
    """Resolve every norm's consumers and each tensor's action. ``read(name)`` returns a small
    tensor's values (used for norm vectors only); ``read=None`` plans from headers alone (remote
    ``inspect``): no scales, and whether a LayerNorm bias folds is left to the conversion.
    ``fold_vision``: the family's vision-tower rules too (:mod:`streamfold.rules.vision`)."""
    if mode not in MODES:
        raise StreamfoldError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    want = MERGED_ALIASES.get(str(merged_dtype).lower())
    if want is None:
        raise StreamfoldError(f"merged dtype must be one of {', '.join(MERGED_ALIASES)}, not {merged_dtype!r}")
    merged_dtype = "source" if want == "bf16" else want
    if not isinstance(cfg.get("model_type"), str):
        raise StreamfoldError("config.json: no \"model_type\"; is this a transformers checkpoint?")
    quant = classify(cfg, tensors)
    deq_mode = dequantize_mode(dequantize)
    deq = None
    if deq_mode is not None:
        if not quant.quantized:
            raise StreamfoldError("--dequantize: the checkpoint has no quantized tensors (nothing to dequantize)")
        deq = Dequant(quant, deq_mode)
    real, tensors = tensors, quant.view(tensors)  # consumers by their logical names (X.weight of X.qweight)
    resolved = resolve(cfg, tensors, rules, fold_vision)  # the family as laid out here, a composed wrapper, ...
    family, fam, model_type = resolved.family, resolved.fam, resolved.model_type
    check_text_model(cfg, model_type, family, fam)  # a wrapper's rules hold for the text models derived with
    user_rules = bool(rules) and family in rules and model_type in rules[family]["model_types"]
    if mode == "strict" and fam.get("strict_refused"):
        raise StreamfoldError(f"{model_type}: strict mode is not exact for this architecture "
                              f"({fam['strict_refused']}); use --mode compat")
    offset = fam.get("offset", 0)
    tied = is_tied(cfg, model_type, fam)

    ordered = sorted(tensors, key=natural_key)  # plan and report in layer order
    names = sorted(tensors)  # for prefix look-ups (bisect)
    norms: list[NormPlan] = []
    claimed: dict[str, str] = {}
    defaults = fam.get("defaults", {})
    for rule in fam["folds"]:
        if not all(config_get(cfg, k, defaults.get(k)) in v for k, v in rule.get("when", {}).items()):
            continue
        rx = pattern_regex(rule["norm"] + ".weight")
        found = False
        for tname in ordered:
            m = rx.match(tname)
            if m:
                found = True
                norms.append(_resolve(rule, m.groupdict(), tname, tensors, names, tied, claimed))
        if user_rules and not found:
            raise StreamfoldError(f"rules: norm {rule['norm'] + '.weight'!r} of family {family!r} matches no tensor "
                                  "in the checkpoint")
    if not norms:
        raise StreamfoldError(f"no tensor matches a norm rule of family {family!r} (model_type {model_type!r}); "
                              "the checkpoint's tensor names do not match its config.json")
    for k in fam.get("keep", []):
        if "under" in k:  # every norm of a subtree (vision/audio towers)
            for tname in ordered:
                if tname.startswith(k["under"]) and tname.endswith(".weight") and looks_like_norm(tname) \
                        and tname not in claimed:
                    name = tname[: -len(".weight")]
                    claimed[tname] = name
                    norms.append(NormPlan(k["under"] + "*", name, tname, present(name + ".bias", tensors), "keep",
                                          k["why"], tower=fold_vision))
            continue
        rx = pattern_regex(k["norm"] + ".weight")
        for tname in ordered:
            if rx.match(tname) and tname not in claimed:
                name = tname[: -len(".weight")]
                claimed[tname] = name
                norms.append(NormPlan(k["norm"], name, tname, present(name + ".bias", tensors), "keep", k["why"],
                                      tower=bool(k.get("tower"))))

    for n in norms:
        if n.status == "fold" and deq is None:  # partial fold (with --dequantize: widened instead)
            quantized_keep(n, quant)
    tensors = real
    actions: dict[str, Action] = {}
    view = {**tensors, **logical_infos(quant, tensors)} if deq is not None else tensors  # MXFP4: X of X_blocks
    for n in norms:
        if n.status == "fold":
            _fold_norm(n, view, read, n.offset if n.offset is not None else offset, mode, merged_dtype, actions,
                       deq)
    if deq is not None:
        for qm in deq.close_siblings():  # fused siblings, expert down projections (or all): widened, no norm
            check_shape(qm, tensors[qm.weight].shape, -1)
            actions[qm.weight] = Action(Kind.DEQUANT, dequant_dtype(merged_dtype), None, axis=1, quant=qm)
        actions.update({x: Action(Kind.DROP, tensors[x].dtype) for qm in deq.widened.values() for x in qm.tensors
                        if x != qm.weight})  # the widened weights' scales
    if want == "bf16":
        narrow = next((n for n, a in actions.items() if a.kind == "scale" and a.out_dtype != "BF16"), None)
        if narrow is not None:
            raise StreamfoldError(f"merged dtype bf16: {narrow} is stored in {tensors[narrow].dtype}, and streamfold "
                                  "never narrows weights; use source or float32")
    for name, t in tensors.items():
        actions.setdefault(name, Action(Kind.COPY, t.dtype))
    covered = {x for n in norms for x in (n.weight, n.bias) if x}
    unknown = sorted((t for t in tensors if looks_like_norm(t) and t not in claimed and t not in covered
                      and actions[t].kind == Kind.COPY), key=natural_key)
    untiled(resolved, unknown)
    return Plan(family, cfg["model_type"], offset, tied, mode, merged_dtype, norms, actions, unknown, quant=quant,
                dequant=deq, layout=resolved.layout, composed=resolved.composed, vision=fold_vision)


def _resolve(rule: dict, groups: dict, tname: str, tensors: dict, names: list[str], tied: bool,
             claimed: dict) -> NormPlan:
    name = tname[: -len(".weight")]
    bias = present(name + ".bias", tensors)
    claimed[tname] = name
    if rule.get("untied_head"):
        heads = rule.get("into") or rule["variants"][0]
        if tied:
            return NormPlan(rule["norm"], name, tname, bias, "keep",
                            "tied embeddings: lm_head is the input embedding matrix")
        missing = [c if isinstance(c, str) else c["weight"] for c in heads if not expand_consumer(c, groups, tensors, names)]
        if missing:
            return NormPlan(rule["norm"], name, tname, bias, "keep",
                            f"no {missing[0]!r} tensor: the head reuses the input embedding matrix")
    variants = rule.get("variants", [rule.get("into")])
    first_missing = None
    for v in variants:
        consumers: list[Consumer] = []
        for c in v:
            got = expand_consumer(c, groups, tensors, names)
            if got is None:
                if first_missing is None:
                    first_missing = c if isinstance(c, str) else c["weight"]
                    for key, val in groups.items():
                        first_missing = first_missing.replace("{" + key + "}", val or "")
                consumers = []
                break
            consumers.extend(got)
        if consumers:
            for c in consumers:
                if c.weight in claimed:
                    raise StreamfoldError(f"rules: tensor {c.weight!r} is claimed by both {claimed[c.weight]!r} "
                                          f"and {name!r}")
                claimed[c.weight] = name
            return NormPlan(rule["norm"], name, tname, bias, "fold", consumers=consumers, offset=rule.get("offset"),
                            tower=bool(rule.get("tower")))
    raise StreamfoldError(f"tensor {tname!r}: its consumer {first_missing!r} is not in the checkpoint; "
                          "the checkpoint does not match the architecture in config.json")


def _fold_norm(n: NormPlan, tensors: dict[str, TensorInfo], read, offset: int, mode: str,
               merged_dtype: str, actions: dict[str, Action], deq=None) -> None:
    t = tensors[n.weight]
    if len(t.shape) != 1 or t.dtype not in FOLDABLE:
        raise StreamfoldError(f"{t.path.name}: norm {n.weight!r} has shape {list(t.shape)} {t.dtype}; "
                              "expected a 1-D float vector")
    width = t.shape[0]
    quant = {c.weight: qm for c in n.consumers if deq is not None and (qm := deq.module_of(c.weight))}
    for c in n.consumers:
        ct = tensors[c.weight]
        if c.weight in quant:
            check_shape(quant[c.weight], ct.shape, c.axis)
        elif ct.dtype not in FOLDABLE:
            raise StreamfoldError(f"{ct.path.name}: tensor {c.weight!r} is {ct.dtype}, not a float weight; "
                                  "folding needs the unquantized checkpoint")
        if not ct.shape or not -len(ct.shape) <= c.axis < len(ct.shape) or ct.shape[c.axis] != width * c.tile:
            got = ct.shape[c.axis] if ct.shape and -len(ct.shape) <= c.axis < len(ct.shape) else None
            raise StreamfoldError(f"{ct.path.name}: tensor {c.weight!r} shape {list(ct.shape)} has {got} inputs "
                                  f"on axis {c.axis} but norm {n.weight!r} has {width} channels (x{c.tile})")
    tile = common_tile(n.weight, n.consumers)  # a patch merger's consumer: the scale tiled k times
    if read is not None:
        n.scale = np.tile((read(n.weight).astype(np.float32) + np.float32(offset)).astype(np.float32), tile)
    if n.bias is not None:
        bt = tensors[n.bias]
        if bt.shape != (width,):
            raise StreamfoldError(f"{bt.path.name}: norm bias {n.bias!r} has shape {list(bt.shape)}, "
                                  f"expected [{width}]")
        beta = read(n.bias).astype(np.float32) if read is not None else None
        if beta is None:
            n.reason = "bias fold decided at conversion (needs the bias values)"
        elif np.any(beta != 0):
            lacking = [c.weight for c in n.consumers if c.bias is None]
            if lacking:
                n.status, n.consumers = "keep", []
                n.reason = f"LayerNorm bias cannot fold: consumer {generalize(lacking[0])!r} has no bias"
                n.scale = None
                return
            n.shift = np.tile(beta, tile)
            if quant:
                raise StreamfoldError(f"--dequantize: norm {n.weight!r} has a LayerNorm bias and its consumer "
                                      f"{next(iter(quant))!r} is quantized; folding that bias is not supported")
    for c in n.consumers:
        ct = tensors[c.weight]
        axis = c.axis % len(ct.shape)
        if c.weight in quant:
            deq.widen(quant[c.weight])
            actions[quant[c.weight].weight] = Action(Kind.DEQUANT, dequant_dtype(merged_dtype), n, axis=axis,
                                                     quant=quant[c.weight])  # keyed by the stored codes tensor
            continue
        actions[c.weight] = Action(Kind.SCALE, merged_out_dtype(ct.dtype, merged_dtype), n, axis=axis)
        if n.shift is not None and c.bias is not None:
            actions[c.bias] = Action(Kind.BIAS, merged_out_dtype(tensors[c.bias].dtype, merged_dtype), n, axis=axis,
                                     source=c.weight)
    identity = 1.0 - offset
    for tname, value in ((n.weight, identity), (n.bias, 0.0)):
        if tname is not None:
            actions[tname] = (Action(Kind.DROP, tensors[tname].dtype) if mode == "strict"
                              else Action(Kind.FILL, tensors[tname].dtype, n, value=value))
