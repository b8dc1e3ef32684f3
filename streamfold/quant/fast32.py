"""Float32 routes of the dequantize-and-fold kernel, bit-identical to the float64 reference.

:mod:`streamfold.quant.kernel` forms ``q·s·g`` exactly in float64 and rounds it once. Float32 arithmetic is
several times cheaper per element (a 4-byte table gather instead of an 8-byte one, half the memory
traffic), and gives the same bits in two cases:

- **exact**: every ``q·t`` (``t = s·g``, one float32 per tile row and column) is exactly a normal float32.
  FP8 e4m3 codes have 4 significant bits, E2M1 codes 2: ``t`` with at most 20 (resp. 22) significant bits,
  exactly a float32, and the products in the normal range (``ue8m0`` scales × a bf16 norm; MXFP4 × a bf16
  norm). The float32 product IS the exact product, and the one rounding is the bf16 rounding (or none,
  for float32 output).
- **guarded** (bf16 output only): ``t`` rounded to float32 (relative error <= 2^-24), ``f = fl32(q·t32)``
  (another <= 2^-24): ``|f - x| < 2^-23·|x|(1 + 2^-24)``, under 3 ulps of ``f`` (2^-23·|f| < 2 ulps in
  ``f``'s binade). Rounding to nearest bf16 is constant between two bf16 midpoints, and every midpoint
  is a float32 whose low 16 bits are 0x8000, never within 2^15 float32 steps of a binade edge. So where
  ``f``'s low 16 bits are 3 or more steps from 0x8000, no midpoint lies between ``f`` and ``x`` (nor on
  either) and ``RN_bf16(f) == RN_bf16(x)``. The elements within :data:`_WINDOW` (4) steps (about 1 in
  7000 for random data; every true tie) are recomputed by the float64 reference kernel, once per band.
  (Measured on 2M products placed beside midpoints: ``f`` and ``x`` on opposite sides only 0 or 1 step
  away; ``tests/test_quant_fast32.py`` fails with a window of 0.) For MXFP4, ``q·2^k`` is exact and ``g``
  a float32, so ``f = RN32(x)`` is within half a step: the same window is more than enough. The range
  checks below keep ``t`` (>= 2^-117) and every product normal, where these relative bounds hold.

And a third, for MXFP4 widened without a norm (gpt-oss's down_proj): every (scale byte, code byte) pair
is one entry of a 65536-entry table whose two values the float64 kernel itself rounded (exact below scale
byte 253), so the band is one gather per byte, for any scale byte.

The first two need the products away from float32's subnormal range and from overflow: checked per band from the
magnitudes of ``t`` (FP8 codes are in [2^-9, 448], E2M1 in [0.5, 6]); a band that fails any check (a
NaN or infinite scale or norm, a tiny or huge ``t``, float32 output of an inexact product) returns False and
takes the float64 path. NaN codes stay NaN through the float32 product and round to the same quiet NaN
(sign kept, payload cut to the bf16 half) as the reference. ``tests/test_quant_fast32.py`` compares both
routes with the integer oracle (:mod:`streamfold.check.quant_oracle`) bit for bit, on every code and
many exponents, including products placed on and beside bf16 midpoints.

Work is done in blocks of :data:`BLOCK` elements with buffers reused across a band (L2-sized: the
gather, the multiply, the window check and the rounding each make one pass over cached data).
"""
from __future__ import annotations

import numpy as np

from ..core.fold import Scratch
from .decode import E2M1_PAIR_TABLE, E2M1_TABLE, E8M0_TABLE, F8_E4M3FN_TABLE
from .kernel import dequant_fold, sig_bits

BLOCK = 1 << 16  # elements per pass
F8_F32: np.ndarray = F8_E4M3FN_TABLE.astype(np.float32)  # every e4m3 value (and NaN) is a float32
_F8_PAIRS: np.ndarray | None = None  # two codes (a little-endian uint16) -> their two float32s as one uint64
E2M1_PAIR_F32: np.ndarray = E2M1_PAIR_TABLE.astype(np.float32).reshape(256, 2)
_E2M1_PAIR_U64 = E2M1_PAIR_F32.view(np.uint64).reshape(256)  # a byte's two values as one 8-byte word
_MX_INPUTS = 64  # inputs (rows of the transposed output) per MXFP4 chunk
E8M0_F32: np.ndarray = E8M0_TABLE.astype(np.float32)  # 2^(u-127), u < 255 (u = 0: 2^-127, subnormal)
_WINDOW = 4  # float32 steps either side of a bf16 midpoint settled in float64 (3 suffice: see above)
_TINY, _HUGE = 2.0 ** -126, 2.0 ** 127


