"""The dequantize-and-fold kernel equals the independent oracle (streamfold.check.quant_oracle) for
EVERY element, bf16 and float32 outputs, on ragged FP8 block shapes, ue8m0, MXFP4 and INT4/INT8 packs,
and on values constructed to sit on or next to bf16 rounding midpoints (where rounding twice, e.g.
through float32 or torch's float64 -> bf16 cast, gives a different answer). The oracle itself is
checked against exact Fractions."""
from __future__ import annotations

from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

from streamfold.check import quant_oracle as O
from streamfold.core.fold import round_f64
from streamfold.quant import decode as D
from streamfold.quant.kernel import code_bits, dequant_fold, sig_bits
from tests.quantfactory import quantize_fp8_block

# c·A·B == mid·2^sh + r (found by factoring; see test_int8_beyond_53_bits): an integer code c, a
# 24-bit scale significand A, a 24-bit norm significand B whose exact product lies one unit beside a
# bf16 midpoint, below float64's resolution (55-56 significant bits).
NEAR_MIDPOINT_57 = [(417, 45, 1, 67, 13355863, 16396045), (397, 45, 1, 179, 6944355, 11237129),
                    (379, 45, 1, 243, 4705317, 11662559), (321, 46, -1, 223, 9877643, 10254787),
                    (323, 45, -1, 189, 4131445, 14554207), (337, 45, -1, 203, 6295589, 9277849),
                    (307, 45, -1, 121, 7189991, 12415793), (467, 46, 1, 179, 12548337, 14630443),
                    (349, 45, 1, 119, 6366229, 16208619)]


def fraction_round(x: Fraction, out_dtype: str) -> int:
    """Reference rounding, written the plain way: ``x`` to nearest-even bf16/float32, as bits."""
    p, emin_q = (8, -133) if out_dtype == "BF16" else (24, -149)
    sign = 1 if x < 0 else 0
    a = abs(x)
    if a == 0:
        r, q = 0, emin_q
    else:
        e = a.numerator.bit_length() - a.denominator.bit_length()
        if Fraction(2) ** e > a:
            e -= 1
        q = max(e - (p - 1), emin_q)
        r = round(a / Fraction(2) ** q)  # Python rounds a Fraction half to even
    value = r * Fraction(2) ** q
    if value >= Fraction(2) ** 128:
        f = float("inf")
    else:
        f = float(value)  # exact: value is representable
    bits = int(np.array([f], dtype=np.float32).view(np.uint32)[0])
    bits = bits >> 16 if out_dtype == "BF16" else bits
    return bits | (sign << (15 if out_dtype == "BF16" else 31))


def assert_bits_equal(got: np.ndarray, want: np.ndarray, out_dtype: str) -> None:
    u = np.uint16 if out_dtype == "BF16" else np.uint32
    g, w = got.view(u), want.view(u)
    f = (lambda b: np.isnan(b.view(ml_dtypes.bfloat16).astype(np.float32))) if out_dtype == "BF16" else \
        (lambda b: np.isnan(b.view(np.float32)))
    nan_g, nan_w = f(g), f(w)
    np.testing.assert_array_equal(nan_g, nan_w)
    bad = (g != w) & ~nan_w
    assert not bad.any(), f"{bad.sum()} of {bad.size} elements differ, first at {np.argwhere(bad)[:3].tolist()}"


def run_kernel(values: np.ndarray, g, out_dtype: str, value_bits: int) -> np.ndarray:
    out = np.empty(values.shape, dtype=np.uint16 if out_dtype == "BF16" else np.uint32)
    dequant_fold(values, g, out_dtype, out, value_bits)
    return out


# --- the oracle and the roundings themselves ------------------------------------------------

