"""The dequantize-and-fold kernel: exact ``q·s`` values times a norm multiplier ``g``, rounded ONCE.

Input is a band of exact dequantized values (float64, from :mod:`streamfold.quant.decode`) and the
float32 multiplier of the folded norm (``None`` when an unfolded sibling is only widened). Output is
bf16 (or float32 for ``--merged-dtype float32``) where every element is the exact ``q·s·g`` rounded
to nearest-even once:

- when ``bits(q·s) + bits(g) <= 53`` (FP8 e4m3 × F32 scale × bf16 g: 36; × f32 g: 52; E2M1 × a power
  of two × anything; INT4 × bf16 scale × f32 g: 36) the float64 product IS the exact product, and
  :func:`streamfold.core.fold.round_f64` rounds it once (to bf16 through round-to-odd at float32,
  one correct rounding; to float32 by numpy's direct float64 -> float32 cast);
- otherwise (an INT8 code with a zero point × an F32 scale × a float32 g: up to 57 bits) the float64
  product is corrected to the exact product rounded *to odd* at 53 bits (Dekker's error-free
  product, no FMA needed at these magnitudes): a following rounding to 24 bits or fewer is then a
  single correct rounding of the exact product (Boldo & Melquiond).

Never through float32 first (``fl32(q·s)`` then bf16 rounds twice: what DeepSeek's ``fp8_cast_bf16``
and transformers do), and never through torch's float64 -> bf16 cast (it also rounds twice).
NaN codes stay NaN; products beyond the output range become infinity, as round-to-nearest-even says.
"""
from __future__ import annotations

import numpy as np

from ..core.fold import round_f64

OUT_DTYPES = ("BF16", "F32")
BLOCK_ELEMS = 1 << 14  # elements per pass: the float64 block and its temporaries stay in L2
_SPLIT = 134217729.0  # 2^27 + 1: Veltkamp's splitter for float64


