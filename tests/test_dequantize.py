"""``--dequantize`` of an FP8 block-quantized source, end to end, proven in stock transformers.

The source is a tiny Qwen3 built with torch (tests/quant_models.py: every projection FP8 block 128x128,
norms random and far from the identity, norms / codes / scales in different shards). Converted by the
CLI with ``--dequantize``:

- the consumers of every folded norm (q/k/v, gate/up) are bf16 (float32 with ``--merged-dtype
  float32``): every element equals the exact ``q·s·g`` rounded once, computed here by torch in float64
  (exact: 4 + 24 + 8 bits) and rounded by ml_dtypes' float64 -> bf16 cast (one rounding; checked in
  test_quant_kernel) -- neither the kernel nor the oracle ``verify`` uses;
- their ``weight_scale_inv`` are gone; o_proj and down_proj stay FP8 with their scales byte for byte;
  ``quantization_config.modules_to_not_convert`` lists the widened modules (``--dequantize all``:
  no ``quantization_config`` left);
- logits: the float32-merged output within 1e-5 relative of the source dequantized by transformers in
  float32; the bf16 output with equal argmax and a relative L2 logit error under 1e-2 (each widened
  weight carries one bf16 rounding, |d| <= 2^-8, amplified through the layers; measured 4.9e-3);
- ``python -m streamfold verify`` passes, and fails on one flipped element.
"""
from __future__ import annotations

import json
import shutil

import ml_dtypes
import numpy as np
import pytest
import torch

from tests import quant_models as qm
from tests.test_bad_input import tree_hash
from tests.test_quant_partial import QWEN3, ROOT, cli, load, logits, raw, read_all

L = ("model.layers.0.", "model.layers.1.")
WIDENED = {f"{p}{m}.weight": f"{p}{norm}.weight" for p in L
           for m, norm in (("self_attn.q_proj", "input_layernorm"), ("self_attn.k_proj", "input_layernorm"),
                           ("self_attn.v_proj", "input_layernorm"), ("mlp.gate_proj", "post_attention_layernorm"),
                           ("mlp.up_proj", "post_attention_layernorm"))}
STILL_FP8 = [f"{p}{m}" for p in L for m in ("self_attn.o_proj", "mlp.down_proj")]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp8") / "qwen3-fp8"
    path.mkdir()
    qm.fp8_block("qwen3", path, **QWEN3)
    return path


@pytest.fixture(scope="module")
def out_f32(src, tmp_path_factory):
    dst = tmp_path_factory.mktemp("deq") / "f32"
    before = tree_hash(src)
    r = cli(src, dst, "-q", "--dequantize", "--merged-dtype", "float32")
    assert r.returncode == 0, r.stderr
    assert tree_hash(src) == before
    return dst


def expected_bits(s: dict, name: str, out: str) -> np.ndarray:
    """The exact q·s·g in float64 (torch), rounded once by ml_dtypes (bf16) or numpy (float32)."""
    q = s[name].to(torch.float64)
    scale = s[name.replace(".weight", ".weight_scale_inv")].to(torch.float64)
    rows, cols = q.shape
    full = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[:rows, :cols]
    g = s[WIDENED[name]].to(torch.float64)
    exact = (q * full * g[None, :]).numpy()
    if out == "BF16":
        return exact.astype(ml_dtypes.bfloat16).view(np.uint16)
    return exact.astype(np.float32).view(np.uint32)


def check_output(src, dst, out: str) -> None:
    s, d = read_all(src), read_all(dst)
    for name in WIDENED:
        assert d[name].dtype == (torch.bfloat16 if out == "BF16" else torch.float32), name
        got = d[name].view(torch.int16 if out == "BF16" else torch.int32).numpy().view(
            np.uint16 if out == "BF16" else np.uint32)
        np.testing.assert_array_equal(got, expected_bits(s, name, out), err_msg=name)
        assert name.replace(".weight", ".weight_scale_inv") not in d
    for m in STILL_FP8:
        for x in (".weight", ".weight_scale_inv"):
            assert raw(d[m + x]) == raw(s[m + x]) and d[m + x].dtype == s[m + x].dtype, m + x
    for p in L:  # folded norms are the identity
        for n in ("input_layernorm", "post_attention_layernorm"):
            assert torch.equal(d[p + n + ".weight"].float(), torch.ones(256)), p + n
    cfg = json.loads((dst / "config.json").read_text())
    skip = cfg["quantization_config"]["modules_to_not_convert"]
    assert sorted(skip) == sorted(n[: -len(".weight")] for n in WIDENED)
    src_cfg = json.loads((src / "config.json").read_text())
    assert {k: v for k, v in cfg["quantization_config"].items() if k != "modules_to_not_convert"} == \
        {k: v for k, v in src_cfg["quantization_config"].items() if k != "modules_to_not_convert"}


def test_dequantize_float32_merged(src, out_f32):
    check_output(src, out_f32, "F32")
    want = logits(load(src))  # transformers' CPU dequantization, float32
    got = logits(load(out_f32))
    rel = ((got - want).norm() / want.norm()).item()
    assert rel <= 1e-5, rel
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    r = cli("verify", src, out_f32)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "10 dequantized (every element the exact q*s*g rounded once, 10 scale tensors dropped)" in r.stdout


