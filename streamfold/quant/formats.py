"""Classify a quantized checkpoint's tensors from safetensors headers and ``config.json`` alone.

Every quantized module is recognised by its on-disk *layout*: the suffix and dtype of the tensor that
holds its codes plus the sibling tensors that must sit beside it (``X.weight`` F8_E4M3 with
``X.weight_scale_inv`` is FP8 block-quantized; ``X_blocks`` U8 with ``X_scales`` is gpt-oss MXFP4;
...). The layouts are one table (:data:`streamfold.quant.layouts.LAYOUTS`), tried in order, restricted to the ones the
config's ``quant_method`` can produce (:data:`METHODS`); block and group sizes come from the config,
never from shapes (a 576-row FP8 tensor has a ragged last tile, not a 72-row block).

Refused with one line naming the tensor or the config key (:class:`StreamfoldError`):
an unknown ``quant_method``; AMD's FNUZ float8 variants (a dtype ``F8_E4M3FNUZ``/``F8_E5M2FNUZ`` or
``fnuz`` anywhere in ``quantization_config``: their bit patterns decode differently from e4m3fn);
quantized tensors with no ``quantization_config``; a quantized-looking tensor that fits no layout of
the config's method (an F8 tensor without its scale, a lone ``weight_scale_inv``, ...); a static
``input_scale`` beside an unquantized weight (activation-only quantization: a fold into that linear
would change the range its input is quantized against; a quantized linear with a static input scale
is classified, and the planner keeps its norm).

API (stable; ``streamfold.quant.decode`` and the planner build on it):
``classify(cfg, tensors) -> Quantization``; ``Quantization.modules`` maps module names to
:class:`QuantModule`; ``Quantization.owner(tensor)`` and ``Quantization.consumer(logical_weight)``
find the module a stored tensor belongs to, or whose unquantized weight would carry a name;
``Quantization.view(tensors)`` adds the logical weight names the family rules use.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

from ..core.errors import StreamfoldError
from ..core.reader import TensorInfo
from .layouts import E8M0, FLOAT8, FNUZ_DTYPES, INPUT_SCALES, LAYOUTS, MARKERS, METHODS, WIDE, Layout, Method  # noqa: F401


@dataclass(frozen=True)
class QuantModule:
    """One quantized module as stored: its codes, scales and auxiliary tensors (all full tensor names).

    ``module``: e.g. ``model.layers.0.self_attn.q_proj`` or gpt-oss's ``model.layers.0.mlp.experts.down_proj``;
    ``logical``: the weight name an unquantized checkpoint would use (what the family rules name);
    ``layout``: a :data:`LAYOUTS` key; ``strategy``: ``tensor`` | ``channel`` | ``group`` | ``block`` |
    ``tensor_group``; ``block``: the (rows, cols) tile one scale covers, from the config (``(1, G)`` for
    groups; None for tensor/channel scales); ``input_scale``: the static activation scale, if any.
    """

    module: str
    method: str
    layout: str
    weight: str
    logical: str
    scales: tuple[str, ...]
    aux: tuple[str, ...] = ()
    input_scale: str | None = None
    strategy: str | None = None
    block: tuple[int, ...] | None = None
    bits: int | None = None
    scale_fmt: str | None = None
    kind: str = ""
    packing: str | None = None  # gptq: checkpoint_format ("gptq": stored zero + 1, "gptq_v2"); awq: version

    @property
    def tensors(self) -> tuple[str, ...]:
        """Every stored tensor of this module (copied byte for byte in a partial fold)."""
        return (self.weight, *self.scales, *self.aux) + ((self.input_scale,) if self.input_scale else ())

    def describe(self) -> str:
        """Short text for reasons and reports, e.g. ``FP8 block-quantized (fp8)``."""
        how = f" {self.strategy.replace('_', '-')}-quantized" if self.strategy else "-quantized"
        return f"{self.kind}{how} ({self.method})"


@dataclass(frozen=True)
class Quantization:
    """What :func:`classify` found: the method (None when the checkpoint is not quantized), the
    ``quantization_config`` as read, every quantized module, and the config's skip list."""

    method: str | None
    config: Mapping | None
    modules: dict[str, QuantModule]
    skip_key: str | None = None
    skip: tuple[str, ...] = ()
    _owner: dict[str, QuantModule] = field(default_factory=dict, repr=False)
    _logical: dict[str, QuantModule] = field(default_factory=dict, repr=False)

    @property
    def quantized(self) -> bool:
        return bool(self.modules)

    def owner(self, tensor: str) -> QuantModule | None:
        """The quantized module a stored tensor belongs to (codes, scale or auxiliary), else None."""
        return self._owner.get(tensor)

    def consumer(self, logical: str) -> QuantModule | None:
        """The quantized module whose unquantized weight would be named ``logical``, else None."""
        return self._logical.get(logical)

    def view(self, tensors: Mapping[str, TensorInfo]) -> dict[str, TensorInfo]:
        """``tensors`` plus each quantized module's logical weight name where it is not stored under it
        (``X.weight`` of a ``weight_packed`` or ``qweight`` module, gpt-oss's ``experts.gate_up_proj``),
        mapped to the codes tensor's header: family rules name consumers that way. Only names and
        presence are meaningful for the added entries, not their shapes."""
        if not self.modules:
            return dict(tensors)
        out = dict(tensors)
        for qm in self.modules.values():
            out.setdefault(qm.logical, tensors[qm.weight])
        return out

    def skipped(self, module: str) -> bool:
        """Whether the config lists ``module`` as left unquantized, matched as the loaders match it:
        compressed-tensors ``re:`` patterns (``re.match``) or exact names; transformers' skip lists
        as a prefix regex ending at a module boundary, or a suffix."""
        regex = METHODS[self.method].regex_skip if self.method in METHODS else False
        for s in self.skip:
            if regex:
                if (re.match(s[3:], module) is not None) if s.startswith("re:") else module == s:
                    return True
            elif _skip_match(s, module):
                return True
        return False


