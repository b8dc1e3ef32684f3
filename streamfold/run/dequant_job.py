"""The engine's job for a ``dequant`` chunk record: decode a band of a quantized weight, fold, round once.

Reads the band's scale rows (a few hundred bytes, possibly from another shard) with ``pread``, maps
the band's codes through a short-lived window like a fold chunk, decodes them exactly
(:mod:`streamfold.quant.decode`) and rounds ``q·s·g`` once (:func:`streamfold.quant.kernel.dequant_fold`).
Memory per band: the codes' window, a float64 band and the output buffer.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import numpy as np

from ..core.dtypes import DTYPES
from ..core.fold import Scratch
from ..core.reader import pread_into
from ..core.writer import pwrite_all
from ..planning.tasks import Chunk
from ..quant.decode import E2M1_PAIR_TABLE, E8M0_TABLE, fp8_block_band, mxfp4_band, scale_values
from ..quant.kernel import code_bits, dequant_fold, sig_bits
from .dequant_count import Count, DequantCounts, band_counts  # noqa: F401 - DequantCounts for the engine
from .quant_bands import PACK_FMTS, pack_compute


def read_scale_rows(c: Chunk, fds: dict[str, int], paths: dict[str, Path]) -> np.ndarray:
    """The float64 scale rows a ``dequant`` record names (exact values; E8M0 bytes decoded)."""
    sfile, soff, sdtype, sshape = c.scale
    raw = np.empty(math.prod(sshape) * DTYPES[sdtype].itemsize, dtype=np.uint8)
    pread_into(fds[sfile], raw, soff, paths[sfile])
    return scale_values(raw, sdtype, c.tensor).reshape(sshape)


def dequant_band(c: Chunk, codes: np.ndarray, scales: np.ndarray, g: np.ndarray | None, out: np.ndarray) -> None:
    """``out`` (the band's output bytes) = the band's codes decoded with ``scales`` times ``g``, rounded once."""
    r0, r1 = c.rows
    vals = fp8_block_band(codes.reshape(r1 - r0, c.cols), scales, tuple(c.block), r0)
    dequant_fold(vals, g, c.out_dtype, out.view(DTYPES[c.out_dtype]).reshape(r1 - r0, c.cols),
                 code_bits("fp8") + sig_bits(scales))


def mxfp4_band_out(c: Chunk, blocks: np.ndarray, scale_raw: np.ndarray, g: np.ndarray | None,
                   out: np.ndarray) -> None:
    """``out`` = rows ``h0..h1`` of one gpt-oss expert's ``[in, out]`` (transformers' transposed layout):
    the expert's MXFP4 ``blocks`` ``[out, in/32, 16]`` (raw bytes) and E8M0 ``scale_raw`` ``[out, in/32]``
    decoded for those inputs' groups, transposed, times ``g[h0:h1]`` per row, rounded once. E2M1 (2
    significant bits) x 2^k x a float32 g is exact in float64, so the one rounding is to ``out_dtype``."""
    h0, h1 = c.rows
    rows, groups, width = c.shape
    g0, g1 = h0 // 32, -(-h1 // 32)
    gv = None if g is None else np.asarray(g, dtype=np.float32)[h0:h1].reshape(-1, 1)
    sc = scale_raw.reshape(rows, groups)[:, g0:g1]
    if _f32_exact(sc, gv):
        _mxfp4_band_f32(c, blocks.reshape(rows, groups, width)[:, g0:g1], sc, gv, out)
        return
    vals = mxfp4_band(blocks.reshape(rows, groups, width)[:, g0:g1], scale_raw.reshape(rows, groups)[:, g0:g1])
    band = np.ascontiguousarray(vals[:, h0 - g0 * 32:h1 - g0 * 32].T)  # [h1 - h0, out]
    dequant_fold(band, gv, c.out_dtype, out.view(DTYPES[c.out_dtype]).reshape(h1 - h0, c.cols), code_bits("e2m1") + 1)


_E2M1_PAIR_F32 = E2M1_PAIR_TABLE.astype(np.float32)
_E8M0_F32 = E8M0_TABLE.astype(np.float32)  # every 2^(u-127), u < 255, is a float32 (u = 0 a subnormal)


def _f32_exact(scales: np.ndarray, g: np.ndarray | None) -> bool:
    """Whether every ``q · 2^(u-127) · g`` of a band is exactly a NORMAL float32: g has at most 22
    significant bits (q has 2) and, over the band's scale bytes and g's magnitudes, the smallest nonzero
    product is >= 2^-126 and the largest < 2^127 (no NaN scale, no non-finite g). Then float32 holds
    the exact product and the one rounding is to the output dtype, as on the float64 path."""
    if scales.size == 0:
        return True
    umin, umax = int(scales.min()), int(scales.max())
    if umax == 255 or (g is not None and sig_bits(g) > 22):
        return False
    mag = np.array([1.0]) if g is None else np.abs(g.astype(np.float64))
    nz = mag[mag != 0]
    if nz.size == 0:
        return True
    with np.errstate(invalid="ignore"):
        lo, hi = 0.5 * np.ldexp(1.0, umin - 127) * nz.min(), 6.0 * np.ldexp(1.0, umax - 127) * nz.max()
    return bool(lo >= 2.0 ** -126 and hi < 2.0 ** 127)


def _mxfp4_band_f32(c: Chunk, blocks: np.ndarray, scales: np.ndarray, g: np.ndarray | None, out: np.ndarray) -> None:
    """:func:`mxfp4_band_out` in float32, for bands :func:`_f32_exact` accepts: decode, scale, transpose and
    multiply are exact, then one rounding to nearest-even bf16 (or none for float32)."""
    h0, h1 = c.rows
    rows, ng = scales.shape
    vals = _E2M1_PAIR_F32[blocks.view(np.uint8)].reshape(rows, ng, 32)
    vals *= _E8M0_F32[scales.view(np.uint8)][:, :, None]
    g0 = h0 // 32
    band = np.ascontiguousarray(vals.reshape(rows, ng * 32)[:, h0 - g0 * 32:h1 - g0 * 32].T)  # [h1 - h0, out]
    if g is not None:
        band *= g  # exact: a normal float32 product of <= 24 significant bits
    dst = out.view(DTYPES[c.out_dtype]).reshape(band.shape)
    if c.out_dtype == "F32":
        np.copyto(dst, band)
        return
    w = band.view(np.uint32)  # finite normals (and zeros): add 0x7FFF + the kept lsb, truncate
    w += 0x7FFF + ((w >> 16) & 1)
    np.copyto(dst.view(np.uint16), w >> 16, casting="unsafe")


def dequant_job(c: Chunk, g: np.ndarray | None, fds: dict[str, int], dst_fd: int, paths: dict[str, Path],
                window: Callable, job_cls, count: Count | None = None) -> object:
    """A :class:`streamfold.run.engine.Job` for one ``dequant`` record (``window``: the engine's
    ``with_source_window``; ``count(tensor, exact, rounded)``: given each band's element counts,
    :func:`streamfold.run.dequant_count.band_counts`)."""
    def compute(s: Scratch, out: np.ndarray) -> None:
        if c.fmt in PACK_FMTS:  # integer-packed weights: streamfold.run.quant_bands
            pack_compute(c, g, fds, paths, window, out, count)
            return
        if c.fmt == "mxfp4":  # the expert's scales as raw E8M0 bytes; its blocks through a window
            sfile, soff, sdtype, sshape = c.scale
            raw = np.empty(math.prod(sshape) * DTYPES[sdtype].itemsize, dtype=np.uint8)
            pread_into(fds[sfile], raw, soff, paths[sfile])

            def band(blocks: np.ndarray) -> None:
                mxfp4_band_out(c, blocks, raw, g, out)
                if count is not None:
                    count(c.tensor, *band_counts(c, blocks, raw, g, out))
            window(fds[c.src], c.src_off, math.prod(c.shape), paths[c.src], band)
            return
        scales = read_scale_rows(c, fds, paths)

        def tiles(codes: np.ndarray) -> None:
            dequant_band(c, codes, scales, g, out)
            if count is not None:
                count(c.tensor, *band_counts(c, codes, scales, g, out))
        window(fds[c.src], c.src_off, c.src_bytes, paths[c.src], tiles)

    def write(out: np.ndarray) -> None:
        pwrite_all(dst_fd, out, c.dst)
    return job_cls(c.src_bytes, write, compute, c.size, end=c.dst + c.size)