def _f8_pairs() -> np.ndarray:
    """The 65536-entry pair table (512 KB, built on first use): one gather per two codes, 25% faster."""
    global _F8_PAIRS
    if _F8_PAIRS is None:
        u = np.arange(65536)
        _F8_PAIRS = np.stack([F8_F32[u & 0xFF], F8_F32[u >> 8]], axis=1).view(np.uint64).reshape(65536)
    return _F8_PAIRS


def _route(factors: list[np.ndarray], qmin: float, qmax: float, qbits: int, out_dtype: str) -> str:
    """"exact", "guarded" or "" (float64 path) for products ``q·f1·f2...`` of codes with ``|q|`` in
    ``[qmin, qmax]`` (nonzero ones, ``qbits`` significant bits) and float64 factors (a band's scales, the
    norm): bounds from each factor's extreme nonzero magnitudes and significant bits."""
    mags = [np.abs(np.asarray(f, np.float64)) for f in factors]
    if not all(np.isfinite(a).all() for a in mags):
        return ""
    lo, hi, bits = qmin, qmax, qbits
    for a in mags:
        nz = a[a != 0]
        if nz.size == 0:
            return "exact"  # every product is zero
        lo, hi, bits = lo * nz.min(), hi * nz.max(), bits + sig_bits(nz)
    if lo < _TINY or hi >= _HUGE:
        return ""
    if bits <= 24:
        return "exact"
    return "guarded" if out_dtype == "BF16" else ""


def round_bf16_inplace(bits: np.ndarray, dst: np.ndarray, tmp: np.ndarray) -> None:
    """``dst`` (uint16) = the float32 values whose bit patterns are ``bits`` (uint32, overwritten)
    rounded to nearest-even bf16 (overflow to infinity; a quiet NaN keeps its sign and top payload)."""
    np.right_shift(bits, 16, out=tmp)
    np.bitwise_and(tmp, 1, out=tmp)
    np.add(tmp, 0x7FFF, out=tmp)
    np.add(bits, tmp, out=bits)
    np.right_shift(bits, 16, out=dst, casting="unsafe")


def _near_midpoint(bits: np.ndarray, low: np.ndarray, hit: np.ndarray) -> np.ndarray:
    """Flat indices of the float32 patterns ``bits`` within :data:`_WINDOW` steps of a bf16 midpoint."""
    np.subtract(bits.view(np.uint16)[::2], np.uint16(0x8000 - _WINDOW), out=low)  # the low halves, mod 2^16
    np.less(low, 2 * _WINDOW + 1, out=hit)
    return np.flatnonzero(hit) if hit.any() else np.empty(0, np.intp)


