"""``--dequantize`` of GPTQ (v1 and v2 zero points, act-order) and AWQ GEMM checkpoints.

No GPTQ or AWQ loader is installed (gptqmodel / auto-gptq / autoawq need compiled kernels), so the
sources are packed by tests/quant_int_models.py the way AutoGPTQ's and AutoAWQ's packers lay them out,
and the decoded values are checked against oracles that are not streamfold's decoder:

- GPTQ: the dequantization formula of AutoGPTQ's reference ``QuantLinear`` (qlinear_cuda_old),
  written here in torch: codes and zeros by ``>>`` over ``arange(0, 32, bits)``, v1 zeros ``+ 1``
  (``& maxq``), ``W = scales[g_idx] · (q - zeros[g_idx])``, in float64;
- AWQ: compressed-tensors' own ``AutoAWQConverter`` (its GEMM unpacking and reverse order) followed by
  its ``PackedQuantizationCompressor`` float64 decompression.

Each widened element equals that oracle times the norm weight (exact in float64), rounded once (numpy
for float32, ml_dtypes for bf16). With ``--dequantize all`` the output is a plain checkpoint: loaded in
stock transformers its float32-merged logits are within 1e-5 relative of a float32 checkpoint holding
the oracle's weights and the original norms (no quantized model to load: no loader), argmax equal.
``verify`` passes, and fails on one flipped bit.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.test_dequantize_int import LLAMA, MODULES, NORM_OF, flip_bit, logits_of, rel

pytestmark = pytest.mark.full


def gptq_reference(s: dict, module: str, bits: int, v2: bool):
    """AutoGPTQ's reference dequantization (qlinear_cuda_old), float64, ``[out, in]``."""
    import torch
    qweight, qzeros = s[module + ".qweight"], s[module + ".qzeros"]
    scales, g_idx = s[module + ".scales"].to(torch.float64), s[module + ".g_idx"].long()
    wf = torch.arange(0, 32, bits, dtype=torch.int32)
    maxq = (1 << bits) - 1
    zeros = torch.bitwise_right_shift(qzeros.unsqueeze(2).expand(-1, -1, 32 // bits), wf.view(1, 1, -1))
    zeros = torch.bitwise_and(zeros, maxq).reshape(qzeros.shape[0], -1)
    if not v2:
        zeros = torch.bitwise_and(zeros + 1, maxq)
    weight = torch.bitwise_right_shift(qweight.unsqueeze(1).expand(-1, 32 // bits, -1), wf.view(1, -1, 1))
    weight = torch.bitwise_and(weight, maxq).reshape(-1, qweight.shape[1])
    return (scales[g_idx] * (weight - zeros[g_idx]).to(torch.float64)).T


def awq_reference(s: dict, module: str, group: int):
    """compressed-tensors' AutoAWQConverter + its pack-quantized float64 decompression, ``[out, in]``."""
    from compressed_tensors.entrypoints.convert.converters.autoawq import AutoAWQConverter
    from tests.quant_int_models import ct_scheme
    from tests.test_dequantize_int import decompress64
    conv = AutoAWQConverter(bits=4, group_size=group, zero_point=True)
    t = conv.process({f"{module}.{k}": s[f"{module}.{k}"] for k in ("qweight", "qzeros", "scales")})
    return decompress64(t, module, ct_scheme(4, "group", group, False))


def expected(w64, s: dict, module: str, out: str) -> np.ndarray:
    import ml_dtypes
    import torch
    w = w64.numpy()
    leaf, layer = module.rsplit(".", 1)[1], module.rsplit(".", 2)[0]
    if leaf in NORM_OF:
        w = w * s[f"{layer}.{NORM_OF[leaf]}.weight"].to(torch.float64).numpy()[None, :]
    return w.astype(ml_dtypes.bfloat16).view(np.uint16) if out == "BF16" else w.astype(np.float32).view(np.uint32)


def reference_ckpt(src: Path, dst: Path, weights: dict) -> Path:
    from safetensors.torch import save_file
    from tests.test_quant_partial import read_all
    s = read_all(src)
    dst.mkdir()
    t = {k: v.float() for k, v in s.items() if not k.endswith((".qweight", ".qzeros", ".scales", ".g_idx"))}
    t.update({m + ".weight": w.float() for m, w in weights.items()})
    save_file({k: v.contiguous() for k, v in t.items()}, str(dst / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("quantization_config")
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


CASES = {  # name: (method, builder kwargs)
    "gptq-v1-w4-g32-actorder": ("gptq", dict(bits=4, group=32, sym=False, v2=False, act_order=True)),
    "gptq-v2-w8-channel-sym": ("gptq", dict(bits=8, group=-1, sym=True, v2=True)),
    "gptq-v1-w2-g64": ("gptq", dict(bits=2, group=64, sym=False, v2=False)),
    "awq-w4-g32": ("awq", dict(group=32)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_dequantize_all_matches_the_reference_loader(case, tmp_path):
    from tests.quant_int_models import gptq_awq
    from tests.test_quant_partial import cli, read_all
    method, kw = CASES[case]
    src = tmp_path / "src"
    src.mkdir()
    gptq_awq("llama", src, method, **kw, **LLAMA)
    s = read_all(src)
    ref = {m: (gptq_reference(s, m, kw["bits"], kw["v2"]) if method == "gptq" else awq_reference(s, m, kw["group"]))
           for m in MODULES}
    f32, bf16 = tmp_path / "f32", tmp_path / "bf16"
    for dst, extra in ((f32, ("--merged-dtype", "float32")), (bf16, ())):
        r = cli(src, dst, "-q", "--dequantize", "all", "--memory-budget", "1M", *extra)
        assert r.returncode == 0, r.stderr
        d = read_all(dst)
        out = "F32" if dst == f32 else "BF16"
        for m in MODULES:
            import torch
            got = d[m + ".weight"].view(torch.int32 if out == "F32" else torch.int16).numpy()
            got = got.view(np.uint32 if out == "F32" else np.uint16)
            np.testing.assert_array_equal(got, expected(ref[m], s, m, out), err_msg=f"{case} {m}")
            assert not [k for k in d if k.startswith(m + ".") and k != m + ".weight"], m
        assert "quantization_config" not in json.loads((dst / "config.json").read_text())
        r = cli("verify", src, dst, "-q")
        assert r.returncode == 0, r.stdout + r.stderr
    want = logits_of(reference_ckpt(src, tmp_path / "ref", ref))
    got = logits_of(f32)
    assert rel(got, want) <= 1e-5, rel(got, want)
    assert (got.argmax(-1) == want.argmax(-1)).all() and (logits_of(bf16).argmax(-1) == want.argmax(-1)).all()
    bad = tmp_path / "bad"
    shutil.copytree(f32, bad)
    flip_bit(bad, "model.layers.0.self_attn.k_proj.weight", 4 * 4321)
    r = cli("verify", src, bad)
    assert r.returncode != 0 and "model.layers.0.self_attn.k_proj.weight" in r.stdout + r.stderr, r.stdout


def test_dequantize_consumers_gptq_keeps_the_rest(tmp_path):
    """Consumers only: q/k/v and gate/up widened, o_proj/down_proj byte for byte, the widened modules
    appended to ``modules_to_not_convert``; a v1 zero point 2^b - 1 (AutoGPTQ's wrapped zero 0) is
    refused with one line naming the tensor, nothing written."""
    from tests.quant_int_models import gptq_awq
    from tests.test_quant_partial import cli, raw, read_all
    src = tmp_path / "src"
    src.mkdir()
    gptq_awq("llama", src, "gptq", bits=4, group=32, **LLAMA)
    dst = tmp_path / "out"
    r = cli(src, dst, "-q", "--dequantize")
    assert r.returncode == 0, r.stderr
    s, d = read_all(src), read_all(dst)
    widened = [m for m in MODULES if m.rsplit(".", 1)[1] in NORM_OF]
    for m in set(MODULES) - set(widened):
        for k in ("qweight", "qzeros", "scales", "g_idx"):
            assert raw(d[f"{m}.{k}"]) == raw(s[f"{m}.{k}"]), m + k
    q = json.loads((dst / "config.json").read_text())["quantization_config"]
    assert sorted(q["modules_to_not_convert"]) == sorted(widened) and q["checkpoint_format"] == "gptq"
    assert cli("verify", src, dst, "-q").returncode == 0
    # the records name codes, scales, zeros and g_idx in their own shards, and survive the task JSON
    import streamfold
    from streamfold.planning.tasks import Op, Task
    plan = streamfold.plan(src, dequantize=True, memory_budget=1 << 20)
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    recs = [c for t in plan.tasks for c in t.chunks if c.op == Op.DEQUANT]
    assert {c.tensor for c in recs} == {m + ".weight" for m in widened}
    for c in recs:
        m = c.tensor[: -len(".weight")]
        assert c.fmt == "gptq" and c.src == index[m + ".qweight"] and c.rows[0] % 32 == 0
        assert (c.scale[0], c.zero[0], c.gidx[0]) == (index[m + ".scales"], index[m + ".qzeros"], index[m + ".g_idx"])
        assert c.scale[0] != c.src
    for t in plan.tasks:
        assert [c.to_dict() for c in Task.from_json(t.to_json()).chunks] == [c.to_dict() for c in t.chunks]
        assert [c.gidx for c in Task.from_json(t.to_json()).chunks] == [c.gidx for c in t.chunks]
    # a wrapped zero point in q_proj's qzeros
    from safetensors.torch import load_file, save_file
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.0.self_attn.q_proj.qzeros"
    t = load_file(str(src / index[name]))
    t[name][0, 0] = -1
    save_file(t, str(src / index[name]), metadata={"format": "pt"})
    r = cli(src, tmp_path / "o2", "--dequantize")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "GPTQ (v1)" in r.stderr, r.stderr
    assert not (tmp_path / "o2").exists()
