"""streamfold.quant.formats: every quantized layout classified from headers and config.json alone.

Checkpoints here are headers with zero-filled data written by hand (any dtype name, FNUZ included),
so each layout's naming is spelled out in the test, independent of the code under test.
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from streamfold.core.errors import StreamfoldError
from streamfold.core.reader import Checkpoint
from streamfold.quant.formats import Quantization, classify

SIZE = {"F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1, "U8": 1, "I8": 1,
        "BF16": 2, "F16": 2, "F32": 4, "I32": 4, "I64": 8}
L0 = "model.layers.0."


def write_ckpt(d: Path, tensors: dict[str, tuple[str, list[int]]], quant: dict | None = None,
               model_type: str = "llama") -> Checkpoint:
    """A one-shard checkpoint whose tensors are zeros of the given dtype names and shapes."""
    d.mkdir(parents=True, exist_ok=True)
    header, off = {}, 0
    for name, (dtype, shape) in tensors.items():
        n = SIZE[dtype]
        for s in shape:
            n *= s
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(off))
    cfg = {"model_type": model_type}
    if quant is not None:
        cfg["quantization_config"] = quant
    (d / "config.json").write_text(json.dumps(cfg))
    return Checkpoint(d)


def run(tmp_path, tensors, quant, **kw):
    ck = write_ckpt(tmp_path / "m", tensors, quant, **kw)
    return classify(json.loads((tmp_path / "m" / "config.json").read_text()), ck.tensors)


NORMS = {L0 + "input_layernorm.weight": ("BF16", [256]), "model.norm.weight": ("BF16", [256]),
         "lm_head.weight": ("BF16", [64, 256])}


def test_fp8_block_with_ragged_tile_and_bf16_head(tmp_path):
    q = run(tmp_path, {**NORMS,
                       L0 + "self_attn.q_proj.weight": ("F8_E4M3", [576, 256]),
                       L0 + "self_attn.q_proj.weight_scale_inv": ("F32", [5, 2])},
            {"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "dynamic"})
    assert q.method == "fp8" and list(q.modules) == [L0 + "self_attn.q_proj"]
    m = q.modules[L0 + "self_attn.q_proj"]
    assert (m.layout, m.weight, m.logical, m.scales) == (
        "fp8", L0 + "self_attn.q_proj.weight", L0 + "self_attn.q_proj.weight", (L0 + "self_attn.q_proj.weight_scale_inv",))
    assert (m.strategy, m.block, m.bits, m.scale_fmt, m.input_scale) == ("block", (128, 128), 8, "float", None)
    assert m.describe() == "FP8 block-quantized (fp8)"
    assert q.consumer(L0 + "self_attn.q_proj.weight") is m and q.owner(L0 + "self_attn.q_proj.weight_scale_inv") is m
    assert q.consumer("lm_head.weight") is None and q.owner("model.norm.weight") is None


def test_fp8_ue8m0_e8m0_scales_static_activation_and_skip_list(tmp_path):
    q = run(tmp_path, {**NORMS,
                       L0 + "mlp.up_proj.weight": ("F8_E4M3", [256, 256]),
                       L0 + "mlp.up_proj.weight_scale_inv": ("F8_E8M0", [2, 2]),
                       L0 + "mlp.up_proj.activation_scale": ("F32", []),
                       L0 + "mlp.gate.weight": ("BF16", [8, 256])},
            {"quant_method": "fp8", "weight_block_size": [128, 128], "scale_fmt": "ue8m0",
             "activation_scheme": "static", "modules_to_not_convert": ["lm_head", "model.layers.*.mlp.gate"]})
    m = q.modules[L0 + "mlp.up_proj"]
    assert m.scale_fmt == "ue8m0" and m.input_scale == L0 + "mlp.up_proj.activation_scale"
    assert L0 + "mlp.up_proj.activation_scale" in m.tensors
    assert q.skip_key == "modules_to_not_convert"
    assert q.skipped("lm_head") and q.skipped(L0 + "mlp.gate") and not q.skipped(L0 + "mlp.gate_proj")
    assert not q.skipped(L0 + "mlp.up_proj")


def test_skip_list_semantics():
    """transformers' documented rules: a prefix up to a module boundary, a regex with that boundary, a suffix."""
    q = Quantization("fp8", {}, {}, "modules_to_not_convert", ("model.layers.1", "model.layers.*.mlp.gate", "fc1"))
    assert q.skipped("model.layers.1.self_attn.q_proj") and not q.skipped("model.layers.11.self_attn.q_proj")
    assert q.skipped("model.layers.7.mlp.gate") and not q.skipped("model.layers.7.mlp.gate_proj")
    assert q.skipped("model.decoder.layers.23.fc1")
    ct = Quantization("compressed-tensors", {}, {}, "ignore", ("lm_head", "re:.*mlp.gate$"))
    assert ct.skipped("lm_head") and ct.skipped("model.layers.3.mlp.gate") and not ct.skipped("model.layers.3.mlp.gate_up")
    assert not ct.skipped("model.lm_head")  # compressed-tensors matches a plain entry as the whole name


