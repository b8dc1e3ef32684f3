"""``--dequantize``: which quantized modules are widened, and what the output's config says about them.

With ``--dequantize`` the consumers of every folded norm that are stored quantized are decoded and
folded (``Kind.DEQUANT`` with the norm): each element the exact ``q·s·g`` rounded once to bf16 (or
float32 with ``--merged-dtype float32``). Loaders need fused siblings in one precision, so these are
widened too, without a norm (one rounding of ``q·s``; exact where ``q·s`` fits the output):

- the projections one fused kernel reads together: q/k/v, gate/up, MLA's q_a/kv_a (vLLM's
  ``qkv_proj``, ``gate_up_proj``, ``fused_qkv_a_proj``), data in :data:`SIBLINGS`;
- a MoE expert's ``down_proj`` with its gate/up (vLLM's FusedMoE holds w13 and w2 of all experts in
  one precision: :data:`EXPERT_DOWN`).

``--dequantize all`` widens every quantized module. The codes tensor keeps its name and becomes
bf16/float32; its scale and auxiliary tensors are dropped; ``quantization_config`` lists the widened
modules as unquantized (``modules_to_not_convert``), or goes when nothing quantized is left.

Supported so far, 2-D weights: FP8 block-quantized (``quant_method: fp8`` with ``weight_scale_inv`` or
DeepSeek-V4 ``.scale``; block size from ``weight_block_size``, F32/BF16/E8M0 scales) and compressed-tensors
float-quantized FP8 (``weight_scale`` per tensor, per output channel or per block; no zero point).
Every one is decoded as FP8 codes times a scale per tile (:func:`tile`: a channel scale is a ``1 x in``
tile, a tensor scale one ``out x in`` tile). And gpt-oss MXFP4 experts (``X_blocks`` U8 ``[E, out, in/32,
16]`` + ``X_scales`` E8M0 ``[E, out, in/32]``): the output tensor is NOT the codes tensor renamed but
transformers' dequantized parameter ``X`` ``[E, in, out]`` (:func:`output_of`; the task header, the
index, ``verify`` and the card use it). And compressed-tensors ``pack-quantized`` INT1..8 (group, channel
or tensor scales, symmetric or with packed zero points; not activation-ordered ``weight_g_idx``): written
as the logical ``X.weight`` ``[out, in]`` (:data:`streamfold.quant.intpack.PACKED`), its records built by
:mod:`streamfold.planning.quantchunks` (which also builds int-quantized I8, GPTQ, AWQ GEMM and fused 3-D
FP8 expert records). Others are refused with one line naming the module.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field

from ..core.errors import StreamfoldError
from ..quant.formats import QuantModule, Quantization
from ..quant.intpack import PACKED, packed_shape, unsupported
from ..rules.patterns import generalize

MODES = ("consumers", "all")
# modules one fused loader kernel reads together: widening one widens the others
SIBLINGS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
    ("w1", "w3"),
    ("q_a_proj", "kv_a_proj_with_mqa"),
)
# inside ``.experts.N.``: gate/up widened -> the same expert's down projection too
EXPERT_DOWN = {"gate_proj": "down_proj", "up_proj": "down_proj", "w1": "w2", "w3": "w2"}
SUPPORTED = {"fp8": ("block",), "fp8-fused": ("block",), "fp8-scale": ("block",), "ct-float": ("channel", "tensor", "block"),
             "mxfp4": ("group",), "ct-pack": ("group", "channel", "tensor"), "ct-int": ("channel", "tensor", "group"), "gptq": ("group", "channel"),
             "awq": ("group", "channel")}
ZERO_POINT_OK = ("ct-pack", "ct-int")  # layouts whose decoder applies a zero point (streamfold.planning.quantchunks)
# gpt-oss's fused expert parameters (``X.experts.gate_up_proj``): widening gate_up widens down_proj too
FUSED_EXPERT_DOWN = {"gate_up_proj": "down_proj"}


def dequantize_mode(value) -> str | None:
    """Normalise the ``dequantize`` option: False/None -> None, True/"consumers" -> "consumers", "all"."""
    if value in (None, False, "", "none"):
        return None
    if value is True or value == "consumers":
        return "consumers"
    if value == "all":
        return "all"
    raise StreamfoldError(f"dequantize must be true, 'consumers' or 'all', not {value!r}")


def out_dtype(merged_dtype: str) -> str:
    """The dtype widened weights are stored in: bf16, or float32 for ``--merged-dtype float32``."""
    return "F32" if merged_dtype == "float32" else "BF16"


@dataclass
class Dequant:
    """The widening decisions of one plan (see the module docstring)."""

    quant: Quantization
    mode: str
    widened: dict[str, QuantModule] = field(default_factory=dict)  # module -> its classification

    def module_of(self, weight: str) -> QuantModule | None:
        """The quantized module whose (logical) weight is ``weight``, checked to be one we can widen."""
        qm = self.quant.consumer(weight)
        if qm is not None:
            check_supported(qm)
        return qm

    def widen(self, qm: QuantModule) -> None:
        check_supported(qm)
        self.widened[qm.module] = qm

    def close_siblings(self) -> list[QuantModule]:
        """Widen the fused siblings (and expert down projections) of everything widened so far; returns
        the modules added (they are widened without a norm)."""
        added = []
        if self.mode == "all":
            for qm in self.quant.modules.values():
                if qm.module not in self.widened:
                    self.widen(qm)
                    added.append(qm)
            return added
        todo = list(self.widened)
        while todo:
            module = todo.pop()
            for other in _siblings(module):
                qm = self.quant.modules.get(other)
                if qm is not None and other not in self.widened:
                    self.widen(qm)
                    added.append(qm)
                    todo.append(other)
        return added

    def config_update(self) -> dict | None:
        """The output's ``quantization_config``: None when nothing quantized is left, else the source's
        with every widened module in its skip list (``modules_to_not_convert`` for fp8)."""
        if set(self.widened) >= set(self.quant.modules):
            return None
        q = copy.deepcopy(dict(self.quant.config or {}))
        key = self.quant.skip_key or "modules_to_not_convert"
        skip = list(q.get(key) or [])
        for module in _collapse_experts(self.widened, self.quant.modules):
            if not self.quant.skipped(module) and module not in skip:
                skip.append(module)
        q[key] = skip
        return q


    def describe(self, merged_dtype: str = "") -> str:
        """One line for ``inspect`` and the model card: what is widened and what stays quantized."""
        left = len(self.quant.modules) - len(self.widened)
        cfg = ("quantization_config removed (nothing quantized is left)" if left == 0 else
               f"the widened modules are listed in quantization_config.{self.quant.skip_key or 'modules_to_not_convert'}")
        return (f"quantized source ({self.quant.method}), --dequantize{' all' if self.mode == 'all' else ''}: "
                f"{len(self.widened)} of {len(self.quant.modules)} quantized modules widened (each element the exact "
                f"q*s*g, or q*s for a fused sibling, rounded once; their scales dropped), {left} copied byte for "
                f"byte; {cfg}")

    def apply_config(self, cfg: dict) -> dict:
        """``cfg`` (config.json) with its ``quantization_config`` (top level, or ``text_config``'s) updated."""
        out = dict(cfg)
        holder = out
        if "quantization_config" not in out and isinstance(out.get("text_config"), dict):
            holder = out["text_config"] = dict(out["text_config"])
        new = self.config_update()
        if new is None:
            holder.pop("quantization_config", None)
        else:
            holder["quantization_config"] = new
        return out


def _collapse_experts(widened, modules) -> list[str]:
    """Widened module names for a skip list, in layer order; where every quantized module of an
    ``X.experts`` block is widened, ``X.experts`` itself instead (transformers fuses the experts into one
    ``X.experts`` module, which a per-expert entry does not name; vLLM matches it as a prefix)."""
    groups: dict[str, list[str]] = {}
    for m in modules:
        hit = _experts_of(m, modules[m])
        if hit:
            groups.setdefault(hit.group(1), []).append(m)
    out, done = [], set()
    for m in sorted(widened, key=_natural):
        hit = _experts_of(m, modules[m])
        if hit and all(x in widened for x in groups[hit.group(1)]):
            if hit.group(1) not in done:
                done.add(hit.group(1))
                out.append(hit.group(1))
            continue
        out.append(m)
    return out


def _experts_of(module: str, qm: QuantModule):
    """The ``X.experts`` match of a per-expert module (``X.experts.3.up_proj``) or of a fused FP8 expert
    parameter (``X.experts.gate_up_proj``: transformers' FP8 experts module is ``X.experts``), else None."""
    if qm.layout == "fp8-fused":
        return re.match(r"(.*\.experts)\.[^.]+$", module)
    return re.match(r"(.*\.experts)\.\d+\.", module)


def check_supported(qm: QuantModule) -> None:
    ok = qm.strategy in SUPPORTED.get(qm.layout, ()) and (qm.strategy != "block" or qm.block)
    zero_point = qm.layout not in ZERO_POINT_OK and any(x.endswith(".weight_zero_point") for x in qm.aux)
    g_idx = any(x.endswith(".weight_g_idx") for x in qm.aux)  # activation-ordered groups
    why = unsupported(qm)
    if not ok or zero_point or g_idx or why:
        extra = (" with a zero point" if zero_point else " with a g_idx (activation order)" if g_idx
                 else f": {why}" if why else "")
        raise StreamfoldError(f"--dequantize: {qm.module} is {qm.describe()}{extra}; "
                              "streamfold dequantizes FP8 block-quantized (fp8), compressed-tensors FP8 "
                              "tensor/channel/block, compressed-tensors pack- and int-quantized INT, GPTQ, AWQ GEMM and "
                              "gpt-oss MXFP4 modules so far")


def tile(qm: QuantModule, shape: tuple[int, ...]) -> tuple[int, int]:
    """The ``(rows, cols)`` tile one scale covers: the config's block, ``(1, in)`` for a per-channel
    scale, ``(out, in)`` for a per-tensor one."""
    rows, cols = shape
    if qm.strategy == "block":
        return tuple(qm.block)
    return (1, cols) if qm.strategy == "channel" else (rows, cols)


def mxfp4_shape(blocks: tuple[int, ...]) -> tuple[int, int, int]:
    """transformers' dequantized ``[E, in, out]`` of gpt-oss MXFP4 blocks ``[E, out, in/32, 16]``."""
    e, rows, groups, width = blocks
    return (e, groups * 2 * width, rows)


def output_of(name: str, action, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...]]:
    """The output tensor's name and shape for the source tensor ``name`` (of ``shape``) under ``action``:
    the same, except a widened MXFP4 codes tensor, written as its logical ``[E, in, out]`` parameter."""
    qm = getattr(action, "quant", None)
    if getattr(action, "kind", None) == "dequant" and qm is not None and qm.layout == "mxfp4":
        return qm.logical, mxfp4_shape(tuple(shape))
    if getattr(action, "kind", None) == "dequant" and qm is not None and qm.layout in PACKED:
        return qm.logical, packed_shape(qm, tuple(shape))
    return name, tuple(shape)


