"""The fold kernel: multiply a chunk of a weight by a norm vector in float32, round back once.

Exactness: for a bf16 source, bf16 x bf16 (or float32 ``1 + w``) products are computed in float32
and rounded once, to nearest-even, to the stored dtype; kept in float32 there is no rounding at all.
The bf16 path works on the raw uint16/uint32 bit patterns (faster than a dtype cast and identical
to ml_dtypes' round-to-nearest-even, NaN and infinity included: an upshifted bf16 has zero low bits,
so the rounding add never carries out of a NaN payload).
"""
from __future__ import annotations

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


@np.errstate(over="ignore", invalid="ignore")
def scale_chunk(src: np.ndarray, mult: np.ndarray, src_dtype: str, out_dtype: str,
                out: np.ndarray, scratch: Scratch) -> None:
    """``out = round(src * mult)``: ``src`` is ``[rows, cols]`` raw bytes viewed as ``src_dtype``,
    ``mult`` float32 broadcastable to it (``[1, cols]`` or ``[rows, 1]``), ``out`` the same
    shape in ``out_dtype``."""
    rows, cols = src.shape
    step = max(1, BLOCK_ELEMS // max(cols, 1))  # rows per cache-sized block
    per_row = mult.shape[0] != 1
    if src_dtype != "BF16":
        compute = np.float64 if src_dtype == "F64" else np.float32
        target = DTYPES[out_dtype]
        for r in range(0, rows, step):
            e = min(rows, r + step)
            m = mult[r:e] if per_row else mult
            out[r:e] = (src[r:e].astype(compute) * m.astype(compute, copy=False)).astype(target)
        return
    if not per_row:
        # A flat multiplier for a whole block (the row vector tiled): 1-D ufuncs without
        # broadcasting run about 1.5x faster than broadcasting [step, cols] by [1, cols].
        tiled = scratch.tiled(mult, step)
    u16 = src.view(np.uint16).reshape(-1)
    to_bf16 = out_dtype == "BF16"
    o = out.view(np.uint16 if to_bf16 else np.uint32).reshape(-1)
    size = step * cols
    work = scratch.get("u32", size * 4).view(np.uint32)
    tmp = scratch.get("tmp", size * 4).view(np.uint32)
    for r in range(0, rows, step):
        e = min(rows, r + step)
        k = (e - r) * cols
        w, t = work[:k], tmp[:k]
        f = w.view(np.float32)
        np.copyto(w, u16[r * cols:e * cols])  # bf16 bits -> high half of a float32
        np.left_shift(w, 16, out=w)
        if per_row:
            np.multiply(f.reshape(e - r, cols), mult[r:e], out=f.reshape(e - r, cols))
        else:
            np.multiply(f, tiled[:k], out=f)
        dst = o[r * cols:e * cols]
        if to_bf16:
            # round to nearest even: add 0x7FFF plus the lowest kept bit, then truncate
            np.right_shift(w, 16, out=t)
            np.bitwise_and(t, 1, out=t)
            np.add(w, 0x7FFF, out=w)
            np.add(w, t, out=w)
            np.right_shift(w, 16, out=w)
            np.copyto(dst, w, casting="unsafe")
        else:
            np.copyto(dst, w)


def merged_out_dtype(src_dtype: str, merged_dtype: str) -> str:
    """The stored dtype of a folded tensor: the source's, or float32 (never narrower than source)."""
    if merged_dtype == "float32" and src_dtype in ("BF16", "F16"):
        return "F32"
    return src_dtype


def matvec_rows(w: np.ndarray, src_dtype: str, vec: np.ndarray) -> np.ndarray:
    """``w @ vec`` for a ``[rows, cols]`` chunk, accumulated in float64 (for LayerNorm bias folds)."""
    f = widen_bf16(w) if src_dtype == "BF16" else w
    return f.astype(np.float64) @ vec.astype(np.float64)
