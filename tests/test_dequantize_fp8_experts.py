"""``--dequantize`` of fused 3-D FP8 experts (one tensor for all experts, transformers' in-memory layout).

Source: a tiny Qwen3-MoE whose experts are stored as transformers holds them, ``mlp.experts.gate_up_proj``
F8_E4M3 ``[E, 2I, H]`` and ``down_proj`` ``[E, H, I]``, each with ``..._scale_inv`` ``[E, ceil(out/128),
ceil(in/128)]`` (128x128 tiles per expert, amax/448), attention FP8 block-quantized per module; I = 96,
so every expert has a ragged 64-row gate_up tile and a ragged 96-column down tile. Norms, codes and
scales sit in different shards. transformers 5.25 does not decode such a source (on CPU it loads the
codes as plain weights and reports the ``*_scale_inv`` tensors as unexpected), so the logits reference is
a float32 checkpoint holding torch's float64 ``q·s`` of every quantized tensor and the original norms.

- every widened expert element equals torch's float64 ``q·s·g`` rounded once (numpy / ml_dtypes), the
  scales are gone, ``modules_to_not_convert`` names ``model.layers.N.mlp.experts`` (the FP8 experts
  module transformers would build) and q/k/v;
- the float32-merged output loads in stock transformers with logits within 1e-5 relative of the
  reference, argmax equal; ``--dequantize all`` in bf16: no quantization_config, argmax equal;
- ``verify`` passes, and a flipped bit in the last expert is reported in that tensor; without
  ``--dequantize`` the experts' norm is kept with a reason naming them, the experts byte for byte.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.full

QMOE = dict(hidden_size=256, intermediate_size=384, moe_intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=128, vocab_size=320, num_experts=4,
            num_experts_per_tok=2, tie_word_embeddings=False, max_position_embeddings=64, decoder_sparse_step=1,
            mlp_only_layers=[])
E = 4
EXPERTS = [f"model.layers.{n}.mlp.experts.{p}" for n in (0, 1) for p in ("gate_up_proj", "down_proj")]


def build(out: Path) -> Path:
    from tests import quant_models as qm
    from tests.quantfactory import quantize_fp8_block
    t = qm.tiny_bf16("qwen3_moe", out, **QMOE)
    for n in range(2):
        p = f"model.layers.{n}.mlp.experts."
        gu = torch.stack([torch.cat([t.pop(f"{p}{e}.gate_proj.weight"), t.pop(f"{p}{e}.up_proj.weight")])
                          for e in range(E)])
        dn = torch.stack([t.pop(f"{p}{e}.down_proj.weight") for e in range(E)])
        for name, w in (("gate_up_proj", gu), ("down_proj", dn)):
            qs = [quantize_fp8_block(w[e].float(), (128, 128)) for e in range(E)]
            t[p + name] = torch.stack([q for q, _ in qs])
            t[p + name + "_scale_inv"] = torch.stack([s for _, s in qs])
    for name in [k for k in t if k.endswith("_proj.weight") and "experts" not in k]:
        t[name], t[name[:-7] + ".weight_scale_inv"] = quantize_fp8_block(t[name].float(), (128, 128))
    qm.write_sharded(out, t, {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                              "weight_block_size": [128, 128]})
    return out


def qs64(s: dict, name: str) -> torch.Tensor:
    """torch's float64 q·s of an FP8 block-quantized tensor (2-D, or 3-D one expert at a time)."""
    q = s[name].to(torch.float64)
    sc = s[name + "_scale_inv" if not name.endswith(".weight") else name[:-7] + ".weight_scale_inv"].to(torch.float64)
    full = sc.repeat_interleave(128, -2).repeat_interleave(128, -1)[..., :q.shape[-2], :q.shape[-1]]
    return q * full


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    root = tmp_path_factory.mktemp("fused")
    path = build(root / "src")
    from safetensors.torch import save_file
    from tests.test_quant_partial import read_all
    s = read_all(path)
    ref = root / "ref"
    ref.mkdir()
    t = {k: v.float() for k, v in s.items() if "scale_inv" not in k}
    t.update({k: qs64(s, k).float() for k, v in s.items() if v.dtype == torch.float8_e4m3fn})
    save_file({k: v.contiguous() for k, v in t.items()}, str(ref / "model.safetensors"))
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("quantization_config")
    (ref / "config.json").write_text(json.dumps(cfg))
    return path, ref