def test_oracle_rounding_equals_fractions():
    rng = np.random.default_rng(0)
    mant = [int(m) for m in rng.integers(1, 1 << 57, 300)] + [0, 1, 3, (1 << 57) - 1]
    exps = [int(e) for e in rng.integers(-200, 100, len(mant))]
    for mid, sh, r, *_ in NEAR_MIDPOINT_57:  # midpoints +-1 unit, and exact ties
        mant += [mid << sh, (mid << sh) + r, 255 << 20, (255 << 20) + 1]
        exps += [-sh, -sh - 140, 74, 74]  # ..., bf16 subnormals, the overflow threshold
    for k in range(0, 260, 7):  # subnormal midpoints and ties
        mant.append(2 * k + 1)
        exps.append(-134)
    m = np.array(mant, dtype=np.int64)
    e = np.array(exps, dtype=np.int64)
    sign = np.arange(len(mant)) % 2
    x = O.Split(sign, m, e, np.zeros(len(mant), dtype=bool))
    for out in ("BF16", "F32"):
        bits, exact = O.round_exact(x, out)
        for i in range(len(mant)):
            fr = Fraction(mant[i]) * Fraction(2) ** exps[i] * (-1) ** int(sign[i])
            want = fraction_round(fr, out)
            assert int(bits[i]) == want, (out, mant[i], exps[i], hex(int(bits[i])), hex(want))
            back = np.array([want], dtype=np.uint16 if out == "BF16" else np.uint32)
            back = back.view(ml_dtypes.bfloat16 if out == "BF16" else np.float32).astype(np.float64)[0]
            assert bool(exact[i]) == (bool(np.isfinite(back)) and Fraction(back) == fr)


def test_ml_dtypes_rounds_once_torch_twice():
    """Just above a bf16 midpoint, below float32's resolution: one rounding goes up; torch's float64 ->
    bf16 cast (via float32) lands on the midpoint and ties to even (down). Why the oracle never uses it."""
    x = 1 + 2.0 ** -8 + 2.0 ** -30
    want = fraction_round(Fraction(x), "BF16")
    assert int(np.array([x]).astype(ml_dtypes.bfloat16).view(np.uint16)[0]) == want == 0x3F81
    assert int(torch.tensor([x], dtype=torch.float64).to(torch.bfloat16).view(torch.int16)[0]) == 0x3F80
    out = np.empty(1, dtype=np.uint16)
    round_f64(np.array([x]), "BF16", out)
    assert int(out[0]) == want


# --- designed midpoints ----------------------------------------------------------------------

FINITE_FP8 = np.array([c for c in range(256) if c not in (0x7F, 0xFF, 0x00, 0x80)], dtype=np.uint8)


def designed_fp8(rng, rows: int, cols: int, g_kind: str):
    """FP8 codes, per-element F32 scales (block 1x1) and a per-column g chosen so that ``q·s·g`` lies
    on a bf16 midpoint or within half a float32 ulp of one (normal and subnormal bf16 binades, and
    the overflow threshold)."""
    q = rng.choice(FINITE_FP8, size=(rows, cols))
    pow2 = rng.random((rows, cols)) < 0.25
    q[pow2] &= 0xF8  # zero mantissa: a power of two (exact ties below)
    q[pow2 & ((q & 0x78) == 0)] |= 0x08
    qv = D.F8_E4M3FN_TABLE[q]
    if g_kind == "none":
        g = None
        gv = np.ones(cols)
    elif g_kind == "bf16":
        gv = (rng.uniform(0.05, 4, cols) * rng.choice([-1, 1], cols)).astype(ml_dtypes.bfloat16).astype(np.float64)
        gv[::5] = 2.0 ** rng.integers(-3, 3, len(gv[::5]))
        g = gv.astype(np.float32)
    else:  # a float32 `1 + w`: 24 significant bits
        g = (1 + rng.normal(0, 0.4, cols)).astype(np.float32)
        gv = g.astype(np.float64)
    k = rng.integers(128, 256, (rows, cols))
    e = rng.integers(-30, 30, (rows, cols))
    e[:, ::11] = rng.integers(-126, -118, e[:, ::11].shape)
    mid = np.ldexp((2 * k + 1).astype(np.float64), e - 8)
    sub = rng.random((rows, cols)) < 0.1  # subnormal bf16 midpoints
    mid[sub] = np.ldexp((2 * rng.integers(0, 128, sub.sum()) + 1).astype(np.float64), -134)
    mid[0, :4] = np.ldexp(511.0, 119)  # the bf16 overflow threshold (max + half an ulp)
    with np.errstate(over="ignore"):
        s = (mid / (qv * gv[None, :])).astype(np.float32)
    jitter = rng.integers(-1, 2, (rows, cols)) * (rng.random((rows, cols)) < 0.3)
    s = np.where(jitter != 0, np.nextafter(s, np.where(jitter > 0, np.inf, -np.inf).astype(np.float32)), s)
    s[~np.isfinite(s) | (s == 0)] = 1.0
    return q, s, g


