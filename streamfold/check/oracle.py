"""The reference value of a folded element, computed independently of the kernel, for ``verify``.

A folded element must be bit-identical to the exact product ``w x g`` rounded once, to nearest-even,
to its stored dtype. Here the product is formed in float64 (exact for bf16/f16/f32 weights times a
float32 multiplier: at most 48 significant bits, far inside float64's exponent range; a float64 weight
gets the float64 multiply, itself one correct rounding) and rounded by ml_dtypes (bf16: measured to
round once from float64, not through float32) or numpy (float16, float32). The kernel
(:mod:`streamfold.core.fold`) takes other routes: a float32 bit-pattern kernel where the float32 product is
exact, and its own round-to-odd rounding from float64; agreement of the two is the check.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..core.dtypes import DTYPES

BLOCK_ELEMS = 1 << 15  # elements per compute block (the float64 scratch stays in cache)
_UINT = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def uint_of(dtype: str):
    """The unsigned integer type with the itemsize of ``dtype`` (for bit-pattern comparisons)."""
    return _UINT[DTYPES[dtype].itemsize]


@dataclass
class FoldTally:
    """Per folded tensor accumulation across chunks (merged under a lock)."""

    bad: int = 0
    worst_ulp: float = 0.0  # max |stored - exact product| in ulps of the expected value, over bad elements
    first: tuple | None = None  # (flat index, stored, expected)
    bad_equal_source: int = 0
    exact: int = 0  # dequantized elements whose exact product needed no rounding (the oracle's count)

    def merge(self, t: "FoldTally") -> None:
        self.bad += t.bad
        self.exact += t.exact
        self.worst_ulp = max(self.worst_ulp, t.worst_ulp)
        self.bad_equal_source += t.bad_equal_source
        if t.first is not None and (self.first is None or t.first[0] < self.first[0]):
            self.first = t.first


def check_scaled(src: np.ndarray, dst: np.ndarray, mult: np.ndarray, src_dtype: str, out_dtype: str,
                 scratch=None, base_index: int = 0) -> FoldTally:
    """Check that every element of ``dst`` has exactly the bits of ``round(src * mult)`` (any NaN
    matches any NaN) for a ``[rows, cols]`` chunk.

    ``src``/``dst`` are views in their dtypes, ``mult`` float32 ``[1, cols]`` or ``[rows, 1]``.
    ``first`` indexes are flat over the chunk plus ``base_index``. (``scratch`` is unused; kept for
    callers that pass one.)"""
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        return _check(src, dst, mult, src_dtype, out_dtype, base_index)


def _check(src, dst, mult, src_dtype, out_dtype, base_index) -> FoldTally:
    rows, cols = src.shape
    tally = FoldTally()
    step = max(1, BLOCK_ELEMS // max(cols, 1))
    per_row = mult.shape[0] != 1
    m64 = mult.astype(np.float64)
    target = DTYPES[out_dtype]
    u = uint_of(out_dtype)
    for r in range(0, rows, step):
        e = min(rows, r + step)
        p = src[r:e].astype(np.float64)
        np.multiply(p, m64[r:e] if per_row else m64, out=p)
        want = p if out_dtype == "F64" else p.astype(target)
        got = dst[r:e]
        if np.array_equal(want.view(u), got.view(u)):
            continue
        wf, gf = want.ravel(), got.ravel()
        diff = np.flatnonzero(wf.view(u) != gf.view(u))
        nan_both = np.isnan(wf[diff].astype(np.float64)) & np.isnan(gf[diff].astype(np.float64))
        idx = diff[~nan_both]
        if not idx.size:
            continue
        exp64, got64 = wf[idx].astype(np.float64), gf[idx].astype(np.float64)
        ulp = np.abs(np.spacing(wf[idx])).astype(np.float64) if out_dtype != "BF16" else \
            np.abs(np.spacing(wf[idx].astype(np.float32))).astype(np.float64) * 65536.0
        err = np.abs(got64 - p.ravel()[idx]) / ulp
        err = np.where(np.isnan(err), np.inf, err)
        tally.bad += int(idx.size)
        tally.worst_ulp = max(tally.worst_ulp, float(err.max()))
        if src_dtype == out_dtype:  # diagnosis: wrong elements that are simply the source's
            su = uint_of(src_dtype)
            tally.bad_equal_source += int(np.sum(src[r:e].reshape(-1)[idx].view(su) == gf[idx].view(su)))
        if tally.first is None:
            tally.first = (base_index + r * cols + int(idx[0]), float(got64[0]), float(exp64[0]))
    return tally


def expected_bias(b: np.ndarray, w: np.ndarray, beta: np.ndarray, out_dtype: str) -> np.ndarray:
    """``b + w @ beta`` for ``[rows]`` biases, ``[rows, cols]`` weights and a ``[cols]`` shift, each
    element the exact sum rounded once to ``out_dtype`` (what a LayerNorm bias fold must store).

    All three in float64; each product of a bf16/f16/f32 weight and a float32 shift is exact there.
    A row whose float64 sum's error interval (at most ``(cols + 2) 2^-53 (|b| + |w| @ |beta|)`` wide,
    whatever order BLAS sums in) rounds to one value gets it. Any other row is summed by
    :func:`math.fsum` (the correctly rounded float64 sum ``r``); if ``r``'s two float64 neighbours round
    to different values, ``r`` is a rounding boundary and the sign of the exact remainder (``fsum``
    again, with ``-r``) decides. Rounding is ml_dtypes'/numpy's cast from float64. Rows holding NaN or
    infinity get the IEEE float64 sum, rounded. (The kernel, :func:`streamfold.core.fold.fold_bias_rows`,
    settles its boundary rows by exact integer summation instead.)"""
    import math
    target = DTYPES[out_dtype]
    rows, cols = w.shape
    with np.errstate(over="ignore", invalid="ignore"):
        s = b + w @ beta
        err = (np.abs(b) + np.abs(w) @ np.abs(beta)) * ((cols + 2) * 2.0 ** -53 * 2.0)
        lo, hi = (s - err).astype(target), (s + err).astype(target)
    out = s.astype(target)
    u = uint_of(out_dtype)
    for i in np.flatnonzero(np.isfinite(s) & np.isfinite(err) & (lo.view(u) != hi.view(u))):
        terms = [float(b[i])] + (w[i] * beta).tolist()
        r = math.fsum(terms)
        if out_dtype == "F64":  # no second rounding: the correctly rounded sum is the answer
            out[i] = r
            continue
        below = np.array([np.nextafter(r, -np.inf)]).astype(target)
        above = np.array([np.nextafter(r, np.inf)]).astype(target)
        if below.view(u)[0] == above.view(u)[0]:
            out[i] = np.array([r]).astype(target)[0]  # not a boundary: r rounds as the exact sum does
        else:
            rest = math.fsum(terms + [-r])  # exact sum - r, correctly rounded: its sign is exact
            out[i] = above[0] if rest > 0 else below[0] if rest < 0 else np.array([r]).astype(target)[0]
    return out
