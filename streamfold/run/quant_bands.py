"""The engine's work for ``dequant`` records of integer-packed weights (``fmt`` ``"ct-pack"``).

:func:`streamfold.run.dequant_job.dequant_job` hands these records here: the band's scale rows and
packed zero-point words are read with ``pread`` (a few hundred bytes, possibly from other shards), its
code words through the engine's short-lived window, decoded exactly (:func:`streamfold.quant.decode.int_pack_band`:
``(u - zp)·s`` in float64, at most 9 + 24 significant bits) and ``q·s·g`` rounded once by
:func:`streamfold.quant.kernel.dequant_fold`. Records are described in :mod:`streamfold.planning.quantchunks`.
"""
from __future__ import annotations

import math
import mmap
from pathlib import Path
from typing import Callable

import numpy as np

from ..core.dtypes import DTYPES
from ..core.reader import pread_into
from ..quant.decode import int_pack_band, scale_values, unpack_zero_points
from ..quant.intpack import awq_band, gptq_band
from ..quant.kernel import code_bits, dequant_fold, sig_bits
from .dequant_count import Count, values_counts

PACK_FMTS = ("ct-pack", "ct-int", "gptq", "gptq_v2", "awq")


def read_range(rng: tuple, fds: dict[str, int], paths: dict[str, Path]) -> np.ndarray:
    """The raw bytes of a ``(file, offset, dtype, shape)`` range of a record."""
    f, off, dtype, shape = rng
    raw = np.empty(math.prod(shape) * DTYPES[dtype].itemsize, dtype=np.uint8)
    pread_into(fds[f], raw, off, paths[f])
    return raw


def ct_pack_band_out(c, codes: np.ndarray, scale_raw: np.ndarray, zero_raw: np.ndarray | None,
                     g: np.ndarray | None, out: np.ndarray, count: Count | None = None) -> None:
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
    _fold(c, vals, g, out, code_bits("int", bits) + sig_bits(scales), count)


def _fold(c, vals: np.ndarray, g: np.ndarray | None, out: np.ndarray, value_bits: int, count: Count | None) -> None:
    """``out`` = ``vals·g`` rounded once (:func:`dequant_fold`, which overwrites ``vals``); with ``count``,
    the band's exact/rounded element counts from a copy of the exact values."""
    keep = vals.copy() if count is not None else None
    dequant_fold(vals, g, c.out_dtype, out.view(DTYPES[c.out_dtype]).reshape(vals.shape[0], c.cols), value_bits)
    if keep is not None:
        count(c.tensor, *values_counts(keep.reshape(-1, c.cols), g, out, c.out_dtype))


def read_cols(rng: tuple, c0: int, c1: int, fds: dict[str, int], paths: dict[str, Path]) -> np.ndarray:
    """Columns ``c0..c1`` of the 2-D tensor a ``(file, offset, dtype, [rows, cols])`` range names, as a
    contiguous array of its raw unsigned words, through a map closed right after: only the pages
    holding those columns are touched."""
    f, off, dtype, (rows, cols) = rng
    isz = DTYPES[dtype].itemsize
    start = off - off % mmap.ALLOCATIONGRANULARITY
    a = None
    try:
        mm = mmap.mmap(fds[f], off + rows * cols * isz - start, prot=mmap.PROT_READ, offset=start)
    except (OSError, ValueError) as e:
        raise OSError(f"{paths[f]}: cannot map bytes {off}..{off + rows * cols * isz} ({e})") from None
    try:
        a = np.frombuffer(mm, dtype=np.dtype(f"<u{isz}"), count=rows * cols, offset=off - start)
        return np.array(a.reshape(rows, cols)[:, c0:c1], copy=True)  # nothing may keep a view of the map
    finally:
        del a
        mm.close()


