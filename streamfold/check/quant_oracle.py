"""An independent oracle for dequantized (and folded) weights: exact integers, one rounding written here.

It shares nothing with the decoders and the kernel (:mod:`streamfold.quant`): no lookup tables, no
float multiplication, no ``round_f64``. Every factor is split from its bit fields into
``(-1)^sign · mant · 2^exp`` with an integer ``mant``; the exact product is the integer product of
the mantissas (at most 9 + 24 + 24 = 57 bits: fits int64) times ``2^(sum of exps)``; it is then
rounded to nearest-even bf16 / float32 by integer shifts (subnormals, the carry into the next
binade, overflow to infinity included). ``verify`` and the tests compare the kernel's output with
this element by element, bit for bit (NaN: any NaN).

Never torch's float64 -> bf16 cast (it rounds twice: to float32, then to bf16).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .oracle import FoldTally

# (significand bits incl. the implicit one, exponent bias, exponent field width) of the outputs
_FORMATS = {"BF16": (8, 127, 8), "F32": (24, 127, 8)}


@dataclass
class Split:
    """Values as ``(-1)^sign · mant · 2^exp`` (int64 arrays of one shape); ``nan`` marks NaN/inf
    inputs (the product is then NaN or infinite: compared as "not finite" only)."""

    sign: np.ndarray
    mant: np.ndarray
    exp: np.ndarray
    nan: np.ndarray

    def __getitem__(self, idx) -> "Split":
        return Split(self.sign[idx], self.mant[idx], self.exp[idx], self.nan[idx])

    def reshape(self, *shape) -> "Split":
        return Split(*(a.reshape(*shape) for a in (self.sign, self.mant, self.exp, self.nan)))

    def repeat(self, reps: int, axis: int) -> "Split":
        return Split(*(np.repeat(a, reps, axis=axis) for a in (self.sign, self.mant, self.exp, self.nan)))


def _ieee(bits: np.ndarray, mant_bits: int, exp_bits: int, bias: int, finite_max_all_ones: bool) -> Split:
    """Split IEEE-style fields; ``finite_max_all_ones``: the all-ones exponent is a normal binade
    (e4m3fn) rather than inf/NaN."""
    b = bits.astype(np.int64)
    sign = (b >> (mant_bits + exp_bits)) & 1
    e = (b >> mant_bits) & ((1 << exp_bits) - 1)
    m = b & ((1 << mant_bits) - 1)
    normal = e != 0
    mant = np.where(normal, m | (1 << mant_bits), m)
    exp = np.where(normal, e, 1) - bias - mant_bits
    top = (1 << exp_bits) - 1
    if finite_max_all_ones:
        nan = (e == top) & (m == (1 << mant_bits) - 1)
    else:
        nan = e == top
    return Split(sign, np.where(nan, 0, mant), exp, nan)


def split_f8_e4m3fn(codes: np.ndarray) -> Split:
    """F8_E4M3FN bytes: 1 sign, 4 exponent (bias 7), 3 mantissa bits; S.1111.111 is NaN."""
    return _ieee(codes.view(np.uint8), 3, 4, 7, True)


def split_e2m1(codes: np.ndarray) -> Split:
    """E2M1 nibbles (values 0..15): 1 sign, 2 exponent (bias 1), 1 mantissa bit; no NaN/inf."""
    b = codes.astype(np.int64) & 0xF
    e, m = (b >> 1) & 3, b & 1
    mant = np.where(e != 0, m | 2, m)
    exp = np.where(e != 0, e, 1) - 1 - 1
    return Split(b >> 3, mant, exp, np.zeros(b.shape, dtype=bool))


def split_e8m0(codes: np.ndarray) -> Split:
    """E8M0 bytes: ``2^(u-127)``, 255 is NaN."""
    u = codes.view(np.uint8).astype(np.int64)
    nan = u == 255
    return Split(np.zeros_like(u), np.where(nan, 0, 1), u - 127, nan)


def split_float(raw: np.ndarray, dtype: str) -> Split:
    """F32 / BF16 / F16 values (any view of their bytes) by their bit fields."""
    if dtype == "F32":
        return _ieee(raw.view(np.uint32), 23, 8, 127, False)
    if dtype == "BF16":
        return _ieee(raw.view(np.uint16), 7, 8, 127, False)
    if dtype == "F16":
        return _ieee(raw.view(np.uint16), 10, 5, 15, False)
    if dtype in ("F8_E8M0", "U8"):
        return split_e8m0(raw)
    raise ValueError(f"oracle: no split for dtype {dtype}")


def split_int(values: np.ndarray) -> Split:
    """Signed integers (codes minus zero points) as exact mantissas with exponent 0."""
    v = values.astype(np.int64)
    return Split((v < 0).astype(np.int64), np.abs(v), np.zeros_like(v), np.zeros(v.shape, dtype=bool))


def product(*factors: Split) -> Split:
    """The exact product of broadcast-compatible factors (mantissas multiply as integers)."""
    out = factors[0]
    for f in factors[1:]:
        out = Split(out.sign ^ f.sign, out.mant * f.mant, out.exp + f.exp, out.nan | f.nan)
    return out


def _bit_length(m: np.ndarray) -> np.ndarray:
    """``int.bit_length`` of non-negative int64s (< 2^62), exactly."""
    _, e = np.frexp(m.astype(np.float64))  # may round up to the next power of two: fixed below
    e = e.astype(np.int64)
    too_big = (e > 0) & ((m >> np.maximum(e - 1, 0)) == 0)
    return e - too_big


def round_exact(x: Split, out_dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """The exact values ``x`` rounded once to nearest-even ``out_dtype`` ("BF16" / "F32"): returns
    (bit patterns as uint16 / uint32, a bool mask of the elements that were exact, no rounding).
    NaN inputs give the canonical quiet NaN (compare with ``isnan``, not bits)."""
    p, bias, ebits = _FORMATS[out_dtype]
    emin_q = 1 - bias - (p - 1)  # the exponent of the smallest subnormal
    mant, exp = x.mant, x.exp
    nb = _bit_length(mant)
    top = exp + nb - 1  # the exponent of the leading bit
    q = np.maximum(top - (p - 1), emin_q)  # the quantum (last kept bit's exponent)
    shift = q - exp
    sh = np.clip(shift, 1, 62)
    r_down = np.where(shift > 0, mant >> sh, mant << np.clip(-shift, 0, 62))
    rem = np.where(shift > 0, mant & ((np.int64(1) << sh) - 1), 0)
    half = np.int64(1) << (sh - 1)
    big = shift > 62  # far below half a quantum: 0 (mant < 2^57 <= half)
    rem = np.where(big, 0, rem)
    r_down = np.where(big, 0, r_down)
    tiny = big & (mant != 0)
    up = (shift > 0) & ~big & ((rem > half) | ((rem == half) & ((r_down & 1) == 1)))
    r = r_down + up
    exact = (shift <= 0) | ((rem == 0) & ~tiny)
    # normalise a carry into the next binade (r == 2^p)
    carry = r == (1 << p)
    r = np.where(carry, r >> 1, r)
    q = q + carry
    normal = r >= (1 << (p - 1))
    biased = np.where(normal, q + (p - 1) + bias, 0)
    frac = np.where(normal, r - (1 << (p - 1)), r)
    inf = biased >= (1 << ebits) - 1
    bits = np.where(inf, ((1 << ebits) - 1) << (p - 1), (biased << (p - 1)) | frac)
    bits = bits | (x.sign << (p - 1 + ebits))
    nan_bits = ((1 << ebits) - 1) << (p - 1) | (1 << (p - 2))
    bits = np.where(x.nan, nan_bits, bits)
    exact = exact & ~inf & ~x.nan
    udt = np.uint16 if out_dtype == "BF16" else np.uint32
    return bits.astype(udt), exact


def expand_blocks(s: Split, rows: int, cols: int, block: tuple[int, int]) -> Split:
    """A ``[ceil(rows/br), ceil(cols/bc)]`` block grid repeated to ``[rows, cols]`` (edge tiles cut)."""
    return s.repeat(block[0], 0).repeat(block[1], 1)[:rows, :cols]


def fp8_block_band_expected(codes: np.ndarray, scale_raw: np.ndarray, scale_dtype: str, block: tuple[int, int],
                            row0: int, g: np.ndarray | None, out_dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Expected bits (and exact mask) of rows ``row0 .. row0 + n`` of an FP8 block-quantized matrix:
    ``codes`` ``[n, cols]``, ``scale_raw`` the scale rows from tile row ``row0 // br`` on."""
    n, cols = codes.shape
    br = block[0]
    grid = split_float(scale_raw, scale_dtype).reshape(-1, -(-cols // block[1]))
    skip = row0 - (row0 // br) * br
    scale = grid.repeat(br, 0).repeat(block[1], 1)[skip:skip + n, :cols]
    factors = [split_f8_e4m3fn(codes), scale]
    if g is not None:
        factors.append(split_float(np.asarray(g, dtype=np.float32), "F32").reshape(1, cols))
    return round_exact(product(*factors), out_dtype)


def fp8_block_expected(codes: np.ndarray, scale_raw: np.ndarray, scale_dtype: str, block: tuple[int, int],
                       g: np.ndarray | None, out_dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Expected bits (and exact mask) of a whole FP8 block-quantized ``[rows, cols]`` matrix widened
    (``g`` None) or folded with the float32 per-input-channel ``g``."""
    rows, cols = codes.shape
    factors = [split_f8_e4m3fn(codes), expand_blocks(split_float(scale_raw, scale_dtype), rows, cols, block)]
    if g is not None:
        factors.append(split_float(np.asarray(g, dtype=np.float32), "F32").reshape(1, cols))
    return round_exact(product(*factors), out_dtype)


def scaled_expected(q: Split, scale: Split, g: np.ndarray | None, out_dtype: str,
                    g_axis: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Expected bits of ``q · scale · g`` for already expanded/broadcastable splits (MXFP4, INT
    packs, per-channel FP8); ``g`` float32 along ``g_axis`` of the ``[rows, cols]`` result."""
    factors = [q, scale]
    if g is not None:
        gs = split_float(np.asarray(g, dtype=np.float32), "F32")
        factors.append(gs.reshape(1, -1) if g_axis == 1 else gs.reshape(-1, 1))
    return round_exact(product(*factors), out_dtype)


def mxfp4_expected(blocks: np.ndarray, scale_raw: np.ndarray, h0: int, h1: int, g: np.ndarray | None,
                   out_dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Expected bits (and exact mask) of rows ``h0..h1`` of one gpt-oss expert's dequantized ``[in, out]``:
    ``blocks`` its raw bytes ``[out, in/32, 16]`` (element ``2j`` in the low nibble of byte ``j``, ``2j+1``
    in the high one), ``scale_raw`` its E8M0 bytes ``[out, in/32]``, ``g`` float32 ``[in]`` or None."""
    rows = blocks.shape[0]
    g0, g1 = h0 // 32, -(-h1 // 32)  # only the groups of inputs h0..h1: memory ~ the rows asked for
    b = blocks.reshape(rows, -1)[:, g0 * 16:g1 * 16].astype(np.int64)
    nib = np.empty((rows, b.shape[1] * 2), dtype=np.int64)
    nib[:, 0::2], nib[:, 1::2] = b & 0xF, b >> 4
    lo, hi = h0 - g0 * 32, h1 - g0 * 32
    q = split_e2m1(nib[:, lo:hi].T.copy())
    s = split_e8m0(scale_raw.reshape(rows, -1)[:, g0:g1]).repeat(32, 1)[:, lo:hi]
    s = Split(*(a.T.copy() for a in (s.sign, s.mant, s.exp, s.nan)))
    return scaled_expected(q, s, None if g is None else np.asarray(g, np.float32)[h0:h1], out_dtype, g_axis=0)


def compare_bits(want: np.ndarray, out_dtype: str, got_raw: np.ndarray, base_index: int = 0) -> FoldTally:
    """A :class:`FoldTally` of raw output bytes against expected bits (any NaN matches any NaN)."""
    u = np.uint16 if out_dtype == "BF16" else np.uint32
    got = got_raw.view(u).reshape(want.shape)
    differ = got != want
    t = FoldTally()
    if differ.any():
        as_f = ((lambda x: x.view(np.float32)) if out_dtype == "F32"
                else (lambda x: (x.astype(np.uint32) << 16).view(np.float32)))
        gf, wf = as_f(got), as_f(want)
        differ &= ~(np.isnan(gf) & np.isnan(wf))
        idx = np.flatnonzero(differ)
        if idx.size:
            i = int(idx[0])
            t.bad, t.first = int(idx.size), (base_index + i, float(gf.reshape(-1)[i]), float(wf.reshape(-1)[i]))
    return t


def check_dequant_band(codes: np.ndarray, scale_raw: np.ndarray, scale_dtype: str, block: tuple[int, int], row0: int,
                       g: np.ndarray | None, out_dtype: str, got_raw: np.ndarray, base_index: int = 0):
    """A :class:`FoldTally` of the output band ``got_raw`` (raw bytes) against
    :func:`fp8_block_band_expected` (bits equal; any NaN matches any NaN), with ``exact``: how many
    of the band's exact products needed no rounding."""
    want, exact = fp8_block_band_expected(codes, scale_raw, scale_dtype, block, row0, g, out_dtype)
    t = compare_bits(want, out_dtype, got_raw, base_index)
    t.exact = int(np.count_nonzero(exact))
    return t
