"""How many elements of a dequantized band are exact (the stored value IS ``q·s·g``) and how many were rounded.

Counted where each band is produced (:mod:`streamfold.run.dequant_job`), from the decoded operands, never
from the kernel's intermediates (the kernel may change its route, float64 or float32, underneath): the
band's codes and scales are decoded again (by :mod:`streamfold.quant.decode`'s tables: exact values
``q·s``), multiplied by ``g`` in float64 and compared with the stored output widened to float64 (exact for
bf16 and float32). The float64 product is the exact product for every format a ``dequant`` record carries: FP8
e4m3 (4 significant bits) x an F32/BF16/F16/E8M0 scale (<= 24) x a float32 ``g`` (<= 24) is <= 52 bits;
E2M1 (2) x ``2^k`` x ``g`` is <= 26; and no product of these magnitudes leaves float64's normal range.
An element is exact when its exact product is finite and equals the stored value; NaN products and
overflow to infinity count as rounded (the definition of ``verify``'s oracle,
:func:`streamfold.check.quant_oracle.round_exact`, which recounts independently).

Where a band's operands prove it, the same comparison runs in float32 at half the memory traffic: when
the code's significant bits (FP8 4, E2M1 2) plus the most any of the band's scales and of ``g`` has are
at most 24, and every nonzero ``|q·s|`` and ``|q·s·g|`` lies in float32's normal range (bounded from
the smallest and largest nonzero code, scale and ``g`` magnitudes), float32 holds ``q·s`` and
``q·s·g`` exactly (e.g. ``ue8m0`` or E8M0 power-of-two scales with a bf16 norm); otherwise float64.
"""
from __future__ import annotations

import threading
from typing import Callable

import numpy as np

from ..planning.tasks import Chunk
from ..quant.decode import E2M1_PAIR_TABLE, E8M0_TABLE, F8_E4M3FN_TABLE, mxfp4_band

ROWS_ELEMS = 1 << 15  # elements per pass: the float64 temporaries stay in cache
_F8_F32 = F8_E4M3FN_TABLE.astype(np.float32)  # every e4m3 value is a float32 (NaN stays NaN)
_E2M1_PAIR_F32 = E2M1_PAIR_TABLE.astype(np.float32)
_E8M0_F32 = E8M0_TABLE.astype(np.float32)  # 2^(u-127) for u < 255 (u = 0 a float32 subnormal), 255 NaN
# (significant bits, smallest and largest nonzero magnitude) of the codes
_CODES = {"fp8": (4, 2.0 ** -9, 448.0), "mxfp4": (2, 0.5, 6.0)}


def _bits(v: np.ndarray) -> int:
    """The most significant bits any nonzero finite value of ``v`` has (0 for none)."""
    v = np.abs(np.asarray(v, dtype=np.float64).reshape(-1))
    v = v[np.isfinite(v) & (v != 0)]
    if v.size == 0:
        return 0
    m = (np.frexp(v)[0] * 2.0 ** 53).astype(np.uint64)  # the significand as a 53-bit integer
    low = m & (~m + np.uint64(1))  # its lowest set bit
    return int(53 - np.log2(low.astype(np.float64)).astype(np.int64).min())


def _f32_holds(fmt: str, scales: np.ndarray, g: np.ndarray | None) -> bool:
    """Whether float32 holds every ``q·s`` and ``q·s·g`` of a band exactly (see the module docstring)."""
    cbits, cmin, cmax = _CODES[fmt]
    s = np.abs(np.asarray(scales, dtype=np.float64).reshape(-1))
    if not np.isfinite(s).all() or (g is not None and not np.isfinite(g).all()):
        return False
    s = s[s != 0]
    if s.size == 0:
        return True  # every product is zero
    if cbits + _bits(s) + (0 if g is None else _bits(g)) > 24:
        return False
    gz = np.zeros(0) if g is None else np.abs(g[g != 0])
    gmin, gmax = (1.0, 1.0) if gz.size == 0 else (min(1.0, float(gz.min())), max(1.0, float(gz.max())))
    return cmin * float(s.min()) * gmin >= 2.0 ** -126 and cmax * float(s.max()) * gmax < 2.0 ** 127


