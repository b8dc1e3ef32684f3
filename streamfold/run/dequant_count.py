"""How many elements of a dequantized band are exact (the stored value IS ``q·s·g``) and how many were rounded.

Counted where each band is produced (:mod:`streamfold.run.dequant_job`), from the decoded operands, never
from the kernel's intermediates (the kernel may change its route, float64 or float32, underneath): the
band's codes and scales are decoded again (:mod:`streamfold.quant.decode`: exact float64 values ``q·s``),
multiplied by ``g`` in float64 and compared with the stored output widened to float64 (exact for bf16 and
float32). The float64 product is the exact product for every format a ``dequant`` record carries: FP8
e4m3 (4 significant bits) x an F32/BF16/F16/E8M0 scale (<= 24) x a float32 ``g`` (<= 24) is <= 52 bits;
E2M1 (2) x ``2^k`` x ``g`` is <= 26; and no product of these magnitudes leaves float64's normal range.
An element is exact when its exact product is finite and equals the stored value; NaN products and
overflow to infinity count as rounded (the definition of ``verify``'s oracle,
:func:`streamfold.check.quant_oracle.round_exact`, which recounts independently).
"""
from __future__ import annotations

import threading
from typing import Callable

import numpy as np

from ..planning.tasks import Chunk
from ..quant.decode import fp8_block_band, mxfp4_band

ROWS_ELEMS = 1 << 15  # elements per pass: the float64 temporaries stay in cache

# count(tensor, exact, rounded): called once per band, from the folding threads
Count = Callable[[str, int, int], None]


def _exact_in(stored: np.ndarray, out_dtype: str, exact: np.ndarray, finite: bool) -> int:
    """Elements of ``stored`` (the output's raw bytes, ``exact.shape`` elements) equal to the finite
    float64 ``exact`` products. ``finite``: every scale and ``g`` is finite, so no product is infinite
    (NaN codes give NaN, equal to nothing) and the finiteness pass is skipped."""
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
        for a in range(r0, r1, step):
            b = min(r1, a + step)
            g0, g1 = a // 32, -(-b // 32)
            vals = mxfp4_band(blocks[:, g0:g1], sc[:, g0:g1])[:, a - g0 * 32:b - g0 * 32].T
            if gv is not None:
                vals = vals * gv[a:b].reshape(-1, 1)
            exact += _exact_in(stored[(a - r0) * cols * osz:(b - r0) * cols * osz], c.out_dtype, vals, finite)
        return exact, n * cols - exact
    br = c.block[0]
    codes = src.reshape(n, cols)
    step = max(1, ROWS_ELEMS // max(cols, 1))
    for a in range(0, n, step):
        b = min(n, a + step)
        first_tile = (r0 + a) // br - r0 // br  # the scale rows start at tile row r0 // br
        vals = fp8_block_band(codes[a:b], scales[first_tile:], tuple(c.block), r0 + a)
        if gv is not None:
            vals *= gv
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
