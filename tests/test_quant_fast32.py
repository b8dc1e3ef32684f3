"""The float32 routes of --dequantize (streamfold.quant.fast32) give the bits of the float64 kernel AND of
the independent integer oracle (streamfold.check.quant_oracle), element for element: every FP8 and E2M1
code under many exponents, both routes (exact; guarded, with its float64 settling), products placed on
and a few float32 steps beside bf16 midpoints (where rounding the float32 product without settling is
wrong: checked, so the cases have teeth), and the bands it must refuse (NaN, subnormal or overflowing
products, float32 output of an inexact product)."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from streamfold.check import quant_oracle as O
from streamfold.quant import decode as D
from streamfold.quant import fast32 as F
from streamfold.quant.kernel import dequant_fold, sig_bits

BLOCK = (128, 128)
U = {"BF16": np.uint16, "F32": np.uint32}


def bf16_values(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def f32_bits(x) -> np.ndarray:
    return np.asarray(x, np.float32).astype(np.float64)


def float64_fp8(codes, scale, row0, g, out_dtype):
    ref = np.empty(codes.shape, U[out_dtype])
    vals = D.fp8_block_band(codes, scale, BLOCK, row0)
    dequant_fold(vals, g, out_dtype, ref.view(np.float32) if out_dtype == "F32" else ref, 4 + sig_bits(scale))
    return ref


def fast_fp8(codes, scale, row0, g, out_dtype):
    got = np.zeros(codes.shape, U[out_dtype])
    ok = F.fp8_block(codes, scale, BLOCK, row0, g, out_dtype, got.view(np.float32) if out_dtype == "F32" else got)
    return ok, got


def oracle_fp8(codes, scale, row0, g, out_dtype):
    raw = np.asarray(scale, np.float32)  # the test's scales are float32 values
    want, _ = O.fp8_block_band_expected(codes, raw.view(np.uint8), "F32", BLOCK, row0, g, out_dtype)
    return want


def same(a: np.ndarray, b: np.ndarray, out_dtype: str) -> bool:
    """Bit for bit, except that any NaN matches any NaN (the oracle's NaN is canonical)."""
    a, b = a.view(U[out_dtype]), b.view(U[out_dtype])
    f = (lambda x: x.view(ml_dtypes.bfloat16).astype(np.float32)) if out_dtype == "BF16" else \
        (lambda x: x.view(np.float32))
    return bool(np.all((a == b) | (np.isnan(f(a)) & np.isnan(f(b)))))


def every_code(rows: int, cols: int) -> np.ndarray:
    """Each row holds all 256 FP8 bytes (NaN codes included), rotated per row."""
    base = np.arange(256, dtype=np.uint8)
    return np.stack([np.resize(np.roll(base, r), cols) for r in range(rows)])


@pytest.fixture(scope="module")
def rng():
    return np.random.default_rng(18)


def scale_grid(kind: str, tiles: int, gcols: int, rng) -> np.ndarray:
    """Scales of one kind over many exponents (2^-30 .. 2^10), exactly float32."""
    e = rng.integers(-30, 10, (tiles, gcols))
    if kind == "pow2":  # ue8m0
        return np.ldexp(1.0, e)
    return f32_bits(np.ldexp(rng.uniform(1, 2, (tiles, gcols)), e))  # full 24-bit significands


FULL = pytest.mark.full


@pytest.mark.parametrize("kind,gkind,out_dtype,route", [
    pytest.param("pow2", "bf16", "BF16", "exact", marks=FULL), pytest.param("pow2", None, "F32", "exact", marks=FULL),
    pytest.param("pow2", "bf16", "F32", "exact", marks=FULL), pytest.param("f32", None, "BF16", "guarded", marks=FULL),
    pytest.param("f32", "bf16", "BF16", "guarded", marks=FULL), ("f32", "f32", "BF16", "guarded"),
    pytest.param("pow2", "f32", "BF16", "guarded", marks=FULL)])
def test_fp8_every_code_many_exponents(kind, gkind, out_dtype, route, rng):
    rows, cols = 300, 640  # ragged: a 44-row last tile; 5 tile columns
    codes = every_code(rows, cols)
    scale = scale_grid(kind, 3, 5, rng)
    g = {None: None, "bf16": bf16_values(np.ldexp(rng.uniform(1, 2, cols), rng.integers(-6, 6, cols))),
         "f32": (np.float32(1) + (rng.standard_normal(cols) * 0.3).astype(np.float32))}[gkind]
    assert F._route([scale] if g is None else [scale, g.astype(np.float64)], 2.0 ** -9, 448.0, 4, out_dtype) == route
    for row0, n in ((0, rows), (128, 172), (256, 44), (100, 60)):
        c, s = codes[row0:row0 + n], scale[row0 // 128:]
        ok, got = fast_fp8(c, s, row0, g, out_dtype)
        assert ok
        want = oracle_fp8(c, s, row0, g, out_dtype)
        assert same(got, want, out_dtype), (kind, gkind, out_dtype, row0)
        assert same(got, float64_fp8(c, s, row0, g, out_dtype), out_dtype)
    c = np.ascontiguousarray(codes[:, :639])  # an odd width (one code per gather) and a ragged tile column
    g = None if g is None else g[:639]
    ok, got = fast_fp8(c, scale, 0, g, out_dtype)
    assert ok and same(got, oracle_fp8(c, scale, 0, g, out_dtype), out_dtype)


def midpoint_case(rng, n: int = 4096, spread: int = 3):
    """Codes, one tile row of F32 scales and a float32 g whose products ``q·s·g`` sit ON bf16 midpoints
    or up to ``spread`` float32 steps of ``s`` beside them (so the float32 product lands in the window)."""
    cols = n
    q_codes = rng.choice([c for c in range(256) if (c & 0x7F) not in (0, 0x7F)], cols).astype(np.uint8)
    q = D.F8_E4M3FN_TABLE[q_codes]
    g = (np.float32(1) + (rng.standard_normal(cols) * 0.3).astype(np.float32))
    # target: a bf16 midpoint near a random magnitude
    mid_bits = (rng.integers(0x3C00, 0x4300, cols).astype(np.uint32) << 16) | 0x8000
    target = mid_bits.view(np.float32).astype(np.float64)
    s = (target / (q * g.astype(np.float64))).astype(np.float32)  # the nearest float32 scale
    s = np.nextafter(s, np.float32(np.inf) * np.sign(s), dtype=np.float32)
    steps = rng.integers(-spread, spread + 1, cols)
    for _ in range(spread):
        up, down = np.nextafter(s, np.float32(np.inf)), np.nextafter(s, np.float32(-np.inf))
        s = np.where(steps > 0, up, np.where(steps < 0, down, s))
        steps -= np.sign(steps)
    return q_codes.reshape(1, cols), s.astype(np.float64), g


def test_guarded_route_settles_midpoints(rng):
    """Scales per column (a block of 1 x 1: every element its own scale) chosen to put ``q·s·g`` on or
    next to bf16 midpoints; also exact ties (``g`` None, a 9-bit scale)."""
    global BLOCK
    codes, s, g = midpoint_case(rng)
    old, BLOCK = BLOCK, (1, 1)
    try:
        ok, got = fast_fp8(codes, s.reshape(1, -1), 0, g, "BF16")
        assert ok
        want = oracle_fp8(codes, s.reshape(1, -1), 0, g, "BF16")
        assert same(got, want, "BF16")
        # teeth: the float32 product rounded without settling is wrong somewhere here
        t32 = (s * g.astype(np.float64)).astype(np.float32)
        naive = (F.F8_F32[codes[0]] * t32).astype(np.float32).view(np.uint32).copy()
        r16 = np.empty(naive.size, np.uint16)
        F.round_bf16_inplace(naive, r16, np.empty_like(naive))
        assert not same(r16.reshape(want.shape), want, "BF16")
        # exact ties: 9-bit scales times codes put many products exactly on a midpoint (round to even)
        s9 = f32_bits(np.ldexp(rng.integers(256, 512, codes.shape[1]), -8)).reshape(1, -1)
        ok, got = fast_fp8(codes, s9, 0, None, "BF16")
        want, exact = O.fp8_block_band_expected(codes, s9.astype(np.float32).view(np.uint8), "F32", BLOCK, 0, None,
                                                "BF16")
        assert ok and same(got, want, "BF16") and not exact.all()
    finally:
        BLOCK = old


def test_route_boundary_25_bits():
    """1.875 (code 0x3F, 4 bits) x a 21-bit scale: a 25-bit product whose float32 rounding lands ON a
    bf16 midpoint (2.1015625) while the exact product is above it, so it must round up. 4 + 20 bits is the
    exact route, 4 + 21 the guarded one (settled), and float32 output of it the float64 path."""
    s21 = np.array([[np.ldexp(1175279.0, -20)]])
    s20 = np.array([[np.ldexp(587639.0, -19)]])
    assert sig_bits(s21) == 21 and sig_bits(s20) == 20
    assert F._route([s21], 2.0 ** -9, 448.0, 4, "BF16") == "guarded"
    assert F._route([s20], 2.0 ** -9, 448.0, 4, "BF16") == "exact"
    assert F._route([s21], 2.0 ** -9, 448.0, 4, "F32") == ""
    codes = np.full((128, 128), 0x3F, np.uint8)
    ok, got = fast_fp8(codes, s21, 0, None, "BF16")
    want = oracle_fp8(codes, s21, 0, None, "BF16")
    assert ok and same(got, want, "BF16") and int(want[0, 0]) == 0x4007  # not the tie's even 0x4006


def test_fp8_refused_bands_take_the_float64_path(rng):
    codes = every_code(128, 128)
    tiny, huge, nan = np.array([[2.0 ** -118]]), np.array([[2.0 ** 119]]), np.array([[np.nan]])
    for s, g, od in ((tiny, None, "BF16"), (huge, None, "BF16"), (nan, None, "BF16"),
                     (np.array([[1.0]]), np.full(128, np.inf, np.float32), "BF16"),
                     (f32_bits([[1.2345678]]), None, "F32")):
        ok, got = fast_fp8(codes, s, 0, g, od)
        assert not ok and not got.any()
    ok, _ = fast_fp8(codes, np.array([[2.0 ** -117]]), 0, None, "BF16")  # 2^-9 · 2^-117: still normal
    assert ok


def test_fp8_sub_bands_of_the_float64_path(monkeypatch, rng):
    """dequant_job's float64 path (float32 output of F32 scales) in many small sub-bands: the oracle's bits."""
    from streamfold.planning.tasks import Chunk, Op
    from streamfold.run import dequant_job as J
    monkeypatch.setattr(J, "_F64_ELEMS", 3 * 640)
    rows, cols = 300, 640
    codes, scale = every_code(rows, cols), scale_grid("f32", 3, 5, rng)
    g = (np.float32(1) + (rng.standard_normal(cols) * 0.3).astype(np.float32))
    c = Chunk(Op.DEQUANT, "w", 0, 172 * cols * 4, rows=(128, 300), cols=cols, width=cols, out_dtype="F32",
              block=BLOCK)
    out = np.empty(172 * cols * 4, np.uint8)
    J.dequant_band(c, codes[128:], scale[1:], g, out)
    assert same(out.view(np.uint32).reshape(172, cols), oracle_fp8(codes[128:], scale[1:], 128, g, "F32"), "F32")


@pytest.mark.parametrize("gkind,out_dtype", [pytest.param(None, "BF16", marks=FULL), ("bf16", "BF16"),
                                             pytest.param("f32", "BF16", marks=FULL),
                                             pytest.param(None, "F32", marks=FULL),
                                             pytest.param("bf16", "F32", marks=FULL)])
def test_mxfp4_every_code_many_exponents(gkind, out_dtype, rng):
    rows, groups = 160, 6
    blocks = np.stack([np.roll(np.arange(256, dtype=np.uint8), r)[:groups * 16] for r in range(rows)])
    blocks = blocks.reshape(rows, groups, 16)
    scales = rng.integers(20, 230, (rows, groups)).astype(np.uint8)
    inner = groups * 32
    g = {None: None, "bf16": bf16_values(np.ldexp(rng.uniform(1, 2, inner), rng.integers(-8, 8, inner))),
         "f32": (np.float32(1) + (rng.standard_normal(inner) * 0.3).astype(np.float32))}[gkind]
    for h0, h1 in ((0, inner), (32, 96), (64, inner)):
        g0, g1 = h0 // 32, -(-h1 // 32)
        got = np.zeros((h1 - h0, rows), U[out_dtype])
        gh = None if g is None else g[h0:h1]
        ok = F.mxfp4_rows(blocks[:, g0:g1], scales[:, g0:g1], h0 - g0 * 32, h1 - h0, gh, out_dtype,
                          got.view(np.float32) if out_dtype == "F32" else got)
        assert ok
        want, _ = O.mxfp4_expected(blocks, scales, h0, h1, g, out_dtype)
        assert same(got, want, out_dtype), (gkind, out_dtype, h0)


def test_fp8_per_channel_and_per_tensor_scales(rng):
    """compressed-tensors FP8 ``channel`` (a 1 x cols tile: the multipliers of each block are a matrix)
    and ``tensor`` (one tile) scales, into bf16 (guarded) and float32 (exact, 9-bit scales)."""
    rows, cols = 90, 640
    codes = every_code(rows, cols)
    g = bf16_values(np.ldexp(rng.uniform(1, 2, cols), rng.integers(-6, 6, cols)))
    chan = f32_bits(np.ldexp(rng.uniform(1, 2, (rows, 1)), rng.integers(-20, 0, (rows, 1))))
    chan9 = np.ldexp(rng.integers(256, 512, (rows, 1)).astype(np.float64), rng.integers(-28, -8, (rows, 1)))
    tens = f32_bits([[0.00123]])
    for scale, block, od in ((chan, (1, cols), "BF16"), (chan9, (1, cols), "F32"), (tens, (rows, cols), "BF16")):
        for row0, n in ((0, rows), (37, 41)):
            sc = scale[row0 // block[0]:]
            got = np.zeros((n, cols), U[od])
            assert F.fp8_block(codes[row0:row0 + n], sc, block, row0, g, od,
                               got.view(np.float32) if od == "F32" else got)
            want, _ = O.fp8_block_band_expected(codes[row0:row0 + n], np.asarray(sc, np.float32).view(np.uint8),
                                                "F32", block, row0, g, od)
            assert same(got, want, od), (block, od, row0)
