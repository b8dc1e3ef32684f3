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


def _save(out: Path, tensors: dict, quant: dict, codes: str, aux: tuple[str, ...]) -> Path:
    """Four shards (norms | codes | scales and zero points | the rest, so no norm sits beside its
    consumers and scales sit apart from their codes), the index, and ``quant`` in config.json."""
    shards: list[dict] = [{}, {}, {}, {}]
    for name in sorted(tensors):
        role = 0 if "norm" in name else 1 if name.endswith(codes) else 2 if name.endswith(aux) else 3
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
    return _save(out, tensors, quant, "weight_packed", ("weight_scale", "weight_zero_point"))


# ---------------------------------------------------------------- GPTQ / AWQ (no loader installed: packed here)

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's WQLinear_GEMM.from_linear packing order


def _words(codes, bits: int, axis: int):
    """Pack non-negative codes ``bits`` wide, 32/bits per int32 along ``axis`` (element k at bit k·bits),
    as AutoGPTQ's ``QuantLinear.pack`` does (numpy uint32, viewed as int32)."""
    import numpy as np
    c = np.moveaxis(np.asarray(codes, dtype=np.uint32), axis, 0)
    pf = 32 // bits
    out = np.zeros((c.shape[0] // pf, *c.shape[1:]), dtype=np.uint32)
    for k in range(pf):
        out |= c[k::pf] << np.uint32(k * bits)
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(out, 0, axis)).view(np.int32))