@pytest.mark.full
def test_skip_list_matches_transformers(tmp_path):
    """The skip list means what transformers' own matcher says (the installed one is the ground truth)."""
    from transformers.quantizers.quantizers_utils import should_convert_module
    keys = ["lm_head", "model.layers.1", "model.layers.*.mlp.gate", "self_attn", "gate", "fc1"]
    q = Quantization("mxfp4", {}, {}, "modules_to_not_convert", tuple(keys))
    names = ["lm_head", "model.layers.1.self_attn.q_proj", "model.layers.11.self_attn.q_proj",
             "model.layers.11.mlp.gate", "model.layers.11.mlp.gate_proj", "model.layers.2.mlp.experts",
             "model.decoder.layers.23.fc1", "model.decoder.layers.23.fc11", "model.embed_tokens"]
    for name in names:
        for key in keys:
            one = Quantization("mxfp4", q.config, {}, q.skip_key, (key,))
            assert one.skipped(name) == (not should_convert_module(name, [key])), (name, key)
        assert q.skipped(name) == (not should_convert_module(name, keys)), name


def test_deepseek_v4_scale_naming_and_fp4_experts(tmp_path):
    e = L0 + "ffn.experts.0."
    q = run(tmp_path, {**NORMS, L0 + "attn.wq_a.weight": ("F8_E4M3", [128, 256]),
                       L0 + "attn.wq_a.scale": ("F8_E8M0", [1, 2]),
                       e + "w1.weight": ("I8", [64, 128]), e + "w1.scale": ("F8_E8M0", [64, 8]),
                       L0 + "attn.q_norm.weight": ("BF16", [128]), L0 + "attn.q_norm.scale": ("F32", [128])},
            {"quant_method": "fp8", "weight_block_size": [128, 128], "scale_fmt": "ue8m0", "expert_dtype": "fp4"})
    assert q.modules[L0 + "attn.wq_a"].layout == "fp8-scale"
    w1 = q.modules[e + "w1"]
    assert (w1.layout, w1.block, w1.bits) == ("fp4-scale", (1, 32), 4)
    assert q.owner(L0 + "attn.q_norm.scale") is None  # a bf16 weight's ".scale" is not a quant scale


def test_compressed_tensors_float_pack_and_ignore(tmp_path):
    a, p = L0 + "self_attn.q_proj", L0 + "mlp.down_proj"
    q = run(tmp_path, {**NORMS,
                       a + ".weight": ("F8_E4M3", [256, 256]), a + ".weight_scale": ("BF16", [256, 1]),
                       a + ".input_scale": ("F32", [1]),
                       p + ".weight_packed": ("I32", [256, 32]), p + ".weight_scale": ("BF16", [256, 8]),
                       p + ".weight_shape": ("I64", [2]), p + ".weight_zero_point": ("I32", [32, 8]),
                       L0 + "mlp.gate.weight": ("BF16", [8, 256])},
            {"quant_method": "compressed-tensors", "format": "mixed-precision",
             "ignore": ["lm_head", "re:.*mlp.gate$"],
             "config_groups": {
                 "g0": {"targets": ["re:.*down_proj$"], "format": "pack-quantized",
                        "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 32,
                                    "symmetric": False}},
                 "g1": {"targets": ["Linear"], "format": "float-quantized",
                        "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
                        "input_activations": {"num_bits": 8, "type": "float", "strategy": "tensor",
                                              "dynamic": False}}}})
    fa, fp = q.modules[a], q.modules[p]
    assert (fa.layout, fa.strategy, fa.block, fa.input_scale) == ("ct-float", "channel", None, a + ".input_scale")
    assert fa.describe() == "FP8 channel-quantized (compressed-tensors)"
    assert (fp.layout, fp.weight, fp.logical, fp.block, fp.bits) == ("ct-pack", p + ".weight_packed", p + ".weight",
                                                                     (1, 32), 4)
    assert set(fp.tensors) == {p + x for x in (".weight_packed", ".weight_scale", ".weight_shape", ".weight_zero_point")}
    assert fp.describe() == "INT4 group-quantized (compressed-tensors)"
    assert q.consumer(p + ".weight") is fp and q.consumer(p + ".weight_packed") is None
    assert q.skip_key == "ignore" and q.skipped("lm_head") and q.skipped(L0 + "mlp.gate")
    assert not q.skipped(L0 + "mlp.gate_proj")


