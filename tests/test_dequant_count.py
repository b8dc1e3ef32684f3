"""The per-band exact/rounded counter (streamfold/run/dequant_count.py) against the integer oracle's exact mask
(streamfold/check/quant_oracle.py: mantissas multiplied as integers), on both of its routes (float32 where the
band's operands prove it holds every product, float64 otherwise), for FP8 tiles and MXFP4 experts."""
from __future__ import annotations

import numpy as np
import pytest

from streamfold.check.quant_oracle import fp8_block_band_expected, mxfp4_expected
from streamfold.planning.tasks import Chunk, Op
from streamfold.run.dequant_count import _f32_holds, band_counts
from tests.representatives import matrix

ROWS, COLS, BLOCK = 192, 320, (128, 128)  # ragged tiles in both directions


def _bf16_g(rng, n):
    return ((rng.uniform(0.3, 1.7, n).astype(np.float32).view(np.uint32) & 0xFFFF0000)).view(np.float32)


@pytest.mark.parametrize("out_dtype,scales,fold", matrix(
    [(o, s, f) for o in ("BF16", "F32") for s in ("f32", "ue8m0", "tiny") for f in (True, False)],
    {("BF16", "f32", True), ("BF16", "ue8m0", True)}))  # fast: one case of each route
def test_fp8_counts_equal_the_oracle(out_dtype, scales, fold):
    rng = np.random.default_rng(7)
    codes = rng.integers(0, 256, (ROWS, COLS), dtype=np.uint8)  # NaN codes (0x7F, 0xFF) included
    grid = (-(-ROWS // 128), -(-COLS // 128))
    s = rng.uniform(1e-4, 1e-2, grid).astype(np.float32)
    if scales != "f32":  # powers of two; "tiny": products below float32's normal range
        s = np.exp2(np.round(np.log2(s)) - (130 if scales == "tiny" else 0)).astype(np.float32)
    g = _bf16_g(rng, COLS) if fold else None
    want, exact = fp8_block_band_expected(codes, s.view(np.uint8), "F32", BLOCK, 0, g, out_dtype)
    assert _f32_holds("fp8", s.astype(np.float64), g) == (scales == "ue8m0")  # both routes are exercised
    c = Chunk(Op.DEQUANT, "w", 0, want.nbytes, rows=(64, ROWS), cols=COLS, out_dtype=out_dtype, block=BLOCK)
    out = want[64:].copy().view(np.uint8).reshape(-1)  # the oracle's bits, rows 64.. (a band mid-tile)
    e, r = band_counts(c, codes[64:].reshape(-1), s[0:].astype(np.float64), g, out)
    n = int(np.count_nonzero(exact[64:]))
    assert (e, r) == (n, (ROWS - 64) * COLS - n) and 0 < n
    i = int(np.flatnonzero(exact[64:].reshape(-1) & (want[64:].reshape(-1) != 0))[0])
    out.view(want.dtype)[i] ^= 1  # the count compares the stored value: one wrong element is not exact
    assert band_counts(c, codes[64:].reshape(-1), s.astype(np.float64), g, out) == (n - 1, r + 1)


@pytest.mark.parametrize("fold,nan", matrix([(f, n) for f in (True, False) for n in (True, False)],
                                            {(True, True), (True, False)}))
def test_mxfp4_counts_equal_the_oracle(fold, nan):
    rng = np.random.default_rng(3)
    rows, groups = 48, 4  # one expert: [out=48, in=128] as [48, 4, 16] blocks
    blocks = rng.integers(0, 256, (rows, groups, 16), dtype=np.uint8)
    scales = rng.integers(100, 140, (rows, groups), dtype=np.uint8)
    if nan:
        scales[0, 1] = 255  # a NaN scale: never exact (and the float64 route)
    g = _bf16_g(rng, groups * 32) if fold else None
    from streamfold.quant.decode import E8M0_TABLE
    assert _f32_holds("mxfp4", E8M0_TABLE[scales[:, 1:3]], None if g is None else g[32:96].astype(np.float64)) != nan
    want, exact = mxfp4_expected(blocks, scales, 32, 96, g, "BF16")
    c = Chunk(Op.DEQUANT, "e", 0, want.nbytes, rows=(32, 96), cols=rows, out_dtype="BF16", fmt="mxfp4",
              shape=(rows, groups, 16), block=(1, 32))
    e, r = band_counts(c, blocks.reshape(-1), scales.reshape(-1), g, want.view(np.uint8).reshape(-1))
    n = int(np.count_nonzero(exact))
    assert (e, r) == (n, want.size - n) and 0 < n


@pytest.mark.parametrize("out_dtype", ["BF16", "F32"])
def test_integer_values_counts_equal_exact_rationals(out_dtype):
    """Integer formats: ``(u - zp)·s`` has up to 33 significant bits, times a float32 ``g`` up to 57, more
    than float64 holds; the counter (TwoProduct) must call exact only what Fractions say is exact."""
    from fractions import Fraction

    import ml_dtypes
    from streamfold.run.dequant_count import values_counts
    rng = np.random.default_rng(3)
    q = rng.integers(-255, 256, (6, 40)).astype(np.float64)
    s = rng.uniform(1e-3, 1e-2, (6, 1)).astype(np.float32).astype(np.float64)  # 24-bit scales
    s[0] = 2.0 ** -7  # a power of two: many exact products
    vals = q * s  # exact: <= 9 + 24 bits
    g = rng.uniform(0.3, 1.7, 40).astype(np.float32)
    g[:8] = np.float32(1.5)  # short g: exact products where q·s is short too
    # V·G = 2^56 - 1 and 2^56 + 4 (found by search): float64's product is 0.5 exactly, a bf16 and float32
    # value, but the exact product is not: counted exact by a plain float64 comparison
    for row, col, big_v, big_g in ((1, 39, 2 ** 56 // 9256395, 9256395), (2, 38, 2 ** 56 // 9110917 + 1, 9110917)):
        vals[row, col], g[col] = big_v * 2.0 ** -33, np.float32(big_g * 2.0 ** -24)
        assert float(vals[row, col]) * float(g[col]) == 0.5 and big_v * big_g != 2 ** 56
    np_out = {"BF16": ml_dtypes.bfloat16, "F32": np.float32}[out_dtype]
    exact_products = [[Fraction(float(v)) * Fraction(float(x)) for v, x in zip(row, g)] for row in vals]
    out = np.array([[np_out(float(p)) for p in row] for row in exact_products], dtype=np_out)  # float64 then cast:
    # double rounding is harmless here, only which stored values equal the exact product matters
    want = sum(Fraction(float(o)) == p for orow, prow in zip(out, exact_products) for o, p in zip(orow, prow))
    e, r = values_counts(vals.copy(), g, out.view(np.uint8).reshape(-1), out_dtype)
    assert (e, r) == (want, vals.size - want) and 0 < want < vals.size