def gptq_quantize(w: torch.Tensor, bits: int, group: int, sym: bool, v2: bool, act_order: bool, seed: int):
    """AutoGPTQ-style round-to-nearest quantization of ``w`` [out, in] (min/max per group and output,
    zero points in [1, maxq], fp16 scales; act-order: groups over a random permutation of the inputs)."""
    out_f, in_f = w.shape
    maxq = (1 << bits) - 1
    g = group if group > 0 else in_f
    perm = torch.randperm(in_f, generator=torch.Generator().manual_seed(seed)) if act_order else torch.arange(in_f)
    g_idx = (torch.argsort(perm) // g).to(torch.int32)  # the rank of input i in quantization order, by group
    groups = -(-in_f // g)
    scales = torch.empty(groups, out_f, dtype=torch.float16)
    zeros = torch.empty(groups, out_f, dtype=torch.int64)
    q = torch.empty(in_f, out_f, dtype=torch.int64)
    wt = w.float().T  # [in, out]
    for k in range(groups):
        rows = (g_idx == k).nonzero().reshape(-1)
        x = wt[rows]
        lo, hi = x.min(0).values.clamp(max=0), x.max(0).values.clamp(min=0)
        s = ((hi - lo) / maxq).clamp(min=1e-6).to(torch.float16)
        z = torch.full_like(lo, (maxq + 1) // 2, dtype=torch.int64) if sym else \
            torch.round(-lo / s.float()).clamp(1, maxq).to(torch.int64)
        scales[k], zeros[k] = s, z
        q[rows] = (torch.round(x / s.float()) + z).clamp(0, maxq).to(torch.int64)
    stored = zeros if v2 else zeros - 1
    return {"qweight": _words(q.numpy(), bits, 0), "qzeros": _words(stored.numpy(), bits, 1), "scales": scales,
            "g_idx": g_idx}


def awq_quantize(w: torch.Tensor, group: int):
    """AutoAWQ GEMM 4-bit: zero point and fp16 scale per group of inputs and output, codes [in, out]
    packed 8 outputs per int32 in AWQ_ORDER."""
    import numpy as np
    out_f, in_f = w.shape
    wg = w.float().reshape(out_f, in_f // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    s = ((hi - lo) / 15).clamp(min=1e-5).to(torch.float16)  # [out, groups]
    z = torch.round(-lo / s.float()).clamp(0, 15).to(torch.int64)
    q = (torch.round(wg / s.float()[..., None]) + z[..., None]).clamp(0, 15).reshape(out_f, in_f).to(torch.int64)

    def pack(x):  # [r, out] -> [r, out/8]: nibble k holds column 8w + AWQ_ORDER[k]
        x = np.asarray(x, dtype=np.uint32)
        out = np.zeros((x.shape[0], x.shape[1] // 8), dtype=np.uint32)
        for k, m in enumerate(AWQ_ORDER):
            out |= x[:, m::8] << np.uint32(4 * k)
        return torch.from_numpy(out.view(np.int32))
    return {"qweight": pack(q.T.numpy()), "qzeros": pack(z.T.numpy()), "scales": s.T.contiguous()}


def gptq_awq(model_type: str, out: Path, method: str, *, bits: int = 4, group: int = 32, sym: bool = False,
             v2: bool = False, act_order: bool = False, seed: int = 0, **cfg) -> Path:
    """A GPTQ (``checkpoint_format`` gptq / gptq_v2) or AWQ GEMM checkpoint: every projection quantized,
    lm_head and embeddings bf16; shards norms | qweight | scales, qzeros, g_idx | the rest."""
    tensors = tiny_bf16(model_type, out, seed, **cfg)
    for i, name in enumerate([n for n in tensors if _is_linear(n)]):
        module = name[: -len(".weight")]
        w = tensors.pop(name)
        parts = (gptq_quantize(w, bits, group, sym, v2, act_order, seed + i) if method == "gptq"
                 else awq_quantize(w, group))
        tensors.update({f"{module}.{k}": v for k, v in parts.items()})
    quant = ({"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": act_order, "sym": sym,
              "checkpoint_format": "gptq_v2" if v2 else "gptq"} if method == "gptq" else
             {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"})
    return _save(out, tensors, quant, "qweight", ("scales", "qzeros", "g_idx"))


def ct_int(model_type: str, out: Path, *, strategy: str = "channel", group: int | None = None,
           symmetric: bool = True, seed: int = 0, **cfg) -> Path:
    """A compressed-tensors ``int-quantized`` W8A16 checkpoint (``weight`` I8, ``weight_scale``, an
    asymmetric scheme's ``weight_zero_point`` I8), quantized by compressed-tensors' ``calculate_qparams``
    and ``IntQuantizationCompressor``; shards norms | codes | scales and zero points | the rest."""
    from compressed_tensors.compressors.naive_quantized.base import IntQuantizationCompressor
    from compressed_tensors.quantization.utils import calculate_qparams
    tensors = tiny_bf16(model_type, out, seed, **cfg)
    scheme = ct_scheme(8, strategy, group, symmetric)
    for name in [n for n in tensors if _is_linear(n)]:
        module = name[: -len(".weight")]
        w = tensors.pop(name)
        rows, cols = w.shape
        g = group if strategy == "group" else cols
        wg = w.reshape(rows, cols // g, g)
        scale, zp = calculate_qparams(wg.amin(-1), wg.amax(-1), scheme.weights)
        sd = IntQuantizationCompressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zp}, scheme)
        tensors.update({f"{module}.{k}": v for k, v in sd.items()})
    weights = {"num_bits": 8, "type": "int", "strategy": strategy, "group_size": group, "symmetric": symmetric,
               "dynamic": False, "observer": "minmax"}
    quant = {"quant_method": "compressed-tensors", "format": "int-quantized", "quantization_status": "compressed",
             "ignore": ["lm_head"], "config_groups": {"group_0": {
                 "targets": ["Linear"], "format": "int-quantized", "input_activations": None,
                 "output_activations": None, "weights": weights}}}
    shards: list[dict] = [{}, {}, {}, {}]
    for name in sorted(tensors):
        t = tensors[name]
        role = (0 if "norm" in name else 1 if t.dtype == torch.int8 and name.endswith(".weight") else
                2 if name.endswith(("weight_scale", "weight_zero_point")) else 3)
        shards[role][name] = t.contiguous()
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