def gptq_awq_band_out(c, fds: dict[str, int], paths: dict[str, Path], g: np.ndarray | None, out: np.ndarray,
                      count: Count | None = None) -> None:
    """``out`` = output rows ``r0..r1`` of a GPTQ / AWQ GEMM weight (a band of ``qweight``'s columns),
    ``(q - z)·s·g`` rounded once (records: :mod:`streamfold.planning.quantchunks`)."""
    r0, r1 = c.rows
    qrows, qcols, bits = c.shape
    pf = 32 // bits
    sdtype = c.scale[2]
    if c.fmt == "awq":  # outputs are packed along qweight's columns, 8 per word
        qw = read_cols((c.src, c.src_off, "I32", (qrows, qcols)), r0 // pf, r1 // pf, fds, paths)
        qz = read_cols(c.zero, r0 // pf, r1 // pf, fds, paths)
        scales = scale_values(read_cols(c.scale, r0, r1, fds, paths), sdtype, c.tensor)
        vals = awq_band(qw, qz, scales, c.block[1])
    else:
        qw = read_cols((c.src, c.src_off, "I32", (qrows, qcols)), r0, r1, fds, paths)
        qz = read_cols(c.zero, r0 // pf, -(-r1 // pf), fds, paths)
        scales = scale_values(read_cols(c.scale, r0, r1, fds, paths), sdtype, c.tensor)
        if c.gidx:
            g_idx = read_range(c.gidx, fds, paths).view("<i4")
        else:
            g_idx = np.arange(c.cols) // c.block[1]
        vals = gptq_band(qw, qz, scales, g_idx, bits, c.fmt == "gptq", r0 % pf)
    _fold(c, vals, g, out, code_bits("int", bits) + sig_bits(scales), count)


def ct_int_band_out(c, codes: np.ndarray, scale_raw: np.ndarray, zero_raw: np.ndarray | None,
                    g: np.ndarray | None, out: np.ndarray, count: Count | None = None) -> None:
    """``out`` = rows ``r0..r1`` of a compressed-tensors int-quantized weight, ``(q - zp)·s·g`` rounded once
    (``q`` signed int8 codes; ``zero_raw`` the unpacked zero points, None when symmetric)."""
    r0, r1 = c.rows
    n = r1 - r0
    scales = scale_values(scale_raw, c.scale[2], c.tensor).reshape(c.scale[3])
    vals = codes.view(np.int8).reshape(n, c.cols).astype(np.float64)
    groups = scales.shape[-1] if scales.size > 1 else 1
    v = vals.reshape(n, groups, c.cols // groups) if scales.size > 1 else vals
    if zero_raw is not None:
        zp = zero_raw.view(DTYPES[c.zero[2]]).astype(np.float64).reshape(c.zero[3])
        v -= zp[:, :, None] if scales.size > 1 else zp.reshape(())
    v *= scales[:, :, None] if scales.size > 1 else scales.reshape(())
    _fold(c, vals, g, out, code_bits("int", 8) + sig_bits(scales), count)


def pack_compute(c, g: np.ndarray | None, fds: dict[str, int], paths: dict[str, Path], window: Callable,
                 out: np.ndarray, count: Count | None = None) -> None:
    """Compute one integer-packed record's output band into ``out`` (``window``: the engine's
    ``with_source_window``)."""
    if c.fmt == "ct-int":
        scale_raw = read_range(c.scale, fds, paths)
        zero_raw = read_range(c.zero, fds, paths) if c.zero else None
        window(fds[c.src], c.src_off, c.src_bytes, paths[c.src],
               lambda codes: ct_int_band_out(c, codes, scale_raw, zero_raw, g, out, count))
        return
    if c.fmt != "ct-pack":
        gptq_awq_band_out(c, fds, paths, g, out, count)
        return
    scale_raw = read_range(c.scale, fds, paths)
    zero_raw = read_range(c.zero, fds, paths) if c.zero else None
    window(fds[c.src], c.src_off, c.src_bytes, paths[c.src],
           lambda codes: ct_pack_band_out(c, codes, scale_raw, zero_raw, g, out, count))