@pytest.mark.parametrize("g_kind,out", [("none", "BF16"), ("bf16", "BF16"), ("f32", "BF16"),
                                        pytest.param("bf16", "F32", marks=pytest.mark.full),
                                        pytest.param("f32", "F32", marks=pytest.mark.full)])
def test_kernel_on_designed_midpoints(g_kind, out):
    rng = np.random.default_rng({"none": 1, "bf16": 2, "f32": 3}[g_kind])
    q, s, g = designed_fp8(rng, 256, 128, g_kind)
    values = D.fp8_block_band(q, s.astype(np.float64), (1, 1), 0)
    got = run_kernel(values, g, out, code_bits("fp8") + sig_bits(s))
    want, exact = O.fp8_block_expected(q, s, "F32", (1, 1), g, out)
    assert_bits_equal(got, want, out)
    if out == "BF16":  # the data does exercise what it is meant to
        exact_q = D.fp8_block_band(q, s.astype(np.float64), (1, 1), 0) * (1 if g is None else g.astype(np.float64))
        f32 = exact_q.astype(np.float32)
        twice = f32.astype(ml_dtypes.bfloat16).view(np.uint16)
        on_mid = (f32.view(np.uint32) & 0xFFFF) == 0x8000
        assert on_mid.sum() > 500, on_mid.sum()
        assert (twice != want).sum() > 50, "no element where rounding through float32 is wrong"
        if g_kind != "f32":  # exact ties too (a 24-bit g makes q·s·g a 9-bit midpoint only by chance)
            assert ((f32 == exact_q) & on_mid).sum() > 50


# --- real quantized tensors, every element -----------------------------------------------------

G_KINDS = {
    "none": lambda n, rng: None,
    "bf16": lambda n, rng: (rng.normal(0, 1.5, n)).astype(ml_dtypes.bfloat16).astype(np.float32),
    "f32": lambda n, rng: (1 + rng.normal(0, 0.5, n)).astype(np.float32),
}


