"""``--dequantize`` of gpt-oss MXFP4 experts, end to end, proven in stock transformers.

The source is a tiny gpt-oss built with torch (tests/quant_models.py: expert ``gate_up_proj`` and
``down_proj`` as hand-packed ``_blocks`` U8 ``[E, out, in/32, 16]`` + ``_scales`` U8 E8M0, norms random
and far from the identity, norms / codes / the rest in different shards). Converted by the CLI with
``--dequantize``:

- ``post_attention_layernorm`` folds into the router and every expert's gate_up; down_proj is widened
  too (MoE all or nothing); the output tensors are transformers' dequantized parameters
  ``mlp.experts.gate_up_proj`` / ``down_proj`` ``[E, in, out]``, ``_blocks``/``_scales`` are gone and, with
  nothing quantized left, so is ``quantization_config``;
- every widened element equals transformers' OWN dequantization (``convert_moe_packed_tensors``, exact
  here: e2m1 x 2^k fits bf16 for these exponents) times the bf16 norm weight, computed by torch in
  float32 (exact: 2 + 8 significant bits) and cast once to the output dtype -- neither the kernel nor
  the oracle ``verify`` uses;
- logits: the float32-merged output within 1e-5 relative of the source loaded by transformers with
  ``Mxfp4Config(dequantize=True)`` in float32; bf16 output: relative L2 under 1e-2 and equal argmax
  wherever the top-2 margin exceeds 0.02 (position [1, 2] of these inputs is a near tie, margin 3.2e-3,
  that one bf16 rounding of the merged weights flips; bf16 weights are still bit-checked above);
- ``python -m streamfold verify`` passes, and fails naming the tensor when one element is flipped.
"""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from tests import quant_models as qm
from tests.test_quant_partial import GPT_OSS, cli, load, load_kw, logits, read_all

EXPERTS = [f"model.layers.{i}.mlp.experts.{p}" for i in (0, 1) for p in ("gate_up_proj", "down_proj")]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    p = tmp_path_factory.mktemp("mxfp4") / "src"
    p.mkdir()
    qm.gpt_oss_mxfp4(p, **GPT_OSS)
    return p


@pytest.fixture(scope="module")
def out_f32(src, tmp_path_factory):
    dst = tmp_path_factory.mktemp("mxfp4-out") / "f32"
    r = cli(src, dst, "--dequantize", "--merged-dtype", "float32", "--memory-budget", "1M")
    assert r.returncode == 0, r.stderr
    return dst


def expected(s: dict, name: str, dtype: torch.dtype) -> torch.Tensor:
    """transformers' dequantized ``[E, in, out]`` (times the post-attention norm for gate_up), cast once."""
    deq = convert_moe_packed_tensors(s[name + "_blocks"], s[name + "_scales"], dtype=torch.float32)
    if name.endswith("gate_up_proj"):
        g = s[name.split(".mlp.")[0] + ".post_attention_layernorm.weight"].float()
        deq = deq * g[None, :, None]  # exact in float32: e2m1 x 2^k (2 bits) x bf16 g (8 bits)
    return deq.to(dtype)


def check_output(src, dst, dtype: torch.dtype) -> None:
    s, d = read_all(src), read_all(dst)
    for name in EXPERTS:
        assert name + "_blocks" not in d and name + "_scales" not in d
        want = expected(s, name, dtype)
        assert d[name].dtype == dtype and d[name].shape == want.shape, (name, d[name].dtype, d[name].shape)
        assert torch.equal(d[name].view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                           want.view(torch.int16 if dtype == torch.bfloat16 else torch.int32)), name
        assert torch.equal(d[name + "_bias"], s[name + "_bias"])  # biases copied (RMSNorm: no shift)
    cfg = json.loads((dst / "config.json").read_text())
    assert "quantization_config" not in cfg
    card = (dst / "README.md").read_text()
    assert "4 quantized weights were decoded" in card and "from 835584 to " in card, card
    assert "gpt-oss MXFP4 experts are written as transformers' dequantized parameters" in card