def test_verify_catches_one_wrong_element(src, out_f32, tmp_path, monkeypatch):
    bad = tmp_path / "bad"
    shutil.copytree(out_f32, bad)
    name = "model.layers.1.mlp.up_proj.weight"
    index = json.loads((bad / "model.safetensors.index.json").read_text())["weight_map"]
    from streamfold.core.reader import SafetensorsFile
    t = SafetensorsFile(bad / index[name]).tensors[name]
    with open(t.path, "r+b") as f:
        f.seek(t.begin + 4 * 1000)
        word = bytearray(f.read(4))
        word[0] ^= 1  # one ulp of one float32 element
        f.seek(t.begin + 4 * 1000)
        f.write(word)
    r = cli("verify", src, bad)
    assert r.returncode != 0
    assert name in r.stdout and "1 of" in r.stdout, r.stdout
    # the oracle one row at a time (sub-bands of the band records): the same one element
    import streamfold
    from streamfold.check import taskcheck
    monkeypatch.setattr(taskcheck, "ORACLE_ELEMS", 1)
    rep = streamfold.verify(src, bad, workers=1)
    msgs = [p.message for p in rep.problems]
    assert len(msgs) == 1 and "1 of" in msgs[0] and name in str(rep.problems[0]), msgs


@pytest.mark.full
def test_dequantize_bf16(src, tmp_path):
    dst = tmp_path / "bf16"
    r = cli(src, dst, "-q", "--dequantize")
    assert r.returncode == 0, r.stderr
    check_output(src, dst, "BF16")
    want = logits(load(src))
    got = logits(load(dst))
    rel = ((got - want).norm() / want.norm()).item()
    assert rel <= 1e-2, rel
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert cli("verify", src, dst, "-q").returncode == 0


@pytest.mark.full
def test_dequantize_all_drops_quantization_config(src, tmp_path):
    dst = tmp_path / "all"
    r = cli(src, dst, "-q", "--dequantize", "all", "--merged-dtype", "float32")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((dst / "config.json").read_text())
    assert "quantization_config" not in cfg
    d = read_all(dst)
    assert not [n for n, t in d.items() if t.dtype == torch.float8_e4m3fn or n.endswith("_scale_inv")]
    want = logits(load(src))
    got = logits(load(dst))
    assert ((got - want).norm() / want.norm()).item() <= 1e-5
    assert cli("verify", src, dst, "-q").returncode == 0


def test_dequantize_refusals(tmp_path):
    """One line, exit 2, nothing written: an unquantized source; a format not dequantized yet (names the
    module and its format)."""
    sample = ROOT / "streamfold" / "sample"
    r = cli(sample, tmp_path / "o", "--dequantize")
    assert r.returncode == 2 and "nothing to dequantize" in r.stderr and r.stderr.count("\n") == 1, r.stderr
    w4 = tmp_path / "w4"
    w4.mkdir()
    qm.ct_w4_group("llama", w4, group=32, **QWEN3)
    index = json.loads((w4 / "model.safetensors.index.json").read_text())  # activation order: a g_idx
    shard = index["weight_map"]["model.layers.0.self_attn.q_proj.weight_scale"]
    from safetensors.torch import load_file, save_file
    t = load_file(str(w4 / shard))
    t["model.layers.0.self_attn.q_proj.weight_g_idx"] = torch.arange(256, dtype=torch.int32) // 32
    save_file(t, str(w4 / shard), metadata={"format": "pt"})
    index["weight_map"]["model.layers.0.self_attn.q_proj.weight_g_idx"] = shard
    (w4 / "model.safetensors.index.json").write_text(json.dumps(index))
    before = tree_hash(w4)
    r = cli(w4, tmp_path / "o", "--dequantize")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert ("model.layers.0.self_attn.q_proj is INT4 group-quantized (compressed-tensors) with a g_idx "
            "(activation order)") in r.stderr, r.stderr
    assert tree_hash(w4) == before and not (tmp_path / "o").exists()


