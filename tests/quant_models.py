"""Tiny quantized checkpoints built with torch, as the real ones are laid out on disk.

Each builder makes a random bf16 model with stock transformers (norm weights random and far from the
identity), saves it with ``save_pretrained`` (so tensor names are the checkpoint's own), then
quantizes chosen linears the way the publishers do and writes the result sharded: norms, codes and
scales in different files, so a norm never sits beside its consumers and a scale may sit in another
shard than its weight.

- :func:`fp8_block`: ``quant_method: fp8`` (DeepSeek-V3 / Qwen3-FP8): ``weight`` F8_E4M3 and
  ``weight_scale_inv`` F32 per 128x128 tile (amax / 448); ``ue8m0=True`` rounds scales up to powers of 2.
- :func:`ct_fp8_channel`: compressed-tensors float-quantized, channel scales ``[out, 1]``.
- :func:`ct_w4_group`: compressed-tensors pack-quantized INT4, group 32 (packed by the
  ``compressed-tensors`` library's own quantize/pack functions).
- :func:`gpt_oss_mxfp4`: gpt-oss with hand-packed MXFP4 experts (random e2m1 nibbles, E8M0 exponents).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FP8_MAX = 448.0


def tiny_bf16(model_type: str, out: Path, seed: int = 0, reference: Path | None = None,
              **cfg) -> dict[str, torch.Tensor]:
    """A random bf16 model saved with ``save_pretrained`` into ``out``; returns its tensors. With
    ``reference``, the unquantized model is also saved there (to check what a loader decodes)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name.lower() and p.ndim == 1:  # far from the identity, both signs of log-scale
                p.copy_((torch.rand(p.shape, generator=g) * 2.25 + 0.25).to(p.dtype))
            elif name.endswith("bias") or "e_score_correction" in name:
                p.copy_((torch.randn(p.shape, generator=g) * 0.1).to(p.dtype))
    model.save_pretrained(out)
    if reference is not None:
        model.save_pretrained(reference)
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
        f.unlink()
    (out / "model.safetensors.index.json").unlink(missing_ok=True)
    return tensors


def write_sharded(out: Path, tensors: dict[str, torch.Tensor], quant: dict) -> None:
    """Shards by role (norms | quantized codes | everything else), an index, and ``quantization_config``."""
    def role(name: str) -> int:
        if "norm" in name:
            return 0
        t = tensors[name]
        if t.dtype in (torch.float8_e4m3fn, torch.int32, torch.uint8) and not name.endswith(("_scales", "weight_shape")):
            return 1
        return 2
    shards: list[dict] = [{}, {}, {}]
    for name in sorted(tensors):
        shards[role(name)][name] = tensors[name].contiguous()
    shards = [s for s in shards if s]
    weight_map = {}
    for i, s in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(s, str(out / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in s})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"] = quant
    (out / "config.json").write_text(json.dumps(cfg, indent=1))