@pytest.mark.parametrize("g_kind,out,ue8m0", [
    ("bf16", "BF16", False),
    pytest.param("none", "BF16", False, marks=pytest.mark.full),
    pytest.param("f32", "BF16", False, marks=pytest.mark.full),
    pytest.param("bf16", "F32", False, marks=pytest.mark.full),
    pytest.param("f32", "F32", False, marks=pytest.mark.full),
    pytest.param("none", "BF16", True, marks=pytest.mark.full),
    ("f32", "BF16", True),
])
def test_kernel_fp8_block_576(g_kind, out, ue8m0):
    """576x256 with block 128: the last tile row is 64 rows. Decoded and folded in 128-row bands."""
    torch.manual_seed(4)
    rng = np.random.default_rng(4)
    block = (128, 128)
    w = torch.randn(576, 256) * torch.logspace(-4, 0, 256)
    q, scale = quantize_fp8_block(w, block, ue8m0)
    codes, s = q.view(torch.uint8).numpy(), scale.numpy()
    g = G_KINDS[g_kind](256, rng)
    got = np.empty((576, 256), dtype=np.uint16 if out == "BF16" else np.uint32)
    for r0 in range(0, 576, 128):
        r1 = min(576, r0 + 128)
        t = s[r0 // 128:(r1 - 1) // 128 + 1].astype(np.float64)
        vals = D.fp8_block_band(codes[r0:r1], t, block, r0)
        dequant_fold(vals, g, out, got[r0:r1], code_bits("fp8") + sig_bits(t))
    want, exact = O.fp8_block_expected(codes, s, "F32", block, g, out)
    assert_bits_equal(got, want, out)
    if ue8m0 and g is None:
        assert exact.all()  # q·2^k fits bf16: widening is exact


def test_kernel_mxfp4():
    rng = np.random.default_rng(5)
    rows, G = 64, 4
    blocks = rng.integers(0, 256, (rows, G, 16), dtype=np.uint8)
    scales = rng.integers(110, 140, (rows, G), dtype=np.uint8)
    nib = np.stack([blocks & 0xF, blocks >> 4], axis=-1).reshape(rows, G * 32)  # low nibble first
    for g_kind, out in (("bf16", "BF16"), ("f32", "BF16"), ("none", "BF16"), ("f32", "F32"), ("bf16", "F32")):
        g = G_KINDS[g_kind](G * 32, rng)
        vals = D.mxfp4_band(blocks, scales)
        got = run_kernel(vals, g, out, code_bits("e2m1") + 1)
        want, exact = O.scaled_expected(O.split_e2m1(nib), O.split_e8m0(scales).repeat(32, 1), g, out)
        assert_bits_equal(got, want, out)
        if g_kind == "none":
            assert exact.all()  # e2m1 (2 bits) x 2^k fits bf16: widening MXFP4 is exact
        if out == "F32" and g_kind == "bf16":
            assert exact.all()  # 2 + 8 bits fit float32


@pytest.mark.parametrize("symmetric", [True, False])
def test_kernel_int4_group32(symmetric):
    rng = np.random.default_rng(6 + symmetric)
    rows, cols, group = 96, 256, 32
    u = rng.integers(0, 16, (rows, cols))
    zp = np.full((rows, cols // group), 8) if symmetric else rng.integers(0, 16, (rows, cols // group))
    packed = pack_to_int32(torch.from_numpy((u - 8).astype(np.int8)), 4).numpy()
    scale_bf16 = (rng.uniform(1e-3, 2e-2, (rows, cols // group))).astype(ml_dtypes.bfloat16)
    s = D.scale_values(scale_bf16.view(np.uint16), "BF16")
    for g_kind, out in (("f32", "BF16"), ("bf16", "BF16"), ("none", "BF16"), ("f32", "F32")):
        g = G_KINDS[g_kind](cols, rng)
        vals = D.int_pack_band(packed, 4, cols, s, group, None if symmetric else zp.astype(np.float64))
        got = run_kernel(vals, g, out, code_bits("int", 4) + sig_bits(s))
        diff = u - np.repeat(zp, group, axis=1)
        sc = O.split_float(scale_bf16.view(np.uint16), "BF16").repeat(group, 1)
        want, _ = O.scaled_expected(O.split_int(diff), sc, g, out)
        assert_bits_equal(got, want, out)


def test_int8_beyond_53_bits():
    """INT8 code (with zero point) x F32 scale x float32 g: up to 57 significant bits, more than
    float64 holds. The designed elements' exact products lie one unit beside a bf16 midpoint, so a
    float64 product lands ON the midpoint and ties the wrong way: the kernel must not."""
    rng = np.random.default_rng(8)
    rows, cols = 48, 64
    u = rng.integers(0, 256, (rows, cols))
    zp = rng.integers(0, 256, (rows, 1))
    s = rng.uniform(1e-3, 1e-2, (rows, 1)).astype(np.float32)
    g = (1 + rng.normal(0, 0.3, cols)).astype(np.float32)
    for i, (mid, sh, r, c, a, b) in enumerate(NEAR_MIDPOINT_57):
        assert c * a * b == (mid << sh) + r
        row, col = 2 * i, 3 * i
        zp[row, 0] = 0 if i % 2 else 255
        u[row, :] = zp[row, 0] + (c if i % 2 else -c)  # the row's codes: +-c
        s[row, 0] = np.float32(np.ldexp(a, -30))
        g[col] = np.float32(np.ldexp(b, -24))
    packed = torch.from_numpy((u - 128).astype(np.int8))
    words = pack_to_int32(packed, 8).numpy()
    s64 = s.astype(np.float64)
    vb = code_bits("int", 8) + sig_bits(s64)
    assert vb + sig_bits(g) > 53
    for out in ("BF16", "F32"):
        vals = D.int_pack_band(words, 8, cols, s64, None, zp.astype(np.float64))
        naive = np.empty((rows, cols), dtype=np.uint16 if out == "BF16" else np.uint32)
        round_f64(vals * g.astype(np.float64), out, naive)
        got = run_kernel(vals, g, out, vb)
        want, _ = O.scaled_expected(O.split_int(u - zp), O.split_float(s, "F32"), g, out)
        assert_bits_equal(got, want, out)
        if out == "BF16":  # float64 lands ON the midpoint and ties to even: wrong where even is the other side
            for i, (mid, sh, r, *_) in enumerate(NEAR_MIDPOINT_57):
                tie_goes_up = (mid >> 1) & 1 == 1
                wrong = tie_goes_up != (r > 0)
                assert (naive[2 * i, 3 * i] != want[2 * i, 3 * i]) == wrong, i
            assert sum((m >> 1) & 1 != (r > 0) for m, _, r, *_ in NEAR_MIDPOINT_57) >= 4
