"""The forward pass's weight reader: float32 views of checkpoint tensors in bounded row blocks.

Every weight matrix is read in row blocks (``os.preadv`` into reused buffers, never memory-mapped),
converted to float32 and multiplied block by block (:meth:`Weights.linear`), so an 8B checkpoint runs
in a few hundred MB. Used by :mod:`streamfold.check.forward`.

FP8 block-quantized weights (``quant_method: fp8``: ``X.weight`` F8_E4M3 with ``X.weight_scale_inv``, the
block size from ``weight_block_size``) are read as their exact ``q·s`` (:func:`streamfold.quant.decode.fp8_block_band`)
rounded to float32, as transformers' float32 dequantization computes them; so a ``--dequantize`` output,
partly widened and partly still FP8, runs against its FP8 source.
"""
from __future__ import annotations

import os

import numpy as np

from ..core.dtypes import DTYPES, widen_bf16
from ..core.errors import StreamfoldError
from ..core.reader import Checkpoint, TensorInfo, pread_into
from ..quant.decode import fp8_block_band, scale_values

DEFAULT_BLOCK = 32 << 20  # float32 bytes of one weight block


def fp8_block_of(qcfg) -> tuple[int, int] | None:
    """The block size of an FP8 block-quantized checkpoint's ``quantization_config`` (None: not one)."""
    if not isinstance(qcfg, dict) or qcfg.get("quant_method") != "fp8":
        return None
    b = qcfg.get("weight_block_size")
    if not (isinstance(b, list) and len(b) == 2 and all(isinstance(x, int) and x > 0 for x in b)):
        return None
    return b[0], b[1]


class Weights:
    """Float32 views of checkpoint tensors, read in bounded row blocks into reused buffers."""

    def __init__(self, root, block_bytes: int = DEFAULT_BLOCK, fp8_block: tuple[int, int] | None = None) -> None:
        self.ckpt = Checkpoint(root)
        self.fp8_block = fp8_block  # FP8 block-quantized weights are decoded (see the module docstring)
        self.block_bytes = max(1 << 16, block_bytes)
        self._fds: dict[str, int] = {}
        self._bufs: dict[str, np.ndarray] = {}
        self.bytes_read = 0

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self.ckpt.close()
        self._bufs.clear()

    def has(self, name: str) -> bool:
        return name in self.ckpt.tensors

    def info(self, name: str) -> TensorInfo:
        t = self.ckpt.tensors.get(name)
        if t is None:
            raise StreamfoldError(f"{self.ckpt.root}: tensor {name!r} is missing (the forward pass needs it)")
        return t

    def _fd(self, t: TensorInfo) -> int:
        fd = self._fds.get(str(t.path))
        if fd is None:
            fd = self._fds[str(t.path)] = os.open(t.path, os.O_RDONLY)
        return fd

    def _buf(self, key: str, n: int, dtype) -> np.ndarray:
        """The reused buffer ``key``, at least ``n`` elements."""
        b = self._bufs.get(key)
        if b is None or b.size < n:
            b = self._bufs[key] = np.empty(n, dtype=dtype)
        return b[:n]

    def _read(self, t: TensorInfo, byte_off: int, nbytes: int, count: int) -> np.ndarray:
        """``count`` elements starting ``byte_off`` bytes into ``t``, as float32 (a reused buffer)."""
        raw = self._buf("raw", nbytes, np.uint8)
        pread_into(self._fd(t), raw, t.begin + byte_off, t.path)
        self.bytes_read += nbytes
        out = self._buf("f32", count, np.float32)
        if t.dtype == "BF16":
            widen_bf16(raw, out)
        elif t.dtype in ("F16", "F32", "F64"):
            out[...] = raw.view(DTYPES[t.dtype])
        elif t.dtype == "F8_E4M3" and self.fp8_block is not None and len(t.shape) == 2:
            out[...] = self._fp8_rows(t, raw, byte_off // t.shape[1]).reshape(-1)
        else:
            raise StreamfoldError(f"{t.path.name}: tensor {t.name!r} is {t.dtype}; the forward pass reads "
                                  "float tensors only")
        return out

    def _fp8_rows(self, t: TensorInfo, codes: np.ndarray, row0: int) -> np.ndarray:
        """Whole rows ``row0..`` of an FP8 block-quantized weight as exact ``q·s`` (float64)."""
        s = self.info(t.name + "_scale_inv")  # X.weight -> X.weight_scale_inv
        raw = np.empty(s.nbytes, np.uint8)
        pread_into(self._fd(s), raw, s.begin, s.path)
        self.bytes_read += s.nbytes
        scale = scale_values(raw, s.dtype, s.name).reshape(s.shape)
        br = self.fp8_block[0]
        rows = codes.size // t.shape[1]
        return fp8_block_band(codes.reshape(rows, t.shape[1]), scale[row0 // br:], self.fp8_block, row0)

    def vector(self, name: str) -> np.ndarray:
        t = self.info(name)
        return self._read(t, 0, t.nbytes, t.numel).reshape(t.shape).copy()

    def optional_vector(self, name: str) -> np.ndarray | None:
        return self.vector(name) if self.has(name) else None

    def rows(self, name: str, index: np.ndarray) -> np.ndarray:
        """Selected rows of a 2-D tensor (embedding lookup)."""
        t = self.info(name)
        cols = t.shape[-1]
        isz = DTYPES[t.dtype].itemsize
        out = np.empty((len(index), cols), dtype=np.float32)
        for i, r in enumerate(index):
            if not 0 <= int(r) < t.shape[0]:
                raise StreamfoldError(f"token id {int(r)} is outside the vocabulary ({t.shape[0]} rows of {name!r})")
            out[i] = self._read(t, int(r) * cols * isz, cols * isz, cols)
        return out

    def linear(self, x: np.ndarray, name: str, row0: int = 0, row1: int | None = None,
               bias: str | None = None) -> np.ndarray:
        """``x @ W[row0:row1].T (+ b)`` for ``W = name`` ``[out, in]``, streamed in row blocks."""
        t = self.info(name)
        if len(t.shape) != 2 or t.shape[1] != x.shape[-1]:
            raise StreamfoldError(f"{t.path.name}: tensor {name!r} has shape {list(t.shape)}; the forward pass "
                                  f"expected [*, {x.shape[-1]}]")
        rows_total, cols = t.shape
        row1 = rows_total if row1 is None else row1
        isz = DTYPES[t.dtype].itemsize
        step = max(1, self.block_bytes // (cols * 4))
        out = np.empty((x.shape[0], row1 - row0), dtype=np.float32)
        for r in range(row0, row1, step):  # (BLAS already uses every core for the multiply)
            e = min(row1, r + step)
            w = self._read(t, r * cols * isz, (e - r) * cols * isz, (e - r) * cols).reshape(e - r, cols)
            np.matmul(x, w.T, out=out[:, r - row0:e - row0])
        if bias is not None and self.has(bias):
            out += self.vector(bias)[row0:row1]
        return out