def fp8_block(codes: np.ndarray, scale: np.ndarray, block: tuple[int, int], row0: int, g: np.ndarray | None,
              out_dtype: str, out: np.ndarray, scratch: Scratch | None = None) -> bool:
    """``out`` = rows ``row0 ..`` of an FP8 block-quantized matrix times ``g``, rounded once, in float32;
    the same bits as ``dequant_fold(fp8_block_band(...), g, ...)``. Returns False, touching nothing,
    when neither float32 route applies (then the caller takes the float64 path).

    ``codes`` uint8 ``[n, cols]``; ``scale`` float64 scale rows from tile row ``row0 // br``; ``g``
    float32 ``[cols]`` or None; ``out`` ``[n, cols]`` (bf16 as uint16, or float32), C-contiguous."""
    n, cols = codes.shape
    br, bc = block
    tiles = (row0 + n - 1) // br - row0 // br + 1
    s64 = np.asarray(scale, np.float64)[:tiles]
    g64 = None if g is None else np.asarray(g, np.float32).astype(np.float64).reshape(1, cols)
    route = _route([s64] if g64 is None else [s64, g64], 2.0 ** -9, 448.0, 4, out_dtype)
    if not route:
        return False
    s = scratch or Scratch()
    step = max(1, BLOCK // max(cols, 1))
    cap = step * cols
    vals = s.get("f32.vals", cap * 4).view(np.float32)
    tmp = s.get("f32.tmp", cap * 4).view(np.uint32)
    low, hit = s.get("f32.low", cap * 2).view(np.uint16), s.get("f32.hit", cap).view(bool)
    flat_codes = codes.view(np.uint8)
    near = []  # flat indices (of the band) to settle in float64, all at once at the end
    pairs = _f8_pairs() if cols % 2 == 0 and flat_codes.flags.c_contiguous else None
    for a, b, trow in _t_blocks(s64, g64, br, bc, row0, n, cols, step, s):
        k = (b - a) * cols
        v = vals[:k].reshape(b - a, cols)
        if pairs is not None:
            np.take(pairs, flat_codes[a:b].view(np.uint16), out=v.view(np.uint64), mode="clip")  # in range
        else:
            np.take(F8_F32, flat_codes[a:b], out=v, mode="clip")
        np.multiply(v, trow, out=v)
        if out_dtype == "F32":
            np.copyto(out[a:b], v)
            continue
        bits = vals[:k].view(np.uint32)
        if route == "guarded":
            idx = _near_midpoint(bits, low[:k], hit[:k])
            if idx.size:
                near.append(idx + a * cols)
        round_bf16_inplace(bits, out[a:b].reshape(-1), tmp[:k])
    if near:
        _settle_fp8(codes, s64, block, row0, g, np.concatenate(near), out)
    return True


def _t_blocks(s64: np.ndarray, g64: np.ndarray | None, br: int, bc: int, row0: int, n: int, cols: int, step: int,
              scratch: Scratch):
    """Row blocks ``(a, b, t)`` of a band with their multipliers ``t = s·g`` in float32 (exact in float64,
    <= 48 bits, then rounded once): one ``[cols]`` row per block within a tile row, or, for tiles shorter
    than a block (per-channel scales: 1 row), a ``[b - a, cols]`` matrix per block."""
    t0 = row0 // br
    if br >= step:
        r = 0
        while r < n:
            tile = (row0 + r) // br
            end = min(n, (tile + 1) * br - row0)
            trow = np.repeat(s64[tile - t0], bc)[:cols]
            trow = (trow if g64 is None else trow * g64[0]).astype(np.float32)
            for a in range(r, end, step):
                yield a, min(end, a + step), trow
            r = end
        return
    tm = scratch.get("f32.t", step * cols * 4).view(np.float32)
    for a in range(0, n, step):
        b = min(n, a + step)
        rows_t = s64[(row0 + np.arange(a, b)) // br - t0]  # [b - a, grid columns]
        t = np.repeat(rows_t, bc, axis=1)[:, :cols] if rows_t.shape[1] > 1 else rows_t
        t = t * (1.0 if g64 is None else g64)
        dst = tm[:(b - a) * cols].reshape(b - a, cols)
        np.copyto(dst, t, casting="same_kind")
        yield a, b, dst


def _settle_fp8(codes: np.ndarray, s64: np.ndarray, block: tuple[int, int], row0: int, g: np.ndarray | None,
                idx: np.ndarray, out: np.ndarray) -> None:
    """The band's elements ``idx`` (flat) recomputed by the float64 kernel (``s64``: the band's scale rows)."""
    n, cols = codes.shape
    br, bc = block
    row, col = idx // cols, idx % cols
    sv = s64[(row0 + row) // br - row0 // br, col // bc]
    vals = (F8_E4M3FN_TABLE[codes.reshape(-1)[idx]] * sv).reshape(1, -1)  # exact q·s (<= 28 bits)
    gv = None if g is None else np.asarray(g, np.float32)[col].reshape(1, -1)
    res = np.empty(idx.size, np.uint16)
    dequant_fold(vals, gv, "BF16", res.reshape(1, -1), 4 + sig_bits(sv))
    out.reshape(-1)[idx] = res


def mxfp4_rows(blocks: np.ndarray, scales: np.ndarray, lo: int, n: int, g: np.ndarray | None, out_dtype: str,
               out: np.ndarray, scratch: Scratch | None = None) -> bool:
    """``out`` ``[n, rows]`` = inputs ``lo .. lo + n`` of the MXFP4 rows ``blocks`` (uint8 ``[rows, G, 16]``,
    a group slice of one expert) with E8M0 ``scales`` (uint8 ``[rows, G]``), transposed to transformers'
    ``[in, out]`` and times ``g`` (float32 ``[n]``, per output row) or None, rounded once, in float32
    (widened without ``g``: from a table the float64 kernel filled, see :func:`_widen_table`). Returns
    False, touching nothing, when neither float32 route applies."""
    rows, groups, width = blocks.shape
    su = scales.view(np.uint8)
    widen = _widen_table(out_dtype) if g is None else None  # no g: every (scale, byte) pair is a table entry
    if widen is None:
        if su.size and int(su.max()) == 255:
            return False  # a NaN scale: the float64 path
        sv = E8M0_TABLE[np.unique(su)]
        route = _route([sv, g], 0.5, 6.0, 2, out_dtype)
        if not route or (sv.size and 6.0 * sv.max() >= _HUGE):  # q·2^k itself must not overflow before g
            return False
    s = scratch or Scratch()
    cw_max = (_MX_INPUTS // 32 + 2) * 32  # decoded columns per input chunk (whole groups)
    step = max(1, BLOCK // cw_max)  # output rows per block
    cap = step * cw_max
    vals = s.get("f32.vals", cap * 4).view(np.float32)
    tmp = s.get("f32.tmp", cap * 4).view(np.uint32)
    low, hit = s.get("f32.low", cap * 2).view(np.uint16), s.get("f32.hit", cap).view(bool)
    sel = s.get("f32.sel", cap * 4).view(np.uint32)
    rnd = s.get("f32.rnd", cap * 2).view(np.uint16)
    gv = None if g is None else np.asarray(g, np.float32)
    near_r, near_j = [], []
    # Input chunks of _MX_INPUTS, output rows in blocks of `step`: the transposed write then stores
    # runs of `step` contiguous elements into each of the chunk's output rows (cache friendly).
    for j0 in range(0, n, _MX_INPUTS):
        j1 = min(n, j0 + _MX_INPUTS)
        ga, gb = (lo + j0) // 32, -(-(lo + j1) // 32)
        off, cw, nj = lo + j0 - ga * 32, (gb - ga) * 32, j1 - j0
        for a in range(0, rows, step):
            b = min(rows, a + step)
            m = b - a
            if widen is not None:  # one gather per byte: its two values rounded (exact but for overflow)
                idx = low[:m * cw // 2].reshape(m, gb - ga, 16)
                np.copyto(idx, su[a:b, ga:gb, None])
                np.left_shift(idx, 8, out=idx)
                np.bitwise_or(idx, blocks[a:b, ga:gb], out=idx)
                words = (sel if out_dtype == "BF16" else vals).view(widen.dtype)[:m * cw // 2]
                np.take(widen, idx, out=words.reshape(m, gb - ga, 16), mode="clip")
                got = words.view(np.uint16 if out_dtype == "BF16" else np.float32).reshape(m, cw)
                out[j0:j1, a:b] = got[:, off:off + nj].T
                continue
            v = vals[:m * cw].reshape(m, gb - ga, 32)
            np.take(_E2M1_PAIR_U64, blocks[a:b, ga:gb], out=v.view(np.uint64).reshape(m, gb - ga, 16),
                    mode="clip")  # byte indices are always in range; "clip" skips the slow checked path
            np.multiply(v, E8M0_F32[su[a:b, ga:gb]][:, :, None], out=v)
            band = v.reshape(m, cw)[:, off:off + nj]  # [m, nj]: these output rows, the chunk's inputs
            if gv is not None:
                np.multiply(band, gv[j0:j1], out=band)
            if out_dtype == "F32":
                out[j0:j1, a:b] = band.T
                continue
            k = m * nj
            bits = sel[:k]
            np.copyto(bits.reshape(m, nj), band.view(np.uint32))
            if route == "guarded":
                idx = _near_midpoint(bits, low[:k], hit[:k])
                if idx.size:
                    near_r.append(a + idx // nj)
                    near_j.append(j0 + idx % nj)
            r16 = rnd[:k]
            round_bf16_inplace(bits, r16, tmp[:k])
            out[j0:j1, a:b] = r16.reshape(m, nj).T
    if near_r:
        _settle_mxfp4(blocks, su, lo, gv, np.concatenate(near_r), np.concatenate(near_j), out)
    return True


_WIDEN: dict[str, np.ndarray] = {}


def _widen_table(out_dtype: str) -> np.ndarray:
    """``u << 8 | byte`` (an E8M0 scale byte, two E2M1 codes) -> the two values ``e2m1·2^(u-127)``, low
    nibble first, each rounded once to ``out_dtype`` BY THE FLOAT64 KERNEL, packed in one word (bf16: a
    uint32, float32: a uint64). Exact for every byte below 253 (bf16); beyond, infinity as the reference
    rounds; u = 255 NaN. 65536 entries, built on first use (256 / 512 KB)."""
    t = _WIDEN.get(out_dtype)
    if t is None:
        u = np.arange(65536)
        vals = np.stack([E2M1_TABLE[u & 0xF], E2M1_TABLE[(u >> 4) & 0xF]], axis=1) * E8M0_TABLE[u >> 8][:, None]
        res = np.empty((256, 512), np.uint16 if out_dtype == "BF16" else np.float32)
        with np.errstate(invalid="ignore"):
            dequant_fold(vals.reshape(256, 512), None, out_dtype, res, 3)
        t = _WIDEN[out_dtype] = res.view(np.uint32 if out_dtype == "BF16" else np.uint64).reshape(65536)
    return t


def _settle_mxfp4(blocks: np.ndarray, su: np.ndarray, lo: int, g: np.ndarray, row: np.ndarray, j: np.ndarray,
                  out: np.ndarray) -> None:
    """Elements ``out[j, row]`` recomputed by the float64 kernel (``row``: output rows, ``j``: inputs)."""
    h = lo + j  # column within the group slice
    byte = blocks.reshape(blocks.shape[0], -1)[row, h // 2]
    code = np.where(h % 2 == 0, byte & 0xF, byte >> 4)
    vals = (E2M1_TABLE[code] * E8M0_TABLE[su[row, h // 32]]).reshape(1, -1)
    res = np.empty(row.size, np.uint16)
    dequant_fold(vals, g[j].reshape(1, -1), "BF16", res.reshape(1, -1), 3)
    out[j, row] = res
