"""Classify a quantized checkpoint's tensors from safetensors headers and ``config.json`` alone.

Every quantized module is recognised by its on-disk *layout*: the suffix and dtype of the tensor that
holds its codes plus the sibling tensors that must sit beside it (``X.weight`` F8_E4M3 with
``X.weight_scale_inv`` is FP8 block-quantized; ``X_blocks`` U8 with ``X_scales`` is gpt-oss MXFP4;
...). The layouts are one table (:data:`LAYOUTS`), tried in order, restricted to the ones the
config's ``quant_method`` can produce (:data:`METHODS`); block and group sizes come from the config,
never from shapes (a 576-row FP8 tensor has a ragged last tile, not a 72-row block).

Refused with one line naming the tensor or the config key (:class:`StreamfoldError`):
an unknown ``quant_method``; AMD's FNUZ float8 variants (a dtype ``F8_E4M3FNUZ``/``F8_E5M2FNUZ`` or
``fnuz`` anywhere in ``quantization_config``: their bit patterns decode differently from e4m3fn);
quantized tensors with no ``quantization_config``; a quantized-looking tensor that fits no layout of
the config's method (an F8 tensor without its scale, a lone ``weight_scale_inv``, ...).

API (stable; ``streamfold.quant.decode`` and the planner build on it):
``classify(cfg, tensors) -> Quantization``; ``Quantization.modules`` maps module names to
:class:`QuantModule`; ``Quantization.owner(tensor)`` and ``Quantization.consumer(logical_weight)``
find the module a stored tensor belongs to, or whose unquantized weight would carry a name.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping

from ..core.errors import StreamfoldError
from ..core.reader import TensorInfo

FNUZ_DTYPES = frozenset({"F8_E4M3FNUZ", "F8_E5M2FNUZ"})
FLOAT8 = frozenset({"F8_E4M3", "F8_E5M2"})
E8M0 = frozenset({"F8_E8M0", "U8"})  # power-of-two scales: 2^(u - 127), stored as F8_E8M0 or raw bytes
WIDE = frozenset({"F32", "BF16", "F16"})
INPUT_SCALES = (".input_scale", ".activation_scale")  # static activation scales (a fold would change x)


@dataclass(frozen=True)
class Layout:
    """One on-disk shape of a quantized module, matched as ``module + suffix`` names.

    ``weight``: suffix of the codes tensor (its dtype must be in ``weight_dtypes``); ``scales``:
    required sibling suffixes (the first one's dtype must be in ``scale_dtypes`` when that is set);
    ``aux``: optional siblings that belong to the module (zero points, shapes, global scales);
    ``logical``: the suffix the unquantized checkpoint gives the weight (``.weight``; ``""`` for
    gpt-oss's fused expert parameters). ``kind`` names the code type (``{bits}`` filled from the config),
    ``strategy`` the scale granularity when the config does not say.
    """

    key: str
    methods: frozenset[str]
    kind: str
    weight: str
    weight_dtypes: frozenset[str]
    scales: tuple[str, ...]
    scale_dtypes: frozenset[str] | None = None
    aux: tuple[str, ...] = ()
    logical: str = ".weight"
    strategy: str | None = None


_CT = frozenset({"compressed-tensors"})
# Tried in order: a more specific layout (more required siblings, narrower dtypes) comes first.
LAYOUTS: tuple[Layout, ...] = (
    Layout("fp8", frozenset({"fp8"}), "FP8", ".weight", FLOAT8, (".weight_scale_inv",), WIDE | E8M0),
    Layout("fp8-scale", frozenset({"fp8"}), "FP8", ".weight", FLOAT8, (".scale",), WIDE | E8M0),  # DeepSeek-V4
    Layout("fp8-qscale", frozenset({"fp8"}), "FP8", ".weight", FLOAT8, (".qscale_weight",), WIDE | E8M0),  # Mistral
    Layout("fp4-scale", frozenset({"fp8"}), "FP4 (e2m1)", ".weight", frozenset({"I8"}), (".scale",), E8M0,
           strategy="group"),  # DeepSeek-V4 experts: two e2m1 codes per byte, E8M0 scale per 32
    Layout("ct-nvfp4", _CT, "NVFP4", ".weight_packed", frozenset({"U8"}),
           (".weight_scale", ".weight_global_scale"), aux=(".input_global_scale",)),
    Layout("ct-mxfp4", _CT, "MXFP4", ".weight_packed", frozenset({"U8"}), (".weight_scale",), E8M0,
           aux=(".input_global_scale",)),
    Layout("ct-pack", _CT, "INT{bits}", ".weight_packed", frozenset({"I32"}), (".weight_scale", ".weight_shape"),
           aux=(".weight_zero_point", ".weight_g_idx", ".input_global_scale")),
    Layout("ct-mxfp8", _CT, "MXFP8", ".weight", FLOAT8, (".weight_scale",), E8M0),
    Layout("ct-float", _CT, "FP8", ".weight", FLOAT8, (".weight_scale",), WIDE, aux=(".weight_zero_point",)),
    Layout("ct-int", _CT, "INT{bits}", ".weight", frozenset({"I8"}), (".weight_scale",), WIDE,
           aux=(".weight_zero_point",)),
    Layout("fbgemm-fp8", frozenset({"fbgemm_fp8"}), "FP8", ".weight", FLOAT8, (".weight_scale",), WIDE,
           strategy="channel"),
    Layout("mxfp4", frozenset({"mxfp4"}), "MXFP4", "_blocks", frozenset({"U8"}), ("_scales",), E8M0,
           logical="", strategy="group"),
    Layout("gptq", frozenset({"gptq"}), "INT{bits}", ".qweight", frozenset({"I32"}), (".scales", ".qzeros"),
           aux=(".g_idx",), strategy="group"),
    Layout("awq", frozenset({"awq"}), "INT{bits}", ".qweight", frozenset({"I32"}), (".scales", ".qzeros"),
           strategy="group"),
    Layout("bnb-4bit", frozenset({"bitsandbytes"}), "4-bit (NF4/FP4)", ".weight", frozenset({"U8"}),
           (".weight.absmax", ".weight.quant_map"),
           aux=(".weight.nested_absmax", ".weight.nested_quant_map", ".weight.quant_state.bitsandbytes__nf4",
                ".weight.quant_state.bitsandbytes__fp4"), strategy="block"),
    Layout("bnb-8bit", frozenset({"bitsandbytes"}), "INT8", ".weight", frozenset({"I8"}), (".SCB",),
           aux=(".weight_format",), strategy="channel"),
)


@dataclass(frozen=True)
class Method:
    """A ``quant_method``: the config key listing modules it leaves unquantized (``skip_keys``, the first
    one is where a writer adds widened modules) and whether those entries match as ``re:`` patterns."""

    skip_keys: tuple[str, ...]
    regex_skip: bool = False


METHODS: dict[str, Method] = {
    "fp8": Method(("modules_to_not_convert", "ignored_layers")),
    "compressed-tensors": Method(("ignore",), regex_skip=True),
    "mxfp4": Method(("modules_to_not_convert",)),
    "gptq": Method(("modules_to_not_convert",)),
    "awq": Method(("modules_to_not_convert",)),
    "bitsandbytes": Method(("llm_int8_skip_modules", "modules_to_not_convert")),
    "fbgemm_fp8": Method(("modules_to_not_convert",)),
}

# Suffixes that only quantized layers use: a tensor ending in one that no layout claims is refused.
MARKERS = (".weight_scale_inv", ".weight_scale", ".weight_packed", ".weight_zero_point", ".weight_shape",
           ".weight_g_idx", ".weight_global_scale", ".input_global_scale", ".qscale_weight", ".qweight",
           ".qzeros", ".g_idx", ".absmax", ".quant_map", ".SCB") + INPUT_SCALES


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
        g = q.get("group_size", 128)
        bits = q.get("bits", q.get("w_bit", 4))
        if g in (-1, None):
            return {"strategy": "channel", "block": None, "bits": bits}
        return {"strategy": "group", "block": (1, _ints([g], "group_size", 1)[0]), "bits": bits}
    if method == "mxfp4":
        return {"strategy": "group", "block": (1, 32), "bits": 4}  # the OCP MX format's block
    return {"strategy": layout.strategy, "block": None, "bits": 8 if method == "fbgemm_fp8" else None}


def _match(layout: Layout, name: str, tensors: Mapping[str, TensorInfo]) -> str | None:
    """The module name if ``name`` is the codes tensor of ``layout`` with all required siblings."""
    t = tensors[name]
    if not name.endswith(layout.weight) or t.dtype not in layout.weight_dtypes:
        return None
    module = name[: -len(layout.weight)]
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
        marker = next((m for m in MARKERS if name.endswith(m)), None)
        if marker is not None:
            raise StreamfoldError(f"{_where(t)} ({t.dtype}) looks like part of a quantized layer ({marker!r}) but "
                                  f"fits no {method or 'known'} layout streamfold knows; it cannot classify it")
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