def test_dequantize_mxfp4_float32_merged(src, out_f32):
    check_output(src, out_f32, torch.float32)
    want = logits(load(src, **load_kw("gpt_oss")))  # transformers' CPU dequantization, float32
    got = logits(load(out_f32))
    rel = ((got - want).norm() / want.norm()).item()
    assert rel <= 1e-5, rel
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    r = cli("verify", src, out_f32)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "4 dequantized (every element the exact q*s*g rounded once, 4 scale tensors dropped)" in r.stdout


@pytest.mark.full
def test_verify_catches_one_wrong_mxfp4_element(src, out_f32, tmp_path, monkeypatch):
    bad = tmp_path / "bad"
    shutil.copytree(out_f32, bad)
    name = "model.layers.1.mlp.experts.gate_up_proj"
    index = json.loads((bad / "model.safetensors.index.json").read_text())["weight_map"]
    from streamfold.core.reader import SafetensorsFile
    t = SafetensorsFile(bad / index[name]).tensors[name]
    off = t.begin + 4 * (3 * 256 * 512 + 77 * 512 + 300)  # expert 3, input 77, output 300
    with open(t.path, "r+b") as f:
        f.seek(off)
        word = bytearray(f.read(4))
        word[0] ^= 1
        f.seek(off)
        f.write(word)
    r = cli("verify", src, bad)
    assert r.returncode != 0
    assert name in r.stdout and "1 of" in r.stdout and "[3, 77, 300]" in r.stdout, r.stdout
    # the oracle in its smallest sub-bands (32 inputs at a time): the same one element, at the same index
    import streamfold
    from streamfold.check import taskcheck
    monkeypatch.setattr(taskcheck, "ORACLE_ELEMS", 1)
    rep = streamfold.verify(src, bad, workers=1)
    msgs = [p.message for p in rep.problems]
    assert len(msgs) == 1 and "1 of" in msgs[0] and "[3, 77, 300]" in msgs[0], msgs


@pytest.mark.full
def test_dequantize_mxfp4_bf16(src, tmp_path):
    dst = tmp_path / "bf16"
    r = cli(src, dst, "--dequantize")
    assert r.returncode == 0, r.stderr
    check_output(src, dst, torch.bfloat16)
    want = logits(load(src, **load_kw("gpt_oss")))
    got = logits(load(dst))
    rel = ((got - want).norm() / want.norm()).item()
    assert rel <= 1e-2, rel  # one bf16 rounding per merged weight, through two layers (measured 3.7e-3)
    # argmax equal wherever the reference's top-2 margin exceeds the error bf16 merging can make (max
    # abs logit error measured 7.5e-3; one of these 20 positions is a near tie with margin 3.2e-3)
    top = want.topk(2, -1).values
    clear = (top[..., 0] - top[..., 1]) > 0.02
    assert clear.sum() >= 15 and torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])
    assert cli("verify", src, dst, "-q").returncode == 0