def test_nvfp4_and_block_fp8(tmp_path):
    n, b = L0 + "mlp.up_proj", L0 + "mlp.gate_proj"
    q = run(tmp_path, {**NORMS, n + ".weight_packed": ("U8", [256, 128]), n + ".weight_scale": ("F8_E4M3", [256, 16]),
                       n + ".weight_global_scale": ("F32", [1]),
                       b + ".weight": ("F8_E4M3", [256, 256]), b + ".weight_scale": ("F32", [2, 2])},
            {"quant_method": "compressed-tensors", "config_groups": {
                "a": {"targets": ["re:.*up_proj"], "weights": {"num_bits": 4, "type": "float", "strategy": "tensor_group",
                                                               "group_size": 16}},
                "b": {"targets": ["re:.*gate_proj"], "weights": {"num_bits": 8, "type": "float", "strategy": "block",
                                                                 "block_structure": [128, 128]}}}})
    assert (q.modules[n].layout, q.modules[n].block) == ("ct-nvfp4", (1, 16))
    assert (q.modules[b].layout, q.modules[b].block) == ("ct-float", (128, 128))


def test_mxfp4_gpt_oss_fused_experts(tmp_path):
    e = L0 + "mlp.experts."
    q = run(tmp_path, {**NORMS, e + "gate_up_proj_blocks": ("U8", [4, 128, 8, 16]),
                       e + "gate_up_proj_scales": ("U8", [4, 128, 8]), e + "gate_up_proj_bias": ("BF16", [4, 128]),
                       e + "down_proj_blocks": ("U8", [4, 256, 2, 16]), e + "down_proj_scales": ("U8", [4, 256, 2]),
                       L0 + "self_attn.q_proj.weight": ("BF16", [256, 256]), L0 + "mlp.router.weight": ("BF16", [4, 256])},
            {"quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                                 "model.embed_tokens", "lm_head"]}, model_type="gpt_oss")
    assert sorted(q.modules) == [e + "down_proj", e + "gate_up_proj"]
    m = q.consumer(e + "gate_up_proj")
    assert (m.layout, m.weight, m.scales, m.block) == ("mxfp4", e + "gate_up_proj_blocks", (e + "gate_up_proj_scales",), (1, 32))
    assert q.owner(e + "gate_up_proj_bias") is None
    assert q.skipped(L0 + "self_attn") and not q.skipped(e[:-1])


@pytest.mark.parametrize("method,tensors,layout,extra", [
    ("gptq", {"qweight": ("I32", [32, 256]), "qzeros": ("I32", [2, 32]), "scales": ("F16", [2, 256]),
              "g_idx": ("I32", [256])}, "gptq", {"bits": 4, "group_size": 128}),
    ("awq", {"qweight": ("I32", [256, 32]), "qzeros": ("I32", [2, 32]), "scales": ("F16", [2, 256])}, "awq",
     {"bits": 4, "group_size": 128}),
    ("bitsandbytes", {"weight": ("U8", [32768, 1]), "weight.absmax": ("F32", [1024]), "weight.quant_map": ("F32", [16]),
                      "weight.quant_state.bitsandbytes__nf4": ("U8", [100])}, "bnb-4bit", {"load_in_4bit": True}),
    ("bitsandbytes", {"weight": ("I8", [256, 256]), "SCB": ("F32", [256])}, "bnb-8bit", {"load_in_8bit": True}),
    ("fbgemm_fp8", {"weight": ("F8_E4M3", [256, 256]), "weight_scale": ("F32", [256, 1])}, "fbgemm-fp8", {}),
], ids=["gptq", "awq", "bnb4", "bnb8", "fbgemm"])
def test_other_methods(tmp_path, method, tensors, layout, extra):
    mod = L0 + "self_attn.q_proj"
    q = run(tmp_path, {**NORMS, **{mod + "." + k: v for k, v in tensors.items()}}, {"quant_method": method, **extra})
    m = q.modules[mod]
    assert m.layout == layout and m.logical == mod + ".weight"
    assert set(m.tensors) == {mod + "." + k for k in tensors}


def test_unquantized_checkpoint(tmp_path):
    q = run(tmp_path, {**NORMS, L0 + "self_attn.q_proj.weight": ("BF16", [256, 256])}, None)
    assert q.method is None and not q.quantized and q.modules == {}


@pytest.mark.parametrize("tensors,quant,needle", [
    ({}, {"quant_method": "fp8", "weight_block_size": [128, 128]},
     r"^config\.json: quantization_config says quant_method 'fp8' but no tensor is stored quantized"),
    ({}, {"quant_method": "hqq"}, r"^config\.json: quantization_config quant_method 'hqq' is not a format"),
    ({}, {"quant_method": "fp8", "weight_block_size": [128, 128], "fp8_dtype": "float8_e4m3fnuz"},
     r"^config\.json: quantization_config\.fp8_dtype asks for AMD's FNUZ"),
    ({}, {"quant_method": "compressed-tensors", "use_fnuz": True}, r"quantization_config\.use_fnuz asks for AMD's FNUZ"),
    ({"x.weight": ("F8_E4M3FNUZ", [4, 4]), "x.weight_scale_inv": ("F32", [1, 1])}, {"quant_method": "fp8"},
     r"^model\.safetensors: tensor 'x\.weight' is F8_E4M3FNUZ: AMD's FNUZ"),
    ({"x.weight": ("F8_E4M3", [4, 4]), "x.weight_scale_inv": ("F32", [1, 1])}, None,
     r"^model\.safetensors: tensor 'x\.weight' is quantized \(FP8 codes with 'x\.weight_scale_inv'\) but config\.json "
     r"has no quantization_config"),
    ({"x.weight": ("F8_E5M2", [4, 4])}, {"quant_method": "fbgemm_fp8"},
     r"^model\.safetensors: tensor 'x\.weight' is F8_E5M2 but no scale tensor of a fbgemm_fp8 layout"),
    ({"x.weight": ("BF16", [4, 4]), "x.weight_scale_inv": ("F32", [1, 1])}, {"quant_method": "fp8"},
     r"^model\.safetensors: tensor 'x\.weight_scale_inv' \(F32\) looks like part of a quantized layer"),
    ({"x.weight_packed": ("I32", [4, 1]), "x.weight_scale": ("BF16", [4, 1])},
     {"quant_method": "compressed-tensors", "config_groups": {"g": {"targets": ["Linear"], "weights": {}}}},
     r"^model\.safetensors: tensor 'x\.weight_packed' \(I32\) looks like part of a quantized layer"),
    ({"x.weight": ("F8_E4M3", [4, 4]), "x.weight_scale_inv": ("F32", [1, 1])},
     {"quant_method": "fp8", "weight_block_size": [128]}, r"weight_block_size must be a list of 2 positive integers"),
    ({"x.weight": ("F8_E4M3", [4, 4]), "x.weight_scale": ("F32", [4, 1])},
     {"quant_method": "compressed-tensors", "config_groups": {"g": {"targets": ["re:.*y$"], "weights": {}}}},
     r"no quantization_config\.config_groups target matches 'x'"),
], ids=["nothing_quantized", "unknown_method", "fnuz_value", "fnuz_key", "fnuz_dtype", "no_config", "f8_without_scale",
        "lone_scale", "pack_without_shape", "bad_block", "no_group"])
def test_refusals_are_one_line(tmp_path, tensors, quant, needle):
    import re
    with pytest.raises(StreamfoldError) as ei:
        run(tmp_path, {**NORMS, **tensors}, quant)
    msg = str(ei.value)
    assert re.search(needle, msg), msg
    assert "\n" not in msg
