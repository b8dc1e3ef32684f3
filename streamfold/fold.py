"""The fold kernel: multiply a chunk of a weight by a norm vector in float32, round back once.

Exactness: for a bf16 source, bf16 x bf16 (or float32 ``1 + w``) products are computed in float32
and rounded once, to nearest-even, to the stored dtype; kept in float32 there is no rounding at all.
The bf16 path works on the raw uint16/uint32 bit patterns (faster than a dtype cast and identical
to ml_dtypes' round-to-nearest-even, NaN and infinity included: an upshifted bf16 has zero low bits,
so the rounding add never carries out of a NaN payload).
"""
from __future__ import annotations

import numpy as np

from .dtypes import DTYPES

# Elements per compute block: small enough that the float32 scratch stays in L2 cache.
BLOCK_ELEMS = 1 << 15


class Scratch:
    """Per-thread reusable buffers, so a worker allocates once, not per chunk."""

    def __init__(self) -> None:
        self._bufs: dict[tuple[str, int], np.ndarray] = {}

    def get(self, key: str, nbytes: int) -> np.ndarray:
        """A uint8 buffer of at least ``nbytes`` for ``key``, grown as needed."""
        buf = self._bufs.get((key, 0))
        if buf is None or buf.nbytes < nbytes:
            buf = np.empty(max(nbytes, 1), dtype=np.uint8)
            self._bufs[(key, 0)] = buf
        return buf[:nbytes]


@np.errstate(over="ignore", invalid="ignore")
def scale_chunk(src: np.ndarray, mult: np.ndarray, src_dtype: str, out_dtype: str,
                out: np.ndarray, scratch: Scratch) -> None:
    """``out = round(src * mult)``: ``src`` is ``[rows, cols]`` raw bytes viewed as ``src_dtype``,
    ``mult`` float32 broadcastable to it (``[1, cols]`` or ``[rows, 1]``), ``out`` the same
    shape in ``out_dtype``."""
    rows, cols = src.shape
    step = max(1, BLOCK_ELEMS // max(cols, 1))
    if src_dtype == "BF16":
        u16 = src.view(np.uint16)
        work = scratch.get("u32", step * cols * 4).view(np.uint32).reshape(step, cols)
        tmp = scratch.get("tmp", step * cols * 4).view(np.uint32).reshape(step, cols)
        to_bf16 = out_dtype == "BF16"
        o = out.view(np.uint16 if to_bf16 else np.uint32)
        for r in range(0, rows, step):
            e = min(rows, r + step)
            n = e - r
            w, t = work[:n], tmp[:n]
            m = mult if mult.shape[0] == 1 else mult[r:e]
            np.left_shift(u16[r:e], 16, out=w, dtype=np.uint32)
            f = w.view(np.float32)
            np.multiply(f, m, out=f)
            if to_bf16:
                # round to nearest even: add 0x7FFF plus the lowest kept bit, then truncate
                np.right_shift(w, 16, out=t)
                np.bitwise_and(t, 1, out=t)
                np.add(t, 0x7FFF, out=t)
                np.add(w, t, out=w)
                np.right_shift(w, 16, out=w)
                o[r:e] = w
            else:
                o[r:e] = w
        return
    compute = np.float64 if src_dtype == "F64" else np.float32
    target = DTYPES[out_dtype]
    for r in range(0, rows, step):
        e = min(rows, r + step)
        m = mult if mult.shape[0] == 1 else mult[r:e]
        prod = src[r:e].astype(compute) * m.astype(compute, copy=False)
        out[r:e] = prod.astype(target)  # numpy casts round to nearest even


def merged_out_dtype(src_dtype: str, merged_dtype: str) -> str:
    """The stored dtype of a folded tensor: the source's, or float32 (never narrower than source)."""
    if merged_dtype == "float32" and src_dtype in ("BF16", "F16"):
        return "F32"
    return src_dtype


def matvec_rows(w: np.ndarray, src_dtype: str, vec: np.ndarray) -> np.ndarray:
    """``w @ vec`` for a ``[rows, cols]`` chunk, accumulated in float64 (for LayerNorm bias folds)."""
    if src_dtype == "BF16":
        f = (w.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        f = w
    return f.astype(np.float64) @ vec.astype(np.float64)