@pytest.mark.full
def test_dequantize_deepseek_v3_moe_mla_ue8m0(tmp_path):
    """MoE + MLA with power-of-two (ue8m0) scales: every folded norm's FP8 consumers widened (q_a/kv_a,
    q_b, kv_b, dense and expert gate/up, shared experts), each MoE layer's expert down projections too
    (one precision per FusedMoE), the experts block named once in modules_to_not_convert."""
    from tests.test_quant_partial import DSV3
    src = tmp_path / "dsv3"
    src.mkdir()
    qm.fp8_block("deepseek_v3", src, ue8m0=True, **DSV3)
    dst = tmp_path / "out"
    r = cli(src, dst, "-q", "--dequantize", "--merged-dtype", "float32")
    assert r.returncode == 0, r.stderr
    s, d = read_all(src), read_all(dst)
    widened = sorted(n for n, t in d.items() if s[n].dtype == torch.float8_e4m3fn and t.dtype == torch.float32)
    still = sorted(n for n, t in d.items() if t.dtype == torch.float8_e4m3fn)
    assert still == ["model.layers.0.mlp.down_proj.weight", "model.layers.0.self_attn.o_proj.weight",
                     "model.layers.1.mlp.shared_experts.down_proj.weight", "model.layers.1.self_attn.o_proj.weight"]
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in widened
    assert "model.layers.1.self_attn.kv_b_proj.weight" in widened
    skip = json.loads((dst / "config.json").read_text())["quantization_config"]["modules_to_not_convert"]
    assert "model.layers.1.mlp.experts" in skip and not [m for m in skip if ".experts." in m], skip
    want = logits(load(src))
    got = logits(load(dst))
    assert ((got - want).norm() / want.norm()).item() <= 1e-5
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    r = cli("verify", src, dst, "-q")
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.full
def test_dequantize_compressed_tensors_fp8_channel(tmp_path):
    """compressed-tensors float-quantized FP8 with bf16 per-channel scales: widened consumers are the exact
    q·s·g rounded once; the ``ignore`` list gains them; loads in transformers (compressed-tensors)."""
    from tests.test_quant_partial import LLAMA
    src = tmp_path / "ct"
    src.mkdir()
    qm.ct_fp8_channel("llama", src, **LLAMA)
    dst = tmp_path / "out"
    r = cli(src, dst, "-q", "--dequantize", "--merged-dtype", "float32")
    assert r.returncode == 0, r.stderr
    s, d = read_all(src), read_all(dst)
    for name, norm in WIDENED.items():
        q = s[name].to(torch.float64)
        scale = s[name.replace(".weight", ".weight_scale")].to(torch.float64)  # [out, 1]
        exact = (q * scale * s[norm].to(torch.float64)[None, :]).numpy()
        got = d[name].view(torch.int32).numpy().view(np.uint32)
        np.testing.assert_array_equal(got, exact.astype(np.float32).view(np.uint32), err_msg=name)
        assert name.replace(".weight", ".weight_scale") not in d
    cfg = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert sorted(cfg["ignore"]) == sorted(["lm_head", *(n[: -len(".weight")] for n in WIDENED)])
    want = logits(load(src))
    got = logits(load(dst))
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert ((got - want).norm() / want.norm()).item() <= 1e-2
    r = cli("verify", src, dst, "-q")
    assert r.returncode == 0, r.stdout + r.stderr


def test_dequant_records_carry_the_scale_range(src):
    """Each dequant record names the scale rows of its band by byte range, in the scale's own shard
    (the builder puts codes and scales in different files), and survives the task JSON round trip."""
    import streamfold
    from streamfold.planning.tasks import Op, Task
    p = streamfold.plan(src, dequantize=True, memory_budget=1 << 20)
    recs = [c for t in p.tasks for c in t.chunks if c.op == Op.DEQUANT]
    assert {c.tensor for c in recs} == set(WIDENED)
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    for c in recs:
        scale_name = c.tensor.replace(".weight", ".weight_scale_inv")
        assert c.scale[0] == index[scale_name] != c.src
        r0, r1 = c.rows
        assert c.block == (128, 128) and r0 % 128 == 0 and c.scale[3] == ((r1 - 1) // 128 - r0 // 128 + 1, 2)
    for t in p.tasks:
        back = Task.from_json(t.to_json())
        assert [c.to_dict() for c in back.chunks] == [c.to_dict() for c in t.chunks]
        assert all(b.scale == c.scale and b.block == c.block for b, c in zip(back.chunks, t.chunks))
    assert p.plan.dequant is not None and sorted(p.plan.dequant.widened) == sorted(n[:-7] for n in WIDENED)


@pytest.mark.full
def test_dequantize_ragged_576_rows(tmp_path):
    """An MLP of 576 channels: gate/up are [576, 256] with a 64-row last tile (block size from the
    config); through tasks, engine and verify every element is the exact q·s·g rounded once (checked
    here against torch float64 + ml_dtypes). transformers cannot load it (it derives the block from
    shapes and refuses 576 / 5), so no logits."""
    src = tmp_path / "ragged"
    src.mkdir()
    qm.fp8_block("qwen3", src, **{**QWEN3, "intermediate_size": 576})
    dst = tmp_path / "out"
    r = cli(src, dst, "-q", "--dequantize", "--memory-budget", "1M")
    assert r.returncode == 0, r.stderr
    s, d = read_all(src), read_all(dst)
    assert tuple(s["model.layers.0.mlp.gate_proj.weight_scale_inv"].shape) == (5, 2)
    for name in WIDENED:
        got = d[name].view(torch.int16).numpy().view(np.uint16)
        np.testing.assert_array_equal(got, expected_bits(s, name, "BF16"), err_msg=name)
    assert d["model.layers.1.mlp.down_proj.weight"].dtype == torch.float8_e4m3fn
    r = cli("verify", src, dst)
    assert r.returncode == 0 and "10 dequantized" in r.stdout, r.stdout + r.stderr