@pytest.mark.parametrize("out_dtype", ["BF16", pytest.param("F32", marks=pytest.mark.full)])
def test_mxfp4_band_every_code_and_exponent(out_dtype):
    """The engine's MXFP4 band (decode, transpose, x g per input row, one rounding) equals the integer
    oracle bit for bit for every e2m1 code under every E8M0 exponent 0..255 (255: NaN scale), unfolded
    and folded with float32 g far from 1 (subnormal and near-overflow products included). Unfolded,
    q·2^(u-127) is exact in bf16 up to u = 252; from u = 253 codes of 4 or more (u = 254: 2 or more)
    overflow, which round-to-nearest makes infinite, as transformers' bf16 ldexp does."""
    import numpy as np
    from streamfold.check.quant_oracle import mxfp4_expected
    from streamfold.planning.tasks import Chunk, Op
    from streamfold.run.dequant_job import mxfp4_band_out
    rows, groups = 256, 16  # output rows = one per exponent; 512 inputs: every byte (code pair) in every row
    rng = np.random.default_rng(5)
    blocks = np.stack([np.roll(np.arange(256, dtype=np.uint8), r) for r in range(rows)]).reshape(rows, groups, 16)
    scales = np.repeat(np.arange(256, dtype=np.uint8)[:, None], groups, axis=1)
    inner = groups * 32
    osz = 2 if out_dtype == "BF16" else 4
    for g in (None, np.ldexp(rng.uniform(1, 2, inner), rng.integers(-30, 30, inner)).astype(np.float32)):
        for h0, h1 in ((0, 512), (32, 96)):
            c = Chunk(Op.DEQUANT, "x", 0, (h1 - h0) * rows * osz, rows=(h0, h1), cols=rows, width=inner,
                      out_dtype=out_dtype, shape=(rows, groups, 16), block=(1, 32), fmt="mxfp4")
            out = np.empty((h1 - h0) * rows * osz, np.uint8)
            mxfp4_band_out(c, blocks.reshape(-1), scales.reshape(-1), g, out)
            want, exact = mxfp4_expected(blocks, scales, h0, h1, g, out_dtype)
            got = out.view(np.uint16 if out_dtype == "BF16" else np.uint32).reshape(want.shape)
            f = (lambda b: (b.astype(np.uint32) << 16).view(np.float32)) if out_dtype == "BF16" else (
                lambda b: b.view(np.float32))
            same = (got == want) | (np.isnan(f(got)) & np.isnan(f(want)))
            assert same.all(), (out_dtype, g is None, h0, np.argwhere(~same)[:3])
            if g is None:  # exact below u = 253; infinite exactly where |q| * 2^(u-127) >= 2^128
                u = np.arange(rows)
                assert exact[:, u <= 252].all()
                q = convert_moe_packed_tensors(torch.from_numpy(blocks[None]), torch.from_numpy(scales[None]),
                                               dtype=torch.float32)[0, h0:h1].numpy()
                if out_dtype == "BF16":
                    tf = convert_moe_packed_tensors(torch.from_numpy(blocks[None, :255]),
                                                    torch.from_numpy(scales[None, :255]))[0, h0:h1]
                    assert torch.equal(tf.view(torch.int16), torch.from_numpy(got[:, :255].astype(np.int16)))
                fin = np.isfinite(f(got))
                assert (fin[:, :255] == np.isfinite(q[:, :255])).all()  # float32 overflows at 2^128 too


def test_mxfp4_records_one_expert_band_at_a_time(src):
    """Each MXFP4 dequant record covers a band of 32-row multiples of ONE expert's transposed output,
    names that expert's blocks and its E8M0 scales (another shard) by byte range, its ``src_bytes`` add
    up to the blocks tensor, the header has transformers' [E, in, out] names and shapes, and the records
    survive the task JSON round trip."""
    import streamfold
    from streamfold.core.reader import Checkpoint
    from streamfold.planning.tasks import Op, Task
    p = streamfold.plan(src, dequantize=True, memory_budget=1 << 20)
    ck = Checkpoint(src)
    recs = [c for t in p.tasks for c in t.chunks if c.op == Op.DEQUANT]
    assert {c.tensor for c in recs} == set(EXPERTS)
    header = {n: (dt, sh) for t in p.tasks for n, dt, sh in t.tensors}
    for name in EXPERTS:
        e, out, groups, _ = ck.tensors[name + "_blocks"].shape
        assert header[name] == ("BF16", (e, groups * 32, out)) and name + "_blocks" not in header
        mine = [c for c in recs if c.tensor == name]
        assert sum(c.src_bytes for c in mine) == ck.tensors[name + "_blocks"].nbytes
        assert len(mine) > e  # several bands per expert with a 1 MB budget
        for c in mine:
            r0, r1 = c.rows
            assert r0 % 32 == 0 and (r1 % 32 == 0) and c.fmt == "mxfp4" and c.shape == (out, groups, 16)
            assert c.scale[0] == ck.shard_of[name + "_scales"] != c.src and c.scale[3] == (out, groups)
    for t in p.tasks:
        back = Task.from_json(t.to_json())
        assert [c.to_dict() for c in back.chunks] == [c.to_dict() for c in t.chunks]
        assert all(b.shape == c.shape and b.fmt == c.fmt for b, c in zip(back.chunks, t.chunks))