def quantize_fp8_block(w: torch.Tensor, block=(128, 128), ue8m0: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(codes F8_E4M3 [out, in], scale_inv F32 [ceil(out/bo), ceil(in/bi)])`` with ``W ~ codes * scale``."""
    w = w.float()
    rows, cols = w.shape
    bo, bi = block
    sr, sc = math.ceil(rows / bo), math.ceil(cols / bi)
    pad = torch.zeros(sr * bo, sc * bi)
    pad[:rows, :cols] = w
    tiles = pad.reshape(sr, bo, sc, bi)
    amax = tiles.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale = amax / FP8_MAX
    if ue8m0:
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    q = (tiles / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).reshape(sr * bo, sc * bi)[:rows, :cols]
    return q.to(torch.float8_e4m3fn), scale.float().contiguous()


LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
           "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj")


def _is_linear(name: str) -> bool:
    return name.endswith(".weight") and name.split(".")[-2] in LINEARS


def fp8_block(model_type: str, out: Path, *, skip: tuple[str, ...] = (), ue8m0: bool = False,
              seed: int = 0, reference: Path | None = None, **cfg) -> Path:
    """A ``quant_method: fp8`` checkpoint: every projection FP8 block-quantized except modules whose name
    starts with one of ``skip`` (listed in ``modules_to_not_convert``); embeddings, lm_head, norms, routers bf16."""
    tensors = tiny_bf16(model_type, out, seed, reference, **cfg)
    for name in [n for n in tensors if _is_linear(n)]:
        module = name[: -len(".weight")]
        if any(module.startswith(s) for s in skip):
            continue
        tensors[name], tensors[module + ".weight_scale_inv"] = quantize_fp8_block(tensors[name], ue8m0=ue8m0)
    quant = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": [128, 128]}
    if ue8m0:
        quant["scale_fmt"] = "ue8m0"
    if skip:
        quant["modules_to_not_convert"] = ["lm_head", *skip]
    write_sharded(out, tensors, quant)
    return out


def ct_fp8_channel(model_type: str, out: Path, *, ignore: tuple[str, ...] = ("lm_head",), seed: int = 0,
                   reference: Path | None = None, **cfg) -> Path:
    """compressed-tensors FP8 (float-quantized), per-output-channel bf16 scales, weight-only."""
    tensors = tiny_bf16(model_type, out, seed, reference, **cfg)
    rx = [__import__("re").compile(i[3:]) for i in ignore if i.startswith("re:")]
    for name in [n for n in tensors if _is_linear(n)]:
        module = name[: -len(".weight")]
        if module in ignore or any(r.match(module) for r in rx):
            continue
        w = tensors[name].float()
        s = (w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX).to(torch.bfloat16)
        tensors[name] = (w / s.float()).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        tensors[module + ".weight_scale"] = s
    quant = {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
             "ignore": list(ignore), "config_groups": {"group_0": {
                 "targets": ["Linear"], "format": "float-quantized", "input_activations": None, "output_activations": None,
                 "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True,
                             "dynamic": False, "observer": "minmax"}}}}
    write_sharded(out, tensors, quant)
    return out


def ct_w4_group(model_type: str, out: Path, *, group: int = 32, ignore: tuple[str, ...] = ("lm_head",),
                seed: int = 0, reference: Path | None = None, **cfg) -> Path:
    """compressed-tensors W4A16 (pack-quantized, symmetric INT4, one bf16 scale per ``group`` inputs)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    tensors = tiny_bf16(model_type, out, seed, reference, **cfg)
    rx = [__import__("re").compile(i[3:]) for i in ignore if i.startswith("re:")]
    for name in [n for n in tensors if _is_linear(n)]:
        module = name[: -len(".weight")]
        if module in ignore or any(r.match(module) for r in rx):
            continue
        w = tensors.pop(name).float()
        rows, cols = w.shape
        wg = w.reshape(rows, cols // group, group)
        s = (wg.abs().amax(dim=2).clamp(min=1e-12) / 7.0).to(torch.bfloat16)
        q = torch.round(wg / s.float()[:, :, None]).clamp(-8, 7).to(torch.int8).reshape(rows, cols)
        tensors[module + ".weight_packed"] = pack_to_int32(q, 4)
        tensors[module + ".weight_scale"] = s
        tensors[module + ".weight_shape"] = torch.tensor([rows, cols], dtype=torch.int64)
    quant = {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
             "ignore": list(ignore), "config_groups": {"group_0": {
                 "targets": ["Linear"], "format": "pack-quantized", "input_activations": None, "output_activations": None,
                 "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": group,
                             "symmetric": True, "dynamic": False, "observer": "minmax"}}}}
    write_sharded(out, tensors, quant)
    return out


def gpt_oss_mxfp4(out: Path, seed: int = 0, **cfg) -> Path:
    """gpt-oss whose experts are MXFP4 (``*_blocks`` U8 [E, rows, cols/32, 16], ``*_scales`` U8 E8M0),
    attention, router, embeddings and lm_head bf16, as openai/gpt-oss-20b ships it."""
    tensors = tiny_bf16("gpt_oss", out, seed, **cfg)
    g = torch.Generator().manual_seed(seed + 2)
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        e, cols, rows = tensors.pop(name).shape  # transformers' layout is [E, in, out]; blocks are [E, out, in/32, 16]
        tensors[name + "_blocks"] = torch.randint(0, 256, (e, rows, cols // 32, 16), generator=g, dtype=torch.uint8)
        tensors[name + "_scales"] = torch.randint(119, 124, (e, rows, cols // 32), generator=g, dtype=torch.uint8)
    quant = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    write_sharded(out, tensors, quant)
    return out