def _skip_match(key: str, module: str) -> bool:
    """transformers' ``should_convert_module`` (5.2x) for one key: a regex from the start up to a module
    boundary, or a plain suffix."""
    try:
        if re.match(rf"(?:{key})(?:(?<=\.)|(?=\.|$))", module):
            return True
    except re.error:
        pass
    return module.endswith(key)


def quant_config(cfg: Mapping) -> Mapping | None:
    """``quantization_config`` of ``config.json`` (or of its ``text_config``), None when absent."""
    q = cfg.get("quantization_config")
    if q is None and isinstance(cfg.get("text_config"), dict):
        q = cfg["text_config"].get("quantization_config")
    if q is not None and not isinstance(q, dict):
        raise StreamfoldError("config.json: quantization_config must be a JSON object")
    return q or None


def _fnuz_path(obj, path: str = "quantization_config") -> str | None:
    """The first key path in the config whose key or string value mentions FNUZ."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if "fnuz" in str(k).lower() and v not in (False, None, 0, ""):
                return f"{path}.{k}"
            hit = _fnuz_path(v, f"{path}.{k}")
            if hit:
                return hit
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            hit = _fnuz_path(v, f"{path}[{i}]")
            if hit:
                return hit
    elif isinstance(obj, str) and "fnuz" in obj.lower():
        return path
    return None


def _ints(value, what: str, n: int | None = None) -> tuple[int, ...]:
    ok = isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                                   for v in value) and (n is None or len(value) == n)
    if not ok:
        raise StreamfoldError(f"config.json: quantization_config {what} must be "
                              f"{'a list of ' + str(n) if n else 'a list of'} positive integers, not {value!r}")
    return tuple(value)


def _ct_group(q: Mapping, module: str) -> Mapping:
    """The compressed-tensors config group quantizing ``module``: the first whose ``re:`` target matches,
    else the first with a class-name target (``Linear``: the headers cannot tell classes apart)."""
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise StreamfoldError("config.json: quantization_config (compressed-tensors) has no config_groups")
    for tgt_is_re in (True, False):
        for name, g in groups.items():
            targets = g.get("targets", []) if isinstance(g, dict) else []
            for t in targets:
                if not isinstance(t, str):
                    continue
                if t.startswith("re:") and tgt_is_re and re.match(t[3:], module):
                    return g
                if not t.startswith("re:") and not tgt_is_re:
                    return g
    raise StreamfoldError(f"config.json: no quantization_config.config_groups target matches {module!r}, "
                          "which is stored quantized")


def _scheme(layout: Layout, method: str, q: Mapping, module: str) -> dict:
    """strategy, block, bits and scale_fmt of one module, from the config (never from shapes)."""
    if method == "fp8":
        if layout.key == "fp4-scale":
            return {"strategy": "group", "block": (1, 32), "bits": 4, "scale_fmt": "ue8m0"}
        wbs = q.get("weight_block_size")
        block = _ints(wbs, "weight_block_size", 2) if wbs is not None else None
        return {"strategy": "block" if block else "tensor", "block": block, "bits": 8,
                "scale_fmt": q.get("scale_fmt") or "float"}
    if method == "compressed-tensors":
        w = _ct_group(q, module).get("weights")
        if not isinstance(w, dict):
            raise StreamfoldError(f"config.json: the compressed-tensors config group of {module!r} has no "
                                  "\"weights\" quantization arguments")
        strategy, bits = w.get("strategy"), w.get("num_bits")
        block = None
        if strategy in ("group", "tensor_group"):
            block = (1, _ints([w.get("group_size")], "group_size", 1)[0])
        elif strategy == "block":
            block = _ints(w.get("block_structure"), "block_structure", 2)
        return {"strategy": strategy, "block": block, "bits": bits}
    if method in ("gptq", "awq"):
        g = q.get("group_size", q.get("q_group_size", 128))
        bits = q.get("bits", q.get("w_bit", 4))
        packing = (q.get("checkpoint_format") or "gptq") if method == "gptq" else str(q.get("version") or "gemm").lower()
        if g in (-1, None):
            return {"strategy": "channel", "block": None, "bits": bits, "packing": packing}
        return {"strategy": "group", "block": (1, _ints([g], "group_size", 1)[0]), "bits": bits, "packing": packing}
    if method == "mxfp4":
        return {"strategy": "group", "block": (1, 32), "bits": 4}  # the OCP MX format's block
    return {"strategy": layout.strategy, "block": None, "bits": 8 if method == "fbgemm_fp8" else None}


def _match(layout: Layout, name: str, tensors: Mapping[str, TensorInfo]) -> str | None:
    """The module name if ``name`` is the codes tensor of ``layout`` with all required siblings."""
    t = tensors[name]
    if not name.endswith(layout.weight) or t.dtype not in layout.weight_dtypes:
        return None
    module = name[: -len(layout.weight)] if layout.weight else name  # "": the codes tensor names the module
    if not module or not all(module + s in tensors for s in layout.scales):
        return None
    if layout.scale_dtypes is not None and tensors[module + layout.scales[0]].dtype not in layout.scale_dtypes:
        return None
    return module


def _where(t: TensorInfo) -> str:
    return f"{t.path.name}: tensor {t.name!r}"


def classify(cfg: Mapping, tensors: Mapping[str, TensorInfo]) -> Quantization:
    """Every quantized module of a checkpoint (headers and config only). An unquantized checkpoint
    gives ``Quantization(None, None, {})``. Raises :class:`StreamfoldError` (one line) on an unknown
    method, FNUZ, quantized tensors without a config, or a tensor no layout of the method explains."""
    for t in tensors.values():
        if t.dtype in FNUZ_DTYPES:
            raise StreamfoldError(f"{_where(t)} is {t.dtype}: AMD's FNUZ float8 encodes values differently "
                                  "from e4m3fn/e5m2 and streamfold does not support it")
    q = quant_config(cfg)
    method = None
    if q is not None:
        method = q.get("quant_method")
        if method not in METHODS:
            raise StreamfoldError(f"config.json: quantization_config quant_method {method!r} is not a format "
                                  f"streamfold knows ({', '.join(sorted(METHODS))})")
        fnuz = _fnuz_path(q)
        if fnuz:
            raise StreamfoldError(f"config.json: {fnuz} asks for AMD's FNUZ float8, which streamfold does not "
                                  "support")
    layouts = [lay for lay in LAYOUTS if method is None or method in lay.methods]
    modules: dict[str, QuantModule] = {}
    owner: dict[str, QuantModule] = {}
    for name in sorted(tensors):
        if name in owner:
            continue
        for lay in layouts:
            module = _match(lay, name, tensors)
            if module is None:
                continue
            if method is None:
                raise StreamfoldError(f"{_where(tensors[name])} is quantized ({lay.kind.format(bits='N')} codes "
                                      f"with {module + lay.scales[0]!r}) but config.json has no "
                                      "quantization_config; a loader could not read it either")
            s = _scheme(lay, method, q, module)
            inp = next((module + x for x in INPUT_SCALES if module + x in tensors), None)
            qm = QuantModule(module, method, lay.key, name, module + lay.logical,
                             tuple(module + x for x in lay.scales),
                             tuple(module + x for x in lay.aux if module + x in tensors), inp,
                             kind=lay.kind.format(bits=s.get("bits") or "N"), **s)
            modules[module] = qm
            for x in qm.tensors:
                owner[x] = qm
            break
    for name in sorted(tensors):
        if name in owner:
            continue
        t = tensors[name]
        if t.dtype in FLOAT8:
            raise StreamfoldError(f"{_where(t)} is {t.dtype} but no scale tensor of a "
                                  f"{method or 'known'} layout sits beside it; streamfold cannot classify it")
        scale_of = next((name[: -len(x)] for x in INPUT_SCALES if name.endswith(x)), None)
        if scale_of is not None and getattr(tensors.get(scale_of + ".weight"), "dtype", None) in WIDE:
            raise StreamfoldError(f"{_where(t)} is a static input scale of {scale_of!r}, whose weight is not "
                                  "quantized (activation-only quantization): a norm folded into it would change "
                                  "the range its input is quantized against; streamfold does not support it")
        marker = next((m for m in MARKERS if name.endswith(m)), None)
        if marker is not None:
            raise StreamfoldError(f"{_where(t)} ({t.dtype}) looks like part of a quantized layer ({marker!r}) but "
                                  f"fits no {method or 'known'} layout streamfold knows; it cannot classify it")
    if q is not None and not modules:
        raise StreamfoldError(f"config.json: quantization_config says quant_method {method!r} but no tensor is "
                              "stored quantized; the config and the weights disagree (remove the config's "
                              "quantization_config if the weights are unquantized)")
    skip_key, skip = None, ()
    if q is not None:
        keys = METHODS[method].skip_keys
        skip_key = next((k for k in keys if q.get(k)), keys[0])
        raw = q.get(skip_key) or []
        if not isinstance(raw, list) or not all(isinstance(s, str) for s in raw):
            raise StreamfoldError(f"config.json: quantization_config {skip_key} must be a list of module names")
        skip = tuple(raw)
    logical = {qm.logical: qm for qm in modules.values()}
    return Quantization(method, q, modules, skip_key, skip, owner, logical)
