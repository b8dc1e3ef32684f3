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
from ..quant.decode import fp8_block_band, scale_values
from ..quant.kernel import code_bits, dequant_fold, sig_bits


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


def dequant_job(c: Chunk, g: np.ndarray | None, fds: dict[str, int], dst_fd: int, paths: dict[str, Path],
                window: Callable, job_cls) -> object:
    """A :class:`streamfold.run.engine.Job` for one ``dequant`` record (``window``: the engine's
    ``with_source_window``)."""
    def compute(s: Scratch, out: np.ndarray) -> None:
        scales = read_scale_rows(c, fds, paths)
        window(fds[c.src], c.src_off, c.src_bytes, paths[c.src], lambda codes: dequant_band(c, codes, scales, g, out))

    def write(out: np.ndarray) -> None:
        pwrite_all(dst_fd, out, c.dst)
    return job_cls(c.src_bytes, write, compute, c.size, end=c.dst + c.size)