@pytest.mark.parametrize("out_dtype", ["BF16", pytest.param("F32", marks=pytest.mark.full)])
def test_mxfp4_float32_path_equals_oracle(out_dtype):
    """Bands whose products are all normal float32s take the float32 path (streamfold.quant.fast32:
    decode, scale, x g, one rounding, transpose): every code under exponents 27..226 with a bf16-valued g
    far from 1, and a g with 22 significant bits (exact), against the integer oracle bit for bit; a 23-bit
    g is exact only in float64 (bf16 output: the guarded route; float32 output: the float64 path), and an
    exponent near either end sends the band to the float64 path (same bits, checked above); without g
    every scale byte (253..255 included: infinity, NaN) goes through the widening table."""
    import numpy as np
    from streamfold.check.quant_oracle import mxfp4_expected
    from streamfold.planning.tasks import Chunk, Op
    from streamfold.quant import fast32
    from streamfold.run import dequant_job as J
    rows, groups = 200, 16
    rng = np.random.default_rng(7)
    blocks = np.stack([np.roll(np.arange(256, dtype=np.uint8), r) for r in range(rows)]).reshape(rows, groups, 16)
    scales = np.repeat((27 + np.arange(rows, dtype=np.uint8))[:, None], groups, axis=1)
    inner, osz = groups * 32, 2 if out_dtype == "BF16" else 4
    g16 = np.ldexp(rng.uniform(1, 2, inner), rng.integers(-20, 20, inner)).astype(np.float32)
    g16 = (g16.view(np.uint32) & 0xFFFF0000).view(np.float32)
    g22 = (g16.view(np.uint32) | 0x100).view(np.float32)  # 8 + 14 = 22 significant bits at most
    g23 = (g16.view(np.uint32) | 0x1).view(np.float32)

    def fast(sc, g, od=out_dtype):
        return fast32.mxfp4_rows(blocks[:sc.shape[0]], sc, 0, inner, g, od, np.empty((inner, sc.shape[0]),
                                 np.uint16 if od == "BF16" else np.float32))
    assert fast(scales, g16) and fast(scales, g22)
    assert fast(scales, g23, "BF16") and not fast(scales, g23, "F32")
    one = lambda u: np.full((1, groups), u, np.uint8)  # noqa: E731
    ones = np.ones(inner, np.float32)
    assert fast(one(2), ones) and fast(one(251), ones) and not fast(one(1), ones) and not fast(one(252), ones)
    assert fast(one(1), None) and fast(one(255), None)  # widen only: the kernel-filled table, any scale byte
    for g in (None, g16, g22, g23):
        c = Chunk(Op.DEQUANT, "x", 0, inner * rows * osz, rows=(0, inner), cols=rows, width=inner,
                  out_dtype=out_dtype, shape=(rows, groups, 16), block=(1, 32), fmt="mxfp4")
        out = np.empty(inner * rows * osz, np.uint8)
        J.mxfp4_band_out(c, blocks.reshape(-1), scales.reshape(-1), g, out)
        want, exact = mxfp4_expected(blocks, scales, 0, inner, g, out_dtype)
        assert np.array_equal(out.view(want.dtype).reshape(want.shape), want), (out_dtype, g is None)
        if g is None:
            assert exact.all()


@pytest.mark.full
def test_dequantize_mxfp4_ray_same_bytes(src, out_f32, tmp_path):
    """Through real local Ray (one task per shard, records in JSON): the same shards byte for byte."""
    pytest.importorskip("ray")
    dst = tmp_path / "ray"
    r = cli(src, dst, "--dequantize", "--merged-dtype", "float32", "--ray", "-q")
    assert r.returncode == 0, r.stderr
    for f in sorted(out_f32.glob("*.safetensors")):
        assert (dst / f.name).read_bytes() == f.read_bytes(), f.name
