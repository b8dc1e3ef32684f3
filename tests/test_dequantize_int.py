"""``--dequantize`` of compressed-tensors pack-quantized INT4/INT8 sources, proven in stock transformers.

Sources: a tiny Llama quantized by compressed-tensors itself (tests/quant_int_models.py: its
``calculate_qparams`` and ``PackedQuantizationCompressor``; norms random and far from the identity;
norms | codes | scales and zero points in different shards). Converted by the CLI with ``--dequantize``:

- every widened element equals, bit for bit, compressed-tensors' own float64 decompression (scale
  widened to float64 first: its loader multiplies in the scale's dtype, which rounds ``q·s`` for bf16
  scales) times the float64 norm weight -- exact in float64 (5 + 8 + 8 bits) -- rounded once by numpy
  (float32) or ml_dtypes (bf16): neither the kernel nor the oracle ``verify`` uses;
- the scales, zero points and ``weight_shape`` of widened modules are gone, their codes tensor is
  replaced by ``X.weight`` ``[out, in]``; the other quantized modules are byte-identical; the
  ``ignore`` list gains the widened modules (``--dequantize all``: no ``quantization_config`` left);
- logits, float32-merged: within 1e-5 relative of the source loaded in transformers (symmetric
  schemes; in float32 its decompression is exact), or, for the asymmetric source that transformers 5.25
  cannot load (it expects unpacked zero points), of a float32 checkpoint whose weights are that
  float64 decompression rounded to float32; bf16: argmax equal;
- ``verify`` passes, and fails on one flipped bit of one element.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from streamfold.planning.tasks import Chunk, Op

LLAMA = dict(hidden_size=256, intermediate_size=384, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, head_dim=128, vocab_size=320, tie_word_embeddings=False,
             max_position_embeddings=64)
NORM_OF = {"q_proj": "input_layernorm", "k_proj": "input_layernorm", "v_proj": "input_layernorm",
           "gate_proj": "post_attention_layernorm", "up_proj": "post_attention_layernorm"}
PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")
MODULES = [f"model.layers.{i}.{p}" for i in (0, 1) for p in PROJ]


def test_ct_pack_band_matches_the_integer_oracle():
    """Fast: the engine's band decoder (byte views, nibble split, float64 kernel) against the oracle
    (codes cut from 64-bit word pairs by bit position, integer products, integer rounding), on an
    asymmetric 4-bit group-32 band at row 32 (zero points from their second word row) and a 5-bit band
    (codes straddle words), float32 scales and g, float32 out (up to 6 + 24 + 24 bits: the kernel's
    round-to-odd correction); and the record survives the task JSON round trip. (float32, not bf16:
    ml_dtypes' 0.8 s import stays out of this test.)"""
    from streamfold.check.quant_oracle_int import ct_pack_expected
    from streamfold.run.quant_bands import ct_pack_band_out
    rng = np.random.default_rng(7)
    for bits, cols, group in ((4, 128, 32), (5, 96, 32)):
        rows, words, groups = 64, cols * bits // 32, cols // group
        codes = rng.integers(-2**31, 2**31, (rows, words), dtype=np.int64).astype(np.int32)
        zwords = rng.integers(-2**31, 2**31, (rows * bits // 32, groups), dtype=np.int64).astype(np.int32)
        scale = (rng.random((rows, groups), dtype=np.float32) * 0.02 + 1e-3).astype(np.float32)
        g = (rng.random(cols, dtype=np.float32) * 2.25 + 0.25).astype(np.float32)
        z0 = 32 * bits // 32
        c = Chunk(Op.DEQUANT, "w", 0, 32 * cols * 4, rows=(32, 64), cols=cols, width=cols, out_dtype="F32",
                  scale=("s", 0, "F32", (32, groups)), zero=("z", 0, "I32", (rows * bits // 32 - z0, groups)),
                  block=(1, group), shape=(words, bits), fmt="ct-pack", norm="n")
        c = Chunk.from_dict(json.loads(json.dumps(c.to_dict())))
        out = np.zeros(32 * cols * 4, np.uint8)
        ct_pack_band_out(c, codes[32:].view(np.uint8).reshape(-1), scale[32:].view(np.uint8).reshape(-1),
                         zwords[z0:].view(np.uint8).reshape(-1), g, out)
        want, _ = ct_pack_expected(codes[32:], bits, cols, scale[32:].view(np.uint8), "F32", (32, groups),
                                   zwords[z0:], (1, group), g, "F32")
        np.testing.assert_array_equal(out.view(np.uint32).reshape(32, cols), want)
        assert c.zero == ("z", 0, "I32", (rows * bits // 32 - z0, groups))


# ---------------------------------------------------------------- end to end (full)

def _cli():
    from tests.test_quant_partial import cli
    return cli


def _read_all(path: Path):
    from tests.test_quant_partial import read_all
    return read_all(path)


def decompress64(s: dict, module: str, scheme):
    """compressed-tensors' own decompression of one module, the scale widened to float64 (exact)."""
    import torch
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    sd = {k: s[f"{module}.{k}"] for k in ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")
          if f"{module}.{k}" in s}
    sd["weight_scale"] = sd["weight_scale"].to(torch.float64)
    return PackedQuantizationCompressor.decompress(sd, scheme)["weight"]


def expected(s: dict, module: str, scheme, out: str) -> np.ndarray:
    import ml_dtypes
    import torch
    w = decompress64(s, module, scheme).numpy()
    leaf, layer = module.rsplit(".", 1)[1], module.rsplit(".", 2)[0]
    if leaf in NORM_OF:
        w = w * s[f"{layer}.{NORM_OF[leaf]}.weight"].to(torch.float64).numpy()[None, :]
    return w.astype(ml_dtypes.bfloat16).view(np.uint16) if out == "BF16" else w.astype(np.float32).view(np.uint32)


def reference(src: Path, dst: Path, scheme) -> Path:
    """A float32 checkpoint of ``src`` with every quantized module replaced by its float64 decompression."""
    from safetensors.torch import save_file
    s = _read_all(src)
    dst.mkdir()
    t = {k: v.float() for k, v in s.items() if not k.endswith(("weight_packed", "weight_scale", "weight_shape",
                                                             "weight_zero_point"))}
    for m in MODULES:
        t[m + ".weight"] = decompress64(s, m, scheme).float()
    save_file({k: v.contiguous() for k, v in t.items()}, str(dst / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("quantization_config")
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def logits_of(path_or_model):
    from tests.test_quant_partial import load, logits
    return logits(load(path_or_model) if isinstance(path_or_model, Path) else path_or_model)


def rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def flip_bit(folder: Path, name: str, offset: int) -> None:
    """Flip the low bit of the byte at ``offset`` in tensor ``name`` of the checkpoint in ``folder``."""
    from streamfold.core.reader import Checkpoint
    t = Checkpoint(folder).tensors[name]
    with open(t.path, "r+b") as f:
        f.seek(t.begin + offset)
        b = bytearray(f.read(1))
        b[0] ^= 1
        f.seek(t.begin + offset)
        f.write(b)


@pytest.fixture(scope="module")
def asym(tmp_path_factory):
    """INT4, group 32, asymmetric (packed zero points): transformers 5.25 cannot load it."""
    from tests.quant_int_models import ct_pack, ct_scheme
    root = tmp_path_factory.mktemp("ctint")
    src = root / "w4a"
    src.mkdir()
    ct_pack("llama", src, bits=4, strategy="group", group=32, symmetric=False, **LLAMA)
    return src, ct_scheme(4, "group", 32, False), reference(src, root / "ref", ct_scheme(4, "group", 32, False))


@pytest.mark.full
def test_dequantize_all_asymmetric_w4_float32(asym, tmp_path):
    src, scheme, ref = asym
    dst = tmp_path / "out"
    r = _cli()(src, dst, "-q", "--dequantize", "all", "--merged-dtype", "float32", "--memory-budget", "1M")
    assert r.returncode == 0, r.stderr
    s, d = _read_all(src), _read_all(dst)
    for m in MODULES:
        got = d[m + ".weight"].view(__import__("torch").int32).numpy().view(np.uint32)
        np.testing.assert_array_equal(got, expected(s, m, scheme, "F32"), err_msg=m)
        assert not [k for k in d if k.startswith(m + ".weight_")], m
    assert "quantization_config" not in json.loads((dst / "config.json").read_text())
    got, want = logits_of(dst), logits_of(ref)
    assert rel(got, want) <= 1e-5, rel(got, want)
    assert (got.argmax(-1) == want.argmax(-1)).all()
    r = _cli()("verify", src, dst)
    assert r.returncode == 0 and "14 dequantized" in r.stdout, r.stdout + r.stderr
    bad = tmp_path / "bad"
    shutil.copytree(dst, bad)
    flip_bit(bad, "model.layers.1.mlp.up_proj.weight", 4 * 777)
    r = _cli()("verify", src, bad)
    assert r.returncode != 0 and "model.layers.1.mlp.up_proj.weight" in r.stdout + r.stderr, r.stdout


@pytest.mark.full
def test_dequantize_consumers_asymmetric_w4_bf16(asym, tmp_path):
    """Consumers only, bf16: the widened elements exact-rounded-once, the rest byte for byte, the ignore
    list extended (no logits: the remaining asymmetric modules do not load in transformers 5.25)."""
    src, scheme, _ = asym
    dst = tmp_path / "out"
    r = _cli()(src, dst, "-q", "--dequantize")
    assert r.returncode == 0, r.stderr
    s, d = _read_all(src), _read_all(dst)
    widened = [m for m in MODULES if m.rsplit(".", 1)[1] in NORM_OF]
    for m in widened:
        got = d[m + ".weight"].view(__import__("torch").int16).numpy().view(np.uint16)
        np.testing.assert_array_equal(got, expected(s, m, scheme, "BF16"), err_msg=m)
    from tests.test_quant_partial import raw
    for m in set(MODULES) - set(widened):
        for k in ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point"):
            assert raw(d[f"{m}.{k}"]) == raw(s[f"{m}.{k}"]), m + k
    ignore = json.loads((dst / "config.json").read_text())["quantization_config"]["ignore"]
    assert sorted(ignore) == sorted(["lm_head", *widened])
    assert "Integer-packed weights (compressed-tensors `weight_packed`" in (dst / "README.md").read_text()
    r = _cli()("verify", src, dst, "-q")
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.full
@pytest.mark.parametrize("bits,strategy,group,symmetric", [(8, "channel", None, True), (4, "group", 128, True)])
def test_dequantize_symmetric_loads_in_transformers(bits, strategy, group, symmetric, tmp_path):
    """Symmetric INT8 channel / INT4 group 128: the source loads in transformers (loaded in float32 its
    bf16 scales become float32, so its own decompression ``q·s`` is exact: 8 + 8 bits); the float32-merged
    consumers-only output too, within 1e-5 relative of the source; bf16: argmax equal."""
    from tests.quant_int_models import ct_pack, ct_scheme
    src = tmp_path / "src"
    src.mkdir()
    ct_pack("llama", src, bits=bits, strategy=strategy, group=group, symmetric=symmetric, **LLAMA)
    scheme = ct_scheme(bits, strategy, group, symmetric)
    f32, bf16 = tmp_path / "f32", tmp_path / "bf16"
    assert _cli()(src, f32, "-q", "--dequantize", "--merged-dtype", "float32").returncode == 0
    assert _cli()(src, bf16, "-q", "--dequantize").returncode == 0
    s, d = _read_all(src), _read_all(f32)
    for m in [m for m in MODULES if m.rsplit(".", 1)[1] in NORM_OF]:
        got = d[m + ".weight"].view(__import__("torch").int32).numpy().view(np.uint32)
        np.testing.assert_array_equal(got, expected(s, m, scheme, "F32"), err_msg=m)
    want, got = logits_of(src), logits_of(f32)
    assert rel(got, want) <= 1e-5, rel(got, want)
    assert (got.argmax(-1) == want.argmax(-1)).all()
    assert (logits_of(bf16).argmax(-1) == want.argmax(-1)).all()
    for out in (f32, bf16):
        r = _cli()("verify", src, out, "-q")
        assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.full
@pytest.mark.parametrize("strategy,group,symmetric", [("channel", None, True), ("group", 32, False)])
def test_dequantize_int_quantized(strategy, group, symmetric, tmp_path):
    """compressed-tensors ``int-quantized`` INT8 (``weight`` I8; asymmetric: an unpacked I8 zero point per
    group), quantized by compressed-tensors' own ``IntQuantizationCompressor``: consumers widened, every
    element its float64 decompression times g rounded once, the rest byte for byte; the source and the
    float32-merged output load in transformers, logits within 1e-5 relative, bf16 argmax equal;
    ``verify`` passes and fails on one flipped bit."""
    import torch
    from compressed_tensors.compressors.naive_quantized.base import IntQuantizationCompressor
    from tests.quant_int_models import ct_int, ct_scheme
    from tests.test_quant_partial import raw
    src = tmp_path / "src"
    src.mkdir()
    ct_int("llama", src, strategy=strategy, group=group, symmetric=symmetric, **LLAMA)
    scheme = ct_scheme(8, strategy, group, symmetric)
    f32, bf16 = tmp_path / "f32", tmp_path / "bf16"
    assert _cli()(src, f32, "-q", "--dequantize", "--merged-dtype", "float32", "--memory-budget", "1M").returncode == 0
    assert _cli()(src, bf16, "-q", "--dequantize").returncode == 0
    s, d = _read_all(src), _read_all(f32)
    for m in MODULES:
        leaf, layer = m.rsplit(".", 1)[1], m.rsplit(".", 2)[0]
        if leaf not in NORM_OF:
            for k in (".weight", ".weight_scale") + ((".weight_zero_point",) if not symmetric else ()):
                assert raw(d[m + k]) == raw(s[m + k]), m + k
            continue
        sd = {k: s[f"{m}.{k}"] for k in ("weight", "weight_scale", "weight_zero_point") if f"{m}.{k}" in s}
        sd["weight_scale"] = sd["weight_scale"].to(torch.float64)
        w = IntQuantizationCompressor.decompress(sd, scheme)["weight"].numpy()
        w = w * s[f"{layer}.{NORM_OF[leaf]}.weight"].to(torch.float64).numpy()[None, :]
        got = d[m + ".weight"].view(torch.int32).numpy().view(np.uint32)
        np.testing.assert_array_equal(got, w.astype(np.float32).view(np.uint32), err_msg=m)
        assert m + ".weight_scale" not in d and m + ".weight_zero_point" not in d
    want, got = logits_of(src), logits_of(f32)
    assert rel(got, want) <= 1e-5, rel(got, want)
    assert (got.argmax(-1) == want.argmax(-1)).all() and (logits_of(bf16).argmax(-1) == want.argmax(-1)).all()
    for out in (f32, bf16):
        r = _cli()("verify", src, out, "-q")
        assert r.returncode == 0, r.stdout + r.stderr
    flip_bit(f32, "model.layers.0.mlp.gate_proj.weight", 4 * 999)
    r = _cli()("verify", src, f32)
    assert r.returncode != 0 and "model.layers.0.mlp.gate_proj.weight" in r.stdout + r.stderr, r.stdout


@pytest.mark.full
def test_dequantize_integer_refusals(asym, tmp_path):
    """One line naming the tensor, exit 2, nothing written: a ``weight_shape`` that is not the codes'
    unpadded shape; a 3-bit GPTQ config (its packing crosses words differently)."""
    import torch
    from safetensors.torch import load_file, save_file
    from tests.test_bad_input import tree_hash
    src = tmp_path / "w4"
    shutil.copytree(asym[0], src)
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.mlp.up_proj.weight_shape"
    t = load_file(str(src / index[name]))
    t[name] = torch.tensor([384, 250])
    save_file(t, str(src / index[name]), metadata={"format": "pt"})
    before = tree_hash(src)
    r = _cli()(src, tmp_path / "o", "--dequantize")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "model.layers.1.mlp.up_proj.weight_shape is [384, 250]" in r.stderr and "padded" in r.stderr, r.stderr
    assert tree_hash(src) == before and not (tmp_path / "o").exists()
    from tests.quant_int_models import gptq_awq
    g = tmp_path / "gptq"
    g.mkdir()
    gptq_awq("llama", g, "gptq", bits=4, group=32, **LLAMA)
    cfg = json.loads((g / "config.json").read_text())
    cfg["quantization_config"]["bits"] = 3
    (g / "config.json").write_text(json.dumps(cfg))
    r = _cli()(g, tmp_path / "o", "--dequantize")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "model.layers.0.self_attn.q_proj is INT3 group-quantized (gptq): 3-bit GPTQ" in r.stderr, r.stderr


@pytest.mark.full
@pytest.mark.parametrize("bits,strategy,group", [(8, "channel", None), (5, "group", 64)])
def test_dequantize_all_asymmetric_other_widths(bits, strategy, group, tmp_path):
    """Asymmetric INT8 per channel (zero points 4 per word down the rows) and INT5 group 64 (codes and zero
    points straddling words): ``--dequantize all`` float32, every element compressed-tensors' float64
    decompression rounded once, logits within 1e-5 of its float32 checkpoint, ``verify`` passes."""
    import torch
    from tests.quant_int_models import ct_pack, ct_scheme
    src = tmp_path / "src"
    src.mkdir()
    ct_pack("llama", src, bits=bits, strategy=strategy, group=group, symmetric=False, **LLAMA)
    scheme = ct_scheme(bits, strategy, group, False)
    dst = tmp_path / "out"
    r = _cli()(src, dst, "-q", "--dequantize", "all", "--merged-dtype", "float32", "--memory-budget", "1M")
    assert r.returncode == 0, r.stderr
    s, d = _read_all(src), _read_all(dst)
    for m in MODULES:
        got = d[m + ".weight"].view(torch.int32).numpy().view(np.uint32)
        np.testing.assert_array_equal(got, expected(s, m, scheme, "F32"), err_msg=m)
    want, got = logits_of(reference(src, tmp_path / "ref", scheme)), logits_of(dst)
    assert rel(got, want) <= 1e-5, rel(got, want)
    r = _cli()("verify", src, dst, "-q")
    assert r.returncode == 0, r.stdout + r.stderr