def test_dequantize_fused_fp8_experts(src, tmp_path):
    import ml_dtypes
    from tests.test_dequantize_int import logits_of, rel
    from tests.test_quant_partial import cli, raw, read_all
    path, ref = src
    f32, bf16 = tmp_path / "f32", tmp_path / "bf16"
    r = cli(path, f32, "-q", "--dequantize", "--merged-dtype", "float32", "--memory-budget", "1M")
    assert r.returncode == 0, r.stderr
    r = cli(path, bf16, "-q", "--dequantize", "all")
    assert r.returncode == 0, r.stderr
    s = read_all(path)
    for dst, out in ((f32, "F32"), (bf16, "BF16")):
        d = read_all(dst)
        for name in EXPERTS:
            exact = qs64(s, name)
            if name.endswith("gate_up_proj"):
                exact = exact * s[name.replace("mlp.experts.gate_up_proj", "post_attention_layernorm.weight")
                                  ].to(torch.float64)
            want = (exact.numpy().astype(np.float32).view(np.uint32) if out == "F32"
                    else exact.numpy().astype(ml_dtypes.bfloat16).view(np.uint16))
            got = d[name].view(torch.int32 if out == "F32" else torch.int16).numpy().view(want.dtype)
            np.testing.assert_array_equal(got, want, err_msg=f"{out} {name}")
            assert name + "_scale_inv" not in d
    q = json.loads((f32 / "config.json").read_text())["quantization_config"]
    assert sorted(q["modules_to_not_convert"]) == sorted(
        [f"model.layers.{n}.{m}" for n in (0, 1) for m in ("mlp.experts", "self_attn.q_proj", "self_attn.k_proj",
                                                            "self_attn.v_proj")])
    assert "quantization_config" not in json.loads((bf16 / "config.json").read_text())
    for m in ("self_attn.o_proj.weight", "self_attn.o_proj.weight_scale_inv"):
        assert raw(read_all(f32)[f"model.layers.1.{m}"]) == raw(s[f"model.layers.1.{m}"])
    want, got = logits_of(ref), logits_of(f32)
    assert rel(got, want) <= 1e-5, rel(got, want)
    assert (got.argmax(-1) == want.argmax(-1)).all() and (logits_of(bf16).argmax(-1) == want.argmax(-1)).all()
    for dst in (f32, bf16):
        r = cli("verify", path, dst, "-q")
        assert r.returncode == 0, r.stdout + r.stderr
    bad = tmp_path / "bad"
    shutil.copytree(f32, bad)
    from streamfold.core.reader import Checkpoint
    t = Checkpoint(bad).tensors["model.layers.1.mlp.experts.down_proj"]
    at = t.begin + t.nbytes - 4 * 50  # in the last expert
    with open(t.path, "r+b") as f:
        f.seek(at)
        b = bytearray(f.read(1))
        b[0] ^= 1
        f.seek(at)
        f.write(b)
    r = cli("verify", path, bad)
    assert r.returncode != 0 and "model.layers.1.mlp.experts.down_proj" in r.stdout + r.stderr, r.stdout
    assert "[3, " in r.stdout + r.stderr, r.stdout  # the element's index names the last expert
    part = tmp_path / "partial"
    r = cli(path, part, "-q")
    assert r.returncode == 0, r.stderr
    p = read_all(part)
    for name in EXPERTS:
        assert raw(p[name]) == raw(s[name]) and raw(p[name + "_scale_inv"]) == raw(s[name + "_scale_inv"])
    r = cli("inspect", path, "--json")
    kept = {n["norm"]: n.get("reason", "") for n in json.loads(r.stdout)["norms"]}
    assert "mlp.experts.gate_up_proj is FP8 block-quantized (fp8)" in kept["model.layers.*.post_attention_layernorm"]
