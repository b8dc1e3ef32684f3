"""The fold kernel: multiply a chunk of a weight by a norm vector, round the exact product once.

Exactness: every folded element is the exact product ``w x g`` rounded once, to nearest-even, to the
stored dtype (``g`` is the float32 multiplier the plan gives: the norm weight, or ``1 + w`` formed in
float32 as the models compute it). Three routes, all on the raw uint16/uint32 bit patterns where
they can (faster than a dtype cast):

- bf16 weights, a multiplier of at most 16 significant bits (a bf16 norm): the float32 product is
  exact, its rounding to bf16 the only one (a block whose product underflows inexactly is redone).
- bf16 weights, any other finite float32 multiplier (a float32 norm, ``1 + w`` in float32: Gemma 1-3,
  Qwen3-Next, Qwen3.5, Nemotron), into bf16: the float32 product rounds the exact one once, and its
  bf16 rounding is still the correct one except where it lands exactly on a bf16 midpoint. Only
  those elements are settled again: an exact product on a midpoint (a tie) to even, the others
  (about 2^-16 of all elements) by the side of the midpoint the exact float64 product lies on
  (:func:`_round_bf16_midpoints` has the argument, subnormals and overflow included).
- everything else (a float16 weight into float16, a NaN or infinite multiplier, a float64 weight):
  multiplied in float64, where the product is exact, and rounded once from there. Float16 stays
  there: f16 checkpoints are rare, and float16's subnormal range lies inside float32's normal range,
  so the midpoint is not a fixed bit pattern of the float32 product. A float32 output is one float32
  multiply (IEEE rounds the exact product once).

Measured (benchmarks/time_kernel.py --repeat 7, 64 MB of bf16 weights, one thread, before/after
interleaved three times, load average 8-9 on 2 cores, so each figure +-20%): into bf16, a float32
norm 0.26-0.33 GB/s before (float64) and 0.84-1.08 GB/s with the midpoint route; a float32 ``1 + w``
of a bf16 w 0.23-0.30 before, 0.78-0.90 after; a bf16 norm (unchanged) 0.89-1.21 GB/s
(benchmarks/README.md, section 4).

NaN stays a quiet NaN with its sign; infinity stays infinity; finite products beyond the output range
become infinity, as round-to-nearest-even says. Not exact: a float64 norm vector is rounded to float32
by the plan before folding (no float64 checkpoint with float64 norms is known).
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

from .dtypes import DTYPES, widen_bf16

# Elements per compute block: small enough that the float32 scratch stays in L2 cache.
BLOCK_ELEMS = 1 << 16


class Scratch:
    """Per-thread reusable buffers, so a worker allocates once, not per chunk."""

    def __init__(self) -> None:
        self._bufs: dict[str, np.ndarray] = {}
        self._tiles: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}

    def get(self, key: str, nbytes: int) -> np.ndarray:
        """A uint8 buffer of at least ``nbytes`` for ``key``, grown as needed."""
        buf = self._bufs.get(key)
        if buf is None or buf.nbytes < nbytes:
            buf = np.empty(max(nbytes, 1), dtype=np.uint8)
            self._bufs[key] = buf
        return buf[:nbytes]

    def tiled(self, mult: np.ndarray, reps: int) -> np.ndarray:
        """``mult`` (a ``[1, cols]`` float32 row) repeated ``reps`` times, flat; cached per vector."""
        key = (id(mult), reps)
        hit = self._tiles.get(key)
        if hit is None or hit[0] is not mult:
            self._tiles.clear()  # one live vector at a time keeps this small
            hit = self._tiles[key] = (mult, np.tile(mult.reshape(-1), reps))
        return hit[1]


def fast_bf16_ok(mult: np.ndarray) -> bool:
    """True when ``bf16 x mult`` is exact in float32 for every element of ``mult`` (float32) that is
    finite and has at most 16 significant bits (its low 8 mantissa bits zero): 8 + 16 bits fit a
    float32 significand, so only an underflow to a subnormal can round, and the kernel catches that.
    bf16, and float16 values in the bf16 range, and small integers all qualify; ``1 + w`` in float32
    usually does not. A NaN or infinite multiplier takes the float64 path (its payload could carry
    into the sign bit in the bit-pattern rounding)."""
    bits = mult.view(np.uint32)
    return not np.any(bits & 0xFF) and not np.any((bits & 0x7F800000) == 0x7F800000)


def round_f64_to_bf16(x: np.ndarray, out: np.ndarray) -> None:
    """``out`` (uint16 bf16 bits) = ``x`` (float64) rounded once to nearest-even bf16.

    Rounds to float32 *to odd* first (truncate, then set the last bit if anything was dropped): with 16
    more bits than bf16, round-to-odd followed by round-to-nearest-even is a single correct rounding
    (Boldo & Melquiond), subnormals and overflow included. NaN stays a quiet NaN with its sign."""
    with np.errstate(over="ignore", invalid="ignore", under="ignore"):
        f = x.astype(np.float32)  # round to nearest (hardware); overflow -> inf
        back = f.astype(np.float64)
        b = f.view(np.uint32)
        inexact = back != x  # NaN too, fixed below
        np.subtract(b, inexact & (np.abs(back) > np.abs(x)), out=b, casting="unsafe")  # toward zero
        np.bitwise_or(b, inexact, out=b, casting="unsafe")  # sticky odd bit
        r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        nan = np.isnan(x)
        if nan.any():
            r[nan] = (b[nan] >> 16) | 0x0040
    np.copyto(out, r, casting="unsafe")


def round_f64(x: np.ndarray, out_dtype: str, out: np.ndarray) -> None:
    """``out`` (viewed as ``out_dtype``) = ``x`` (float64) rounded once to nearest-even."""
    if out_dtype == "BF16":
        round_f64_to_bf16(x, out.view(np.uint16))
    else:  # numpy's float64 -> float32/float16 casts round once, directly from the float64 bits
        with np.errstate(over="ignore", invalid="ignore", under="ignore"):
            np.copyto(out.view(DTYPES[out_dtype]), x, casting="unsafe")


def _widen_f64(src: np.ndarray, src_dtype: str) -> np.ndarray:
    if src_dtype == "BF16":
        return widen_bf16(src).astype(np.float64)
    return src.astype(np.float64)


@np.errstate(over="ignore", invalid="ignore", under="ignore")
def _scale_f64(src, mult, src_dtype, out_dtype, out) -> None:
    """The exact path: the product in float64 (exact for any bf16/f16/f32 x float32 pair: at most 48
    significant bits, and no underflow or overflow in float64's range), rounded once to ``out_dtype``.
    A float64 weight's product is the float64 multiply, itself one correct rounding."""
    rows, cols = src.shape
    step = max(1, BLOCK_ELEMS // max(cols, 1))
    per_row = mult.shape[0] != 1
    m64 = mult.astype(np.float64)
    for r in range(0, rows, step):
        e = min(rows, r + step)
        p = _widen_f64(src[r:e], src_dtype)
        np.multiply(p, m64[r:e] if per_row else m64, out=p)
        round_f64(p, out_dtype, out[r:e])


@np.errstate(over="ignore", invalid="ignore", under="ignore")
def scale_chunk(src: np.ndarray, mult: np.ndarray, src_dtype: str, out_dtype: str,
                out: np.ndarray, scratch: Scratch) -> None:
    """``out = round(src * mult)``, the exact product rounded once to nearest-even: ``src`` is
    ``[rows, cols]`` raw bytes viewed as ``src_dtype``, ``mult`` float32 broadcastable to it
    (``[1, cols]`` or ``[rows, 1]``), ``out`` the same shape in ``out_dtype``.

    Which arithmetic: a float32 output of a bf16/f16/f32 weight is one float32 multiply (IEEE rounds
    the exact product once); a bf16 output of a bf16 weight uses the float32 bit-pattern kernel: when
    :func:`fast_bf16_ok` the float32 product is exact, so its rounding to bf16 is the only one (a
    block whose product underflows inexactly is redone in float64); for any other finite multiplier
    the float32 product is rounded half-up and the elements on a bf16 midpoint are settled exactly
    (:func:`_round_bf16_midpoints`); everything else is formed in float64, where it is exact, and
    rounded once."""
    rows, cols = src.shape
    step = max(1, BLOCK_ELEMS // max(cols, 1))  # rows per cache-sized block
    # a [rows, 1] multiplier, even for a one-row chunk ([1, 1] against cols > 1: not a column vector)
    per_row = mult.shape[0] != 1 or mult.shape[1] != cols
    if src_dtype != "BF16":
        if out_dtype == "F32" and src_dtype in ("F16", "F32"):
            for r in range(0, rows, step):
                e = min(rows, r + step)
                m = mult[r:e] if per_row else mult
                np.multiply(src[r:e], m, out=out[r:e], dtype=np.float32)
            return
        _scale_f64(src, mult, src_dtype, out_dtype, out)
        return
    to_bf16 = out_dtype == "BF16"
    if out_dtype not in ("BF16", "F32"):
        _scale_f64(src, mult, src_dtype, out_dtype, out)
        return
    exact = not to_bf16 or fast_bf16_ok(mult)
    if not exact:
        if not np.isfinite(mult).all():  # NaN payloads could carry into the sign bit
            _scale_f64(src, mult, src_dtype, out_dtype, out)
            return
        wide = (mult.view(np.uint32).reshape(-1) & 0xFF) != 0  # more than 16 significant bits
    if not per_row:
        # A flat multiplier for a whole block (the row vector tiled): 1-D ufuncs without
        # broadcasting run about 1.5x faster than broadcasting [step, cols] by [1, cols].
        tiled = scratch.tiled(mult, step)
    u16 = src.view(np.uint16).reshape(-1)
    o = out.view(np.uint16 if to_bf16 else np.uint32).reshape(-1)
    size = step * cols
    work = scratch.get("u32", size * 4).view(np.uint32)
    tmp = scratch.get("tmp", size * 4).view(np.uint32)
    # The exact bf16 path catches an inexact underflow (the only rounding its float32 product can
    # make); the midpoint path needs no such catch (see _round_bf16_midpoints).
    with np.errstate(under="raise" if to_bf16 and exact else "ignore"):
        for r in range(0, rows, step):
            e = min(rows, r + step)
            k = (e - r) * cols
            w, t = work[:k], tmp[:k]
            f = w.view(np.float32)
            np.copyto(w, u16[r * cols:e * cols])  # bf16 bits -> high half of a float32
            np.left_shift(w, 16, out=w)
            m = mult[r:e] if per_row else mult
            try:
                if per_row:
                    np.multiply(f.reshape(e - r, cols), m, out=f.reshape(e - r, cols))
                else:
                    np.multiply(f, tiled[:k], out=f)
            except FloatingPointError:  # a product underflowed inexactly: float32 rounded it once already
                _scale_f64(src[r:e], m, src_dtype, out_dtype, out[r:e])
                continue
            dst = o[r * cols:e * cols]
            if not to_bf16:
                np.copyto(dst, w)
            elif exact:
                _round_bf16_even(w, t, dst)
            else:
                _round_bf16_midpoints(w, scratch, dst, u16[r * cols:e * cols], m.reshape(-1),
                                      wide[r:e] if per_row else wide, per_row, cols)


def _round_bf16_even(w: np.ndarray, t: np.ndarray, dst: np.ndarray) -> None:
    """``dst`` (bf16 bits) = the float32 bits ``w`` rounded to nearest-even bf16, in place on ``w``.

    Add 0x7FFF plus the lowest kept bit, then truncate. Exact products of finite multipliers carry a
    NaN payload only in the high 16 bits (a quieted bf16 NaN, or the default NaN of 0 x inf), so the
    add never reaches the sign."""
    np.right_shift(w, 16, out=t)
    np.bitwise_and(t, 1, out=t)
    np.add(w, 0x7FFF, out=w)
    np.add(w, t, out=w)
    np.right_shift(w, 16, out=w)
    np.copyto(dst, w, casting="unsafe")


def _round_bf16_midpoints(w: np.ndarray, scratch: Scratch, dst: np.ndarray, src16: np.ndarray,
                          mult: np.ndarray, wide: np.ndarray, per_row: bool, cols: int) -> None:
    """``dst`` (bf16 bits) = the exact products ``src16 x mult`` rounded once to bf16, given ``w``, the
    bits of their float32 products (a bf16 weight times a *finite* float32 multiplier); ``wide``
    marks the multipliers with more than 16 significant bits (per column, or per row if ``per_row``).

    The float32 product ``p`` is the exact ``x`` rounded once to nearest. Every bf16 value and every
    midpoint between two neighbours (the overflow threshold 0x7F7F8000 too) is a float32, on float32's
    subnormal grid as well (2^-149, 16 bits finer than bf16's 2^-133), so that rounding never crosses
    one: ``p`` rounds to the same bf16 as ``x`` unless ``p`` *is* a midpoint (low 16 bits 0x8000).
    All elements are first rounded half-up in magnitude (add 0x8000, truncate); then each midpoint is
    settled. A narrow multiplier (at most 16 significant bits) times a bf16 has at most 24 bits, so
    ``p == x`` unless ``p`` is subnormal: a true tie, to the even neighbour. A wide one (its last set
    bit among the low 8; a normal one then has at least 17 significant bits, its products never a
    9-bit midpoint) and a subnormal ``p`` may have ``p != x``: those (about 2^-16 of the elements)
    are redone from the float64 product, which is exact: its side of the midpoint picks the neighbour
    (equal: the tie, to even). With a finite multiplier a NaN product is a quieted bf16 NaN or the
    default NaN, its low 16 bits zero: the add neither changes it nor reaches the sign."""
    k = w.shape[0]
    low = scratch.get("low16", k * 2).view(np.uint16)
    hit = scratch.get("mid", k).view(np.bool_)
    np.copyto(low, w, casting="unsafe")  # the low 16 bits of each float32 product
    np.equal(low, 0x8000, out=hit)
    np.add(w, 0x8000, out=w)
    np.right_shift(w, 16, out=dst, casting="unsafe")
    if not hit.any():
        return
    idx = np.flatnonzero(hit)
    d = dst[idx]  # p's high half + 1 (the half-up add carried into it)
    dst[idx] = d & 0xFFFE  # a tie goes to whichever of the two neighbours has an even bit pattern
    col = idx // cols if per_row else idx % cols
    redo = wide[col] | (((d - 1) & 0x7F80) == 0)  # p != x possible: a wide multiplier, or p subnormal
    if redo.any():
        idx, col, d = idx[redo], col[redo], d[redo]
        x = np.abs(widen_bf16(src16[idx]).astype(np.float64) * mult[col].astype(np.float64))  # exact
        p = np.abs((widen_bf16(d - 1).view(np.uint32) | 0x8000).view(np.float32).astype(np.float64))
        # x above the midpoint p: away from zero (d); below: toward zero (d - 1); equal: the tie above
        dst[idx] = np.where(x > p, d, np.where(x < p, d - 1, d & 0xFFFE))


def merged_out_dtype(src_dtype: str, merged_dtype: str) -> str:
    """The stored dtype of a folded tensor: the source's, or float32 (never narrower than source)."""
    if merged_dtype == "float32" and src_dtype in ("BF16", "F16"):
        return "F32"
    return src_dtype


def matvec_rows(w: np.ndarray, src_dtype: str, vec: np.ndarray) -> np.ndarray:
    """``w @ vec`` for a ``[rows, cols]`` chunk, accumulated in float64 (every product is exact, the
    sum is rounded in BLAS's order). For a bias fold use :func:`fold_bias_rows`, which is exact."""
    return _widen_f64(w, src_dtype) @ vec.astype(np.float64)


def fold_bias_rows(w: np.ndarray, src_dtype: str, beta: np.ndarray, bias: np.ndarray,
                   out_dtype: str) -> np.ndarray:
    """``bias + w @ beta`` for a ``[rows, cols]`` chunk of a consumer weight and its ``rows`` bias
    values, each element the exact sum rounded once to ``out_dtype`` (a LayerNorm bias fold).

    Every product ``w[i, j] * beta[j]`` is exact in float64 (bf16/f16/f32 times float32). Their float64
    sum (BLAS) is within ``(cols + 1) * 2^-53 * (|b| + |w| @ |beta|)`` of the exact sum; a row whose
    whole error interval rounds to one ``out_dtype`` value gets it, and the rare row whose interval
    straddles a rounding boundary is summed exactly in integers and rounded once. Rows holding NaN or
    infinity get the IEEE float64 result. Not exact for float64 weights (their products are float64
    multiplies, each rounded once)."""
    p = _widen_f64(w, src_dtype)
    b64 = bias.astype(np.float64).reshape(-1)
    beta64 = beta.astype(np.float64)
    rows, cols = p.shape
    out = np.empty(rows, dtype=DTYPES[out_dtype])
    with np.errstate(over="ignore", invalid="ignore"):
        s = b64 + p @ beta64
        mag = np.abs(b64) + np.abs(p) @ np.abs(beta64)
        err = mag * (2.0 * (cols + 2) * 2.0 ** -53)
        lo = np.nextafter(s - err, -np.inf)
        hi = np.nextafter(s + err, np.inf)
    round_f64(s, out_dtype, out)
    rlo, rhi = np.empty_like(out), np.empty_like(out)
    round_f64(lo, out_dtype, rlo)
    round_f64(hi, out_dtype, rhi)
    u = {2: np.uint16, 4: np.uint32, 8: np.uint64}[out.itemsize]
    finite = np.isfinite(s) & np.isfinite(mag)
    for i in np.flatnonzero(finite & (rlo.view(u) != rhi.view(u))):
        round_f64(np.array([_exact_sum_odd(b64[i], p[i] * beta64)]), out_dtype, out[i:i + 1])
    return out


def _exact_sum_odd(b: float, products: np.ndarray) -> float:
    """The exact sum of ``b`` and ``products`` (finite float64s) rounded to float64 *to odd*: a
    following round-to-nearest to 24 bits or fewer is then a single correct rounding."""
    terms = np.append(products, b)
    mant, exp = np.frexp(terms)  # terms = mant * 2**exp, |mant| in [0.5, 1): mant * 2**53 is an integer
    ints = (mant * 2.0 ** 53).astype(np.int64)
    e0 = int(exp.min()) - 53
    total = sum(int(m) << (int(e) - 53 - e0) for m, e in zip(ints, exp) if m)
    exact = Fraction(total) * Fraction(2) ** e0
    f = float(exact)  # correctly rounded to nearest
    if Fraction(f) == exact:
        return f
    if abs(Fraction(f)) > abs(exact):
        f = math.nextafter(f, 0.0)
    return float(np.array([f]).view(np.uint64).__or__(1).view(np.float64)[0])