def _fp8_tiles(codes: np.ndarray, scales: np.ndarray, block: tuple[int, int], row0: int, table) -> np.ndarray:
    """:func:`streamfold.quant.decode.fp8_block_band` with the code table ``table``: float64, or float32
    for bands :func:`_f32_holds` accepts (``scales`` rounded to it: exact, every scale dtype fits)."""
    n, cols = codes.shape
    br, bc = block
    out = np.take(table, codes)  # (np.take: about 2x faster than fancy indexing here)
    s32 = scales.astype(table.dtype)
    full, t0, r = cols // bc, row0 // br, 0
    while r < n:
        tile = (row0 + r) // br
        e = min(n, (tile + 1) * br - row0)
        s = s32[tile - t0]
        if full:
            out[r:e, :full * bc].reshape(e - r, full, bc).__imul__(s[:full, None])
        if cols > full * bc:
            out[r:e, full * bc:] *= s[full]
        r = e
    return out

# count(tensor, exact, rounded): called once per band, from the folding threads
Count = Callable[[str, int, int], None]


def _exact_in(stored: np.ndarray, out_dtype: str, exact: np.ndarray, finite: bool) -> int:
    """Elements of ``stored`` (the output's raw bytes, ``exact.shape`` elements) equal to the finite
    ``exact`` products (float64, or float32 where it holds them). ``finite``: every scale and ``g`` is
    finite, so no product is infinite (NaN codes give NaN, equal to nothing): no finiteness pass."""
    if out_dtype == "BF16":
        got = (stored.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        got = stored.view(np.float32)
    got = got.reshape(exact.shape)
    with np.errstate(invalid="ignore"):
        eq = got == exact
        if not finite:
            eq &= np.isfinite(exact)
        return int(np.count_nonzero(eq))


def band_counts(c: Chunk, src: np.ndarray, scales: np.ndarray, g: np.ndarray | None,
                out: np.ndarray) -> tuple[int, int]:
    """``(exact, rounded)`` over the band record ``c`` wrote into ``out`` (its raw output bytes).

    FP8 tiles: ``src`` the band's codes, ``scales`` its float64 scale rows (as the job read them);
    MXFP4 (``c.fmt == "mxfp4"``): ``src`` the expert's raw blocks, ``scales`` its raw E8M0 bytes."""
    r0, r1 = c.rows
    n, cols = r1 - r0, c.cols
    osz = 2 if c.out_dtype == "BF16" else 4
    stored = out.view(np.uint8)
    gv = None if g is None else np.asarray(g, dtype=np.float32).astype(np.float64)
    finite = gv is None or bool(np.isfinite(gv).all())
    if c.fmt != "mxfp4":  # E8M0 scales are finite but 255 (NaN): a NaN product, never counted exact
        finite = finite and bool(np.isfinite(scales).all())
    exact = 0
    if c.fmt == "mxfp4":  # rows r0..r1 of the expert's transposed [in, out]: g per row
        rows, groups, width = c.shape
        blocks = src.reshape(rows, groups, width)
        sc = scales.reshape(rows, groups)
        step = max(32, (ROWS_ELEMS // max(cols, 1)) // 32 * 32)
        f32 = _f32_holds("mxfp4", E8M0_TABLE[sc[:, r0 // 32:-(-r1 // 32)]], None if gv is None else gv[r0:r1])
        for a in range(r0, r1, step):
            b = min(r1, a + step)
            g0, g1 = a // 32, -(-b // 32)
            if f32:
                vals = (np.take(_E2M1_PAIR_F32, blocks[:, g0:g1], axis=0).reshape(rows, g1 - g0, 32)
                        * _E8M0_F32[sc[:, g0:g1]][:, :, None]).reshape(rows, -1)[:, a - g0 * 32:b - g0 * 32].T
                if gv is not None:
                    vals = vals * gv[a:b].astype(np.float32).reshape(-1, 1)
            else:
                vals = mxfp4_band(blocks[:, g0:g1], sc[:, g0:g1])[:, a - g0 * 32:b - g0 * 32].T
                if gv is not None:
                    vals = vals * gv[a:b].reshape(-1, 1)
            exact += _exact_in(stored[(a - r0) * cols * osz:(b - r0) * cols * osz], c.out_dtype, vals, finite)
        return exact, n * cols - exact
    br = c.block[0]
    codes = src.reshape(n, cols)
    step = max(1, ROWS_ELEMS // max(cols, 1))
    f32 = _f32_holds("fp8", scales, gv)
    g32 = None if gv is None else gv.astype(np.float32)
    for a in range(0, n, step):
        b = min(n, a + step)
        first_tile = (r0 + a) // br - r0 // br  # the scale rows start at tile row r0 // br
        vals = _fp8_tiles(codes[a:b].view(np.uint8), scales[first_tile:], tuple(c.block), r0 + a,
                          _F8_F32 if f32 else F8_E4M3FN_TABLE)
        if gv is not None:
            vals *= g32 if f32 else gv
        exact += _exact_in(stored[a * cols * osz:b * cols * osz], c.out_dtype, vals, finite)
    return exact, n * cols - exact


class DequantCounts:
    """Per output shard, per dequantized tensor: ``[exact, rounded]`` element counts (thread safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.shards: dict[str, dict[str, list[int]]] = {}

    def adder(self, shard: str) -> Count:
        """The ``count`` callback of one shard's dequant jobs."""
        def add(tensor: str, exact: int, rounded: int) -> None:
            with self._lock:
                t = self.shards.setdefault(shard, {}).setdefault(tensor, [0, 0])
                t[0] += exact
                t[1] += rounded
        return add

    def of(self, shard: str) -> dict[str, list[int]] | None:
        """The shard's counts (None: it dequantized nothing)."""
        with self._lock:
            d = self.shards.get(shard)
            return None if d is None else {k: list(v) for k, v in d.items()}


def _two_product_error(a: np.ndarray, b: np.ndarray, p: np.ndarray) -> np.ndarray:
    """``a·b - p`` exactly, for ``p = fl(a·b)`` in float64 (Dekker's TwoProduct with Veltkamp's split;
    valid while no partial product over- or underflows)."""
    sa, sb = a * 134217729.0, b * 134217729.0  # 2^27 + 1
    ah, bh = sa - (sa - a), sb - (sb - b)
    al, bl = a - ah, b - bh
    return ((ah * bh - p) + ah * bl + al * bh) + al * bl


def values_counts(values: np.ndarray, g: np.ndarray | None, out: np.ndarray, out_dtype: str) -> tuple[int, int]:
    """``(exact, rounded)`` of a band whose exact decoded values ``q·s`` are ``values`` (float64
    ``[n, cols]``, as integer formats decode them: at most 9 + 24 significant bits) and whose rounded
    ``q·s·g`` sit in ``out`` (raw bytes). ``q·s·g`` may need up to 57 bits, more than float64 holds, so
    an element is exact when float64's product has no error (TwoProduct) and equals the stored value."""
    n, cols = values.shape
    stored = out.view(np.uint8)
    osz = 2 if out_dtype == "BF16" else 4
    gv = None if g is None else np.asarray(g, dtype=np.float32).astype(np.float64).reshape(1, -1)
    exact, step = 0, max(1, ROWS_ELEMS // max(cols, 1))
    for a in range(0, n, step):
        b = min(n, a + step)
        v = values[a:b]
        with np.errstate(invalid="ignore", over="ignore"):
            if gv is None:
                p, ok = v, np.isfinite(v)
            else:
                p = v * gv
                ok = np.isfinite(p) & (np.abs(p) > 2.0 ** -900) & (_two_product_error(v, gv, p) == 0)
                ok |= p == 0  # a zero code: the product is exactly zero
            got = stored[a * cols * osz:b * cols * osz]
            got = ((got.view(np.uint16).astype(np.uint32) << 16).view(np.float32) if out_dtype == "BF16"
                   else got.view(np.float32)).reshape(b - a, cols)
            exact += int(np.count_nonzero(ok & (got == p)))
    return exact, n * cols - exact
