"""The engine's work for ``dequant`` records of integer-packed weights (``fmt`` ``"ct-pack"``).

:func:`streamfold.run.dequant_job.dequant_job` hands these records here: the band's scale rows and
packed zero-point words are read with ``pread`` (a few hundred bytes, possibly from other shards), its
code words through the engine's short-lived window, decoded exactly (:func:`streamfold.quant.decode.int_pack_band`:
``(u - zp)·s`` in float64, at most 9 + 24 significant bits) and ``q·s·g`` rounded once by
:func:`streamfold.quant.kernel.dequant_fold`. Records are described in :mod:`streamfold.planning.quantchunks`.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np

from ..core.dtypes import DTYPES
from ..core.reader import pread_into
from ..quant.decode import int_pack_band, scale_values, unpack_zero_points
from ..quant.kernel import code_bits, dequant_fold, sig_bits

PACK_FMTS = ("ct-pack",)


def read_range(rng: tuple, fds: dict[str, int], paths: dict[str, Path]) -> np.ndarray:
    """The raw bytes of a ``(file, offset, dtype, shape)`` range of a record."""
    f, off, dtype, shape = rng
    raw = np.empty(math.prod(shape) * DTYPES[dtype].itemsize, dtype=np.uint8)
    pread_into(fds[f], raw, off, paths[f])
    return raw


def ct_pack_band_out(c, codes: np.ndarray, scale_raw: np.ndarray, zero_raw: np.ndarray | None,
                     g: np.ndarray | None, out: np.ndarray) -> None:
    """``out`` (the band's output bytes) = rows ``r0..r1`` of a pack-quantized weight, ``(u - zp)·s·g``
    rounded once to ``c.out_dtype``. ``codes``: the band's int32 words (raw bytes); ``scale_raw``,
    ``zero_raw``: the record's scale and zero-point ranges (raw bytes; ``zero_raw`` None: symmetric)."""
    r0, r1 = c.rows
    n = r1 - r0
    words, bits = c.shape
    _, _, sdtype, sshape = c.scale
    scales = scale_values(scale_raw, sdtype, c.tensor).reshape(sshape)
    zp = None
    if zero_raw is not None:  # r0 is a multiple of 32: the band's zero points start at bit 0 of its first word
        zp = unpack_zero_points(zero_raw.view("<i4").reshape(c.zero[3]), bits, n).astype(np.float64)
    packed = codes.view("<i4").reshape(n, words)
    vals = int_pack_band(packed, bits, c.cols, scales, c.block[1] if scales.size > 1 else None, zp)
    dequant_fold(vals, g, c.out_dtype, out.view(DTYPES[c.out_dtype]).reshape(n, c.cols),
                 code_bits("int", bits) + sig_bits(scales))


def pack_compute(c, g: np.ndarray | None, fds: dict[str, int], paths: dict[str, Path], window: Callable,
                 out: np.ndarray) -> None:
    """Compute one ``ct-pack`` record's output band into ``out`` (``window``: the engine's
    ``with_source_window``)."""
    scale_raw = read_range(c.scale, fds, paths)
    zero_raw = read_range(c.zero, fds, paths) if c.zero else None
    window(fds[c.src], c.src_off, c.src_bytes, paths[c.src],
           lambda codes: ct_pack_band_out(c, codes, scale_raw, zero_raw, g, out))