def logical_infos(quant: Quantization, tensors: dict) -> dict:
    """Header entries under the logical names of MXFP4 modules (``X`` for ``X_blocks``), with the
    dequantized ``[E, in, out]`` shape: what the planner checks a fold's widths against."""
    import dataclasses
    out = {}
    for qm in quant.modules.values():
        if qm.layout in ("mxfp4", *PACKED) and qm.logical not in tensors and qm.weight in tensors:
            t = tensors[qm.weight]
            shape = mxfp4_shape(tuple(t.shape)) if qm.layout == "mxfp4" else packed_shape(qm, tuple(t.shape))
            out[qm.logical] = dataclasses.replace(t, name=qm.logical, shape=shape, dtype="BF16")
    return out


def check_shape(qm: QuantModule, shape: tuple[int, ...], axis: int) -> None:
    """Widened weights are 2-D ``[out, in]`` folded along ``in`` (MXFP4: ``[E, out, in/32, 16]`` blocks,
    or their logical ``[E, in, out]`` folded along axis 1)."""
    if qm.layout == "mxfp4":
        if len(shape) == 4 and shape[3] == 16 or len(shape) == 3 and axis in (1, -2):
            return
        raise StreamfoldError(f"--dequantize: {qm.weight} has shape {list(shape)}; MXFP4 experts are "
                              "[experts, out, in/32, 16] blocks folded along their inputs")
    if qm.layout == "fp8-fused" and len(shape) == 3 and axis in (2, -1):  # [E, out, in], one expert at a time
        return
    if len(shape) != 2 or axis not in (1, -1):
        raise StreamfoldError(f"--dequantize: {qm.weight} has shape {list(shape)}; only 2-D [out, in] FP8 weights "
                              "folded along their inputs are dequantized so far")


