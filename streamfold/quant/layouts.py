"""The quantized layouts streamfold recognises, as data: one row per on-disk shape of a quantized module.

:mod:`streamfold.quant.formats` matches these against a checkpoint's headers (in order, restricted to
the rows of the config's ``quant_method``). Adding a format is adding a row here (and a decoder);
the names follow the publishers' checkpoints and the loaders that read them (transformers 5.2x,
compressed-tensors 0.20).
"""
from __future__ import annotations

from dataclasses import dataclass

FNUZ_DTYPES = frozenset({"F8_E4M3FNUZ", "F8_E5M2FNUZ"})
FLOAT8 = frozenset({"F8_E4M3", "F8_E5M2"})
E8M0 = frozenset({"F8_E8M0", "U8"})  # power-of-two scales: 2^(u - 127), stored as F8_E8M0 or raw bytes
WIDE = frozenset({"F32", "BF16", "F16"})
INPUT_SCALES = (".input_scale", ".activation_scale")  # static activation scales (a fold would change x)


@dataclass(frozen=True)
class Layout:
    """One on-disk shape of a quantized module, matched as ``module + suffix`` names.

    ``weight``: suffix of the codes tensor (its dtype must be in ``weight_dtypes``; ``""``: the codes
    tensor is named as the module, e.g. fused experts ``X.experts.gate_up_proj``); ``scales``:
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
    Layout("fp8-fused", frozenset({"fp8"}), "FP8", "", FLOAT8, ("_scale_inv",), WIDE | E8M0, logical=""),
    # ^ transformers' fused experts: ``X.experts.gate_up_proj`` F8 [E, out, in] + ``..._scale_inv`` [E, grid]
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
