"""Tiny integer-quantized checkpoints for the ``--dequantize`` tests, made by the quantizers' own code.

:func:`ct_pack`: a random bf16 model (tests/quant_models.tiny_bf16: norms random and far from the
identity) whose projections are quantized by compressed-tensors itself -- scales and zero points
from ``calculate_qparams`` over each group / channel's min and max, codes packed by
``PackedQuantizationCompressor.compress`` -- and written in four shards: norms | int32 codes | scales
and zero points | everything else, so no norm sits beside its consumers and no scale beside its codes.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.quant_models import _is_linear, tiny_bf16


def ct_scheme(bits: int, strategy: str, group: int | None, symmetric: bool):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    args = QuantizationArgs(num_bits=bits, type="int", strategy=strategy, group_size=group, symmetric=symmetric)
    return QuantizationScheme(targets=["Linear"], weights=args)


def ct_compress(w: torch.Tensor, scheme) -> dict[str, torch.Tensor]:
    """compressed-tensors' own quantization of one weight ``[out, in]``: min/max per group (or channel)
    -> ``calculate_qparams`` -> ``PackedQuantizationCompressor.compress``."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization.utils import calculate_qparams
    rows, cols = w.shape
    group = scheme.weights.group_size if scheme.weights.strategy == "group" else cols
    wg = w.reshape(rows, cols // group, group)
    scale, zp = calculate_qparams(wg.amin(-1), wg.amax(-1), scheme.weights)
    sd = {"weight": w, "weight_scale": scale, "weight_zero_point": zp}
    return PackedQuantizationCompressor.compress(sd, scheme)


def ct_pack(model_type: str, out: Path, *, bits: int = 4, strategy: str = "group", group: int | None = 32,
            symmetric: bool = False, ignore: tuple[str, ...] = ("lm_head",), seed: int = 0, **cfg) -> Path:
    """A compressed-tensors ``pack-quantized`` checkpoint (every projection not in ``ignore``)."""
    tensors = tiny_bf16(model_type, out, seed, **cfg)
    scheme = ct_scheme(bits, strategy, group, symmetric)
    rx = [re.compile(i[3:]) for i in ignore if i.startswith("re:")]
    for name in [n for n in tensors if _is_linear(n)]:
        module = name[: -len(".weight")]
        if module in ignore or any(r.match(module) for r in rx):
            continue
        for k, v in ct_compress(tensors.pop(name), scheme).items():
            tensors[f"{module}.{k}"] = v
    weights = {"num_bits": bits, "type": "int", "strategy": strategy, "group_size": group, "symmetric": symmetric,
               "dynamic": False, "observer": "minmax"}
    quant = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
             "ignore": list(ignore), "config_groups": {"group_0": {
                 "targets": ["Linear"], "format": "pack-quantized", "input_activations": None,
                 "output_activations": None, "weights": weights}}}
    shards: list[dict] = [{}, {}, {}, {}]
    for name in sorted(tensors):
        role = (0 if "norm" in name else 1 if name.endswith("weight_packed") else
                2 if name.endswith(("weight_scale", "weight_zero_point")) else 3)
        shards[role][name] = tensors[name].contiguous()
    weight_map = {}
    for i, s in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(s, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in s})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    c = json.loads((out / "config.json").read_text())
    c["quantization_config"] = quant
    (out / "config.json").write_text(json.dumps(c, indent=1))
    return out