def _siblings(module: str) -> list[str]:
    parent, _, leaf = module.rpartition(".")
    out = [f"{parent}.{s}" for group in SIBLINGS if leaf in group for s in group if s != leaf]
    if parent.endswith(".experts"):
        out += [f"{parent}.{v}" for k, v in FUSED_EXPERT_DOWN.items() if k == leaf]
        out += [f"{parent}.{k}" for k, v in FUSED_EXPERT_DOWN.items() if v == leaf]
    if re.search(r"\.experts\.\d+$", parent):
        if leaf in EXPERT_DOWN:
            out.append(f"{parent}.{EXPERT_DOWN[leaf]}")
        out += [f"{parent}.{k}" for k, v in EXPERT_DOWN.items() if v == leaf]
    return out


def _natural(s: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", s)]


def quantized_keep(n: NormPlan, quant: Quantization) -> None:
    """Keep a fold-planned norm that has a quantized consumer (partial fold): codes and scales cannot
    absorb a per-input-channel factor exactly, so its consumers and the norm are copied unchanged."""
    hits = [(c, qm) for c in n.consumers if (qm := quant.consumer(c.weight))]
    if not hits:
        return
    c, qm = next((h for h in hits if h[1].input_scale), hits[0])  # a static input scale says the most
    static = (f" with a static input scale {generalize(qm.input_scale)!r} (its activations are quantized against "
              "a fixed range, so it must see the norm's output)") if qm.input_scale else ""
    n.status, n.consumers = "keep", []
    n.reason = f"consumer {generalize(c.weight)} is {qm.describe()}{static}; use --dequantize"
