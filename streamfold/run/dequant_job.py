"""The engine's job for a ``dequant`` chunk record: decode a band of a quantized weight, fold, round once.

Reads the band's scale rows (a few hundred bytes, possibly from another shard) with ``pread``, maps
the band's codes through a short-lived window like a fold chunk, and rounds ``q·s·g`` once: in float32
where :mod:`streamfold.quant.fast32` proves that bit-identical (cache-sized blocks, buffers reused from
the thread's scratch), else exactly in float64 (:mod:`streamfold.quant.decode`,
:func:`streamfold.quant.kernel.dequant_fold`) in sub-bands of 2 MB. Memory per band: the codes' window,
the output buffer (2 MiB: ``planning.tasks.DEQUANT_BAND``) and that scratch.
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
from ..quant import fast32
from ..quant.decode import fp8_block_band, mxfp4_band, scale_values
from ..quant.kernel import code_bits, dequant_fold, sig_bits
from .dequant_count import Count, DequantCounts, band_counts  # noqa: F401 - DequantCounts for the engine
from .quant_bands import PACK_FMTS, pack_compute


def read_scale_rows(c: Chunk, fds: dict[str, int], paths: dict[str, Path]) -> np.ndarray:
    """The float64 scale rows a ``dequant`` record names (exact values; E8M0 bytes decoded)."""
    sfile, soff, sdtype, sshape = c.scale
    raw = np.empty(math.prod(sshape) * DTYPES[sdtype].itemsize, dtype=np.uint8)
    pread_into(fds[sfile], raw, soff, paths[sfile])
    return scale_values(raw, sdtype, c.tensor).reshape(sshape)


def dequant_band(c: Chunk, codes: np.ndarray, scales: np.ndarray, g: np.ndarray | None, out: np.ndarray,
                 scratch: Scratch | None = None) -> None:
    """``out`` (the band's output bytes) = the band's codes decoded with ``scales`` times ``g``, rounded once
    (in float32 where :mod:`streamfold.quant.fast32` proves it bit-identical, else in float64)."""
    r0, r1 = c.rows
    dst = out.view(DTYPES[c.out_dtype]).reshape(r1 - r0, c.cols)
    q = codes.reshape(r1 - r0, c.cols)
    if fast32.fp8_block(q, scales, tuple(c.block), r0, g, c.out_dtype, dst.view(_RAW[c.out_dtype]), scratch):
        return
    br = c.block[0]
    step = max(1, _F64_ELEMS // max(c.cols, 1))  # float64 sub-bands: memory stays ~ the output's
    for a in range(0, r1 - r0, step):
        e = min(r1 - r0, a + step)
        vals = fp8_block_band(q[a:e], scales[(r0 + a) // br - r0 // br:], tuple(c.block), r0 + a)
        dequant_fold(vals, g, c.out_dtype, dst[a:e], code_bits("fp8") + sig_bits(scales))


def mxfp4_band_out(c: Chunk, blocks: np.ndarray, scale_raw: np.ndarray, g: np.ndarray | None,
                   out: np.ndarray, scratch: Scratch | None = None) -> None:
    """``out`` = rows ``h0..h1`` of one gpt-oss expert's ``[in, out]`` (transformers' transposed layout):
    the expert's MXFP4 ``blocks`` ``[out, in/32, 16]`` (raw bytes) and E8M0 ``scale_raw`` ``[out, in/32]``
    decoded for those inputs' groups, transposed, times ``g[h0:h1]`` per row, rounded once. E2M1 (2
    significant bits) x 2^k x a float32 g is exact in float64, so the one rounding is to ``out_dtype``
    (in float32 where :mod:`streamfold.quant.fast32` proves it bit-identical)."""
    h0, h1 = c.rows
    rows, groups, width = c.shape
    g0, g1 = h0 // 32, -(-h1 // 32)
    bl = blocks.reshape(rows, groups, width)[:, g0:g1]
    sc = scale_raw.reshape(rows, groups)[:, g0:g1]
    dst = out.view(DTYPES[c.out_dtype]).reshape(h1 - h0, c.cols)
    gh = None if g is None else np.asarray(g, dtype=np.float32)[h0:h1]
    if fast32.mxfp4_rows(bl, sc, h0 - g0 * 32, h1 - h0, gh, c.out_dtype, dst.view(_RAW[c.out_dtype]), scratch):
        return
    step = max(32, _F64_ELEMS // max(rows, 1) // 32 * 32)  # float64 sub-bands of whole groups
    for a in range(h0, h1, step):
        e = min(h1, a + step)
        ga = a // 32
        vals = mxfp4_band(blocks.reshape(rows, groups, width)[:, ga:-(-e // 32)],
                          scale_raw.reshape(rows, groups)[:, ga:-(-e // 32)])
        band = np.ascontiguousarray(vals[:, a - ga * 32:e - ga * 32].T)  # [e - a, out]
        dequant_fold(band, None if gh is None else gh[a - h0:e - h0].reshape(-1, 1), c.out_dtype,
                     dst[a - h0:e - h0], code_bits("e2m1") + 1)


_RAW = {"BF16": np.uint16, "F32": np.float32}  # the views fast32 writes
_F64_ELEMS = 1 << 18  # elements per float64 sub-band (2 MB) on the float64 path


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
                mxfp4_band_out(c, blocks, raw, g, out, s)
                if count is not None:
                    count(c.tensor, *band_counts(c, blocks, raw, g, out))
            window(fds[c.src], c.src_off, math.prod(c.shape), paths[c.src], band)
            return
        scales = read_scale_rows(c, fds, paths)

        def tiles(codes: np.ndarray) -> None:
            dequant_band(c, codes, scales, g, out, s)
            if count is not None:
                count(c.tensor, *band_counts(c, codes, scales, g, out))
        window(fds[c.src], c.src_off, c.src_bytes, paths[c.src], tiles)

    def write(out: np.ndarray) -> None:
        pwrite_all(dst_fd, out, c.dst)
    return job_cls(c.src_bytes, write, compute, c.size, end=c.dst + c.size)