def sig_bits(values: np.ndarray) -> int:
    """The most significant bits any finite value of ``values`` has (0 for all zeros): 53 minus the
    fewest trailing zero bits among the float64 significands (implicit bit included). For small
    arrays (a scale tensor, a norm vector); the kernel uses it to know whether float64 is exact."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    v = v[np.isfinite(v) & (v != 0)]
    if v.size == 0:
        return 0
    m, _ = np.frexp(np.abs(v))  # m in [0.5, 1): m * 2^53 is an integer with the same significant bits
    ints = (m * 2.0 ** 53).astype(np.uint64)
    low = ints & (~ints + np.uint64(1))  # lowest set bit
    tz = np.log2(low.astype(np.float64)).astype(np.int64)  # exact: low is a power of two
    return int(53 - tz.min())


def code_bits(fmt: str, bits: int = 4) -> int:
    """Significant bits of a format's codes: FP8 e4m3 4, E2M1 2, a ``bits``-bit integer code minus its
    zero point (or offset) ``bits + 1`` at most."""
    return {"fp8": 4, "e2m1": 2}.get(fmt, bits + 1)


def _two_product_odd(a: np.ndarray, b: np.ndarray, p: np.ndarray) -> None:
    """``p`` (== ``fl(a*b)``, float64) replaced in place by the exact ``a*b`` rounded to odd at 53 bits,
    wherever ``a*b`` is finite and inexact (Dekker's TwoProduct: exact absent overflow/underflow of the
    partial products, which the magnitudes of codes, scales and norm weights never reach)."""
    with np.errstate(over="ignore", invalid="ignore"):
        ca = _SPLIT * a
        ah = ca - (ca - a)
        al = a - ah
        cb = _SPLIT * b
        bh = cb - (cb - b)
        bl = b - bh
        err = (((ah * bh - p) + ah * bl) + al * bh) + al * bl  # a*b == p + err exactly
    fix = np.isfinite(p) & (err != 0)
    if not fix.any():
        return
    idx = np.flatnonzero(fix)
    flat = p.reshape(-1)
    pv, ev = flat[idx], err.reshape(-1)[idx]
    over = (pv > 0) != (ev > 0)  # |p| > |exact|: truncate toward zero first
    pv = np.where(over, np.nextafter(pv, 0.0), pv)
    flat[idx] = (pv.view(np.uint64) | np.uint64(1)).view(np.float64)  # the sticky odd bit


def round_f64_to_bf16_fast(x: np.ndarray, out: np.ndarray) -> None:
    """``out`` (uint16 bf16 bits) = ``x`` (float64) rounded once to nearest-even bf16; the same result as
    :func:`streamfold.core.fold.round_f64_to_bf16`, in fewer passes over the band.

    numpy's float64 -> float32 cast rounds once to nearest; every bf16 value and every midpoint between
    two bf16 neighbours (the overflow threshold too) is a float32, on float32's subnormal grid as well,
    so that rounding never crosses a bf16 midpoint: the float32 ``f`` rounds to the same bf16 as ``x``
    unless ``f`` lands exactly ON a midpoint (low 16 bits 0x8000) while ``x`` is not. Those few
    elements are settled from ``x`` itself: above the midpoint away from zero, below toward zero,
    equal a tie to even. NaN stays a quiet NaN with its sign; overflow rounds to infinity."""
    xf = x.reshape(-1)
    with np.errstate(over="ignore", invalid="ignore"):
        b = xf.astype(np.float32).view(np.uint32)
    nan = (b & 0x7FFFFFFF) > 0x7F800000
    mid = ((b & 0xFFFF) == 0x8000) & ~nan
    if nan.any():
        b[nan] = (b[nan] & 0xFFFF0000) | 0x00400000  # quiet, payload cut to the bf16 half: no carry
    lsb = (b >> 16) & 1
    b += 0x7FFF
    b += lsb
    r = (b >> 16).astype(np.uint16)
    if mid.any():
        idx = np.flatnonzero(mid)
        xm = xf[idx]
        fm = xm.astype(np.float32)
        lo = (fm.view(np.uint32) >> 16).astype(np.uint16)  # the bf16 neighbour toward zero
        mag_x, mag_m = np.abs(xm), np.abs(fm.astype(np.float64))
        even = lo + (lo & 1)
        r[idx] = np.where(mag_x > mag_m, lo + 1, np.where(mag_x < mag_m, lo, even))
    np.copyto(out.view(np.uint16), r.reshape(out.shape))


def dequant_fold(values: np.ndarray, g: np.ndarray | None, out_dtype: str, out: np.ndarray,
                 value_bits: int = 53) -> None:
    """``out`` = ``values · g`` rounded once to nearest-even ``out_dtype`` ("BF16" or "F32").

    ``values``: float64 ``[n, cols]`` exact dequantized values (``q·s``), overwritten (the product is
    formed in place to keep the band's memory flat); ``g``: float32 multiplier broadcastable to it
    (``[cols]`` for a fold along the input axis, ``[n, 1]`` along rows) or None (widen only);
    ``out``: ``[n, cols]``, any view of its bytes; ``value_bits``: a bound on the significant bits of
    ``values`` (:func:`code_bits` + :func:`sig_bits` of the scales). When ``value_bits`` plus the bits
    of ``g`` exceed 53, the inexact float64 products are corrected to round-to-odd first."""
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"dequantized output dtype {out_dtype} is not one of {OUT_DTYPES}")
    vals = values.reshape(-1, values.shape[-1]) if values.ndim != 2 else values
    dst = out.reshape(vals.shape)
    rows, cols = vals.shape
    g64 = None if g is None else np.asarray(g, dtype=np.float32).astype(np.float64)
    exact = g64 is None or value_bits + sig_bits(g64) <= 53
    per_row = g64 is not None and g64.ndim == 2 and g64.shape[0] != 1
    step = max(1, BLOCK_ELEMS // max(cols, 1))  # cache-sized blocks: 3x faster than whole-band passes
    for r in range(0, rows, step):
        e = min(rows, r + step)
        v = vals[r:e]
        if g64 is not None:
            m = g64[r:e] if per_row else g64
            if exact:
                with np.errstate(over="ignore", invalid="ignore"):
                    np.multiply(v, m, out=v)  # exact
            else:
                a = v.copy()
                with np.errstate(over="ignore", invalid="ignore"):
                    np.multiply(v, m, out=v)
                _two_product_odd(a, np.broadcast_to(m, v.shape), v)
        if out_dtype == "BF16":
            round_f64_to_bf16_fast(v, dst[r:e])
        else:
            round_f64(v, out_dtype, dst[r:e])
