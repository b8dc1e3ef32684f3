"""Integer codes packed into int32 words: the logical shape of a packed weight, checked against the config.

compressed-tensors ``pack-quantized`` (layout ``ct-pack``): ``weight_packed`` I32 ``[out, ceil(in·b/32)]``
holds ``b``-bit codes densely (code ``i`` at bit ``i·b`` of the row's little-endian word stream; a code
may straddle two words for b = 3, 5, 6, 7); ``weight_shape`` I64 ``[2]`` is the unpacked ``[out, in]``.
The logical width read from headers alone is ``words·32/b`` -- exact unless the packer padded the row
(``in·b`` not a multiple of 32), which :func:`check_logical_shape` refuses from the stored ``weight_shape``.
The value decoders are :func:`streamfold.quant.decode.int_pack_band` and
:func:`streamfold.quant.decode.unpack_zero_points`.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..core.errors import StreamfoldError
from .formats import QuantModule

PACKED = ("ct-pack", "gptq", "awq")  # layouts whose widened output is the logical ``X.weight`` [out, in]


def packed_shape(qm: QuantModule, codes: tuple[int, ...]) -> tuple[int, int]:
    """The unpacked ``[out, in]`` of a packed codes tensor, from its header shape and the config's bits
    (GPTQ ``qweight`` is ``[in/pf, out]``, AWQ ``[in, out/8]``, compressed-tensors ``[out, words]``)."""
    if len(codes) != 2 or not isinstance(qm.bits, int) or not 1 <= qm.bits <= 8:
        return tuple(codes)  # refused later, naming the tensor (check_logical_shape / check_shape)
    rows, words = codes
    if qm.layout == "gptq":
        return words, rows * (32 // qm.bits)
    if qm.layout == "awq":
        return words * (32 // qm.bits), rows
    return rows, words * 32 // qm.bits


def check_logical_shape(qm: QuantModule, codes: tuple[int, ...], stored: Sequence[int]) -> tuple[int, int]:
    """The ``[out, in]`` of a pack-quantized module, refusing (one line naming the tensor) a
    ``weight_shape`` that is not the codes' unpadded shape (a padded row; a 3-D or mismatched shape)."""
    if not isinstance(qm.bits, int) or not 1 <= qm.bits <= 8:
        raise StreamfoldError(f"--dequantize: {qm.weight}: quantization_config num_bits {qm.bits!r} is not 1..8")
    want = packed_shape(qm, tuple(codes))
    got = tuple(int(x) for x in stored)
    if len(codes) != 2 or got != want:
        raise StreamfoldError(f"--dequantize: {qm.module}.weight_shape is {list(got)} but {qm.weight} "
                              f"{list(codes)} holds {list(want)} {qm.bits}-bit codes; padded or non-2-D packed "
                              "weights are not supported")
    return want


# ---------------------------------------------------------------- GPTQ and AWQ (GEMM)
#
# GPTQ (AutoGPTQ / GPTQModel): ``qweight`` I32 ``[in/pf, out]`` packs pf = 32/b codes of consecutive
# INPUTS per word (input ``i`` in word row ``i // pf`` at bit ``(i % pf)·b``); ``qzeros`` I32
# ``[groups, out/pf]`` packs the zero points of consecutive OUTPUTS the same way; ``scales`` F16
# ``[groups, out]``; ``g_idx`` I32 ``[in]`` the group of each input (``i // group`` unless
# act-order). ``W[j, i] = (q[i, j] - z[g_idx[i], j])·s[g_idx[i], j]``, where ``z`` is the stored zero
# plus one in the original format (``checkpoint_format`` "gptq", v1) and the stored zero in "gptq_v2".
# (A v1 stored zero of 2^b - 1 -- a zero of 0 that AutoGPTQ's packer writes as -1, OR-ing ones over
# its whole word -- is refused: loaders disagree on its value.)
# AWQ GEMM (AutoAWQ): ``qweight`` I32 ``[in, out/8]`` packs 8 OUTPUTS per word in the order
# [0, 2, 4, 6, 1, 3, 5, 7] (nibble k holds output ``8w + ORDER[k]``; output ``8w + m`` sits in nibble
# ``[0, 4, 1, 5, 2, 6, 3, 7][m]``); ``qzeros`` I32 ``[groups, out/8]`` the same; ``scales`` F16
# ``[groups, out]``; groups of ``group_size`` consecutive inputs; ``W[j, i] = (q[i, j] - z[i // G, j])·s``.
# Both are decoded to the exact float64 value of each element (at most b + 1 + 24 significant bits).

GPTQ_BITS = (2, 4, 8)  # 3-bit GPTQ packs across words differently: refused
AWQ_NIBBLE = (0, 4, 1, 5, 2, 6, 3, 7)  # output 8w + m of a word sits in nibble AWQ_NIBBLE[m]


def unpack_rows(words: np.ndarray, bits: int) -> np.ndarray:
    """GPTQ's packing down axis 0: int32 ``[r, c]`` -> int16 codes ``[r·32/b, c]`` (row ``k`` of each
    word's group at bit ``k·b``)."""
    pf = 32 // bits
    u = words.view(np.uint32) if words.dtype.itemsize == 4 else words.astype(np.uint32)
    out = np.empty((u.shape[0] * pf, u.shape[1]), dtype=np.int16)
    for k in range(pf):
        out[k::pf] = (u >> np.uint32(k * bits)) & np.uint32((1 << bits) - 1)
    return out


def unpack_cols(words: np.ndarray, bits: int, order: tuple[int, ...] | None = None) -> np.ndarray:
    """Packing along axis 1: int32 ``[r, c]`` -> int16 codes ``[r, c·32/b]``; column ``m`` of each word's
    group at bit ``k·b`` with ``k = order[m]`` (GPTQ zeros: ``k = m``; AWQ: :data:`AWQ_NIBBLE`)."""
    pf = 32 // bits
    u = words.view(np.uint32) if words.dtype.itemsize == 4 else words.astype(np.uint32)
    out = np.empty((u.shape[0], u.shape[1] * pf), dtype=np.int16)
    for m in range(pf):
        k = order[m] if order is not None else m
        out[:, m::pf] = (u >> np.uint32(k * bits)) & np.uint32((1 << bits) - 1)
    return out


def gptq_band(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, g_idx: np.ndarray, bits: int,
              v1: bool, col0: int) -> np.ndarray:
    """Exact float64 ``[n, in]`` rows of a GPTQ weight for outputs ``j0 .. j0 + n``: ``qweight`` the
    band's columns ``[in/pf, n]``, ``qzeros`` the zero words covering them ``[groups, w]`` (output ``j0``
    is column ``col0`` of their unpacking), ``scales`` ``[groups, n]`` float64, ``g_idx`` ``[in]``."""
    n = qweight.shape[1]
    q = unpack_rows(qweight, bits)  # [in, n]
    z = unpack_cols(qzeros, bits)[:, col0:col0 + n].astype(np.float64)
    if v1:
        if np.any(z == (1 << bits) - 1):
            raise StreamfoldError(f"GPTQ (v1): a stored zero point {(1 << bits) - 1} (a zero of 0 that AutoGPTQ's "
                                  "packer wraps to -1, corrupting its word); loaders disagree on its value")
        z += 1.0
    gi = np.asarray(g_idx, dtype=np.int64)
    vals = q.astype(np.float64)
    vals -= z[gi]
    vals *= scales[gi]
    return np.ascontiguousarray(vals.T)


def awq_band(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray, group: int) -> np.ndarray:
    """Exact float64 ``[n, in]`` rows of an AWQ GEMM weight for outputs ``8w0 .. 8w0 + n``: ``qweight``
    the band's words ``[in, n/8]``, ``qzeros`` ``[groups, n/8]``, ``scales`` ``[groups, n]`` float64."""
    q = unpack_cols(qweight, 4, AWQ_NIBBLE).astype(np.float64)  # [in, n]
    z = unpack_cols(qzeros, 4, AWQ_NIBBLE).astype(np.float64)
    gi = np.arange(q.shape[0]) // group
    q -= z[gi]
    q *= scales[gi]
    return np.ascontiguousarray(q.T)


def unsupported(qm: QuantModule) -> str | None:
    """Why an integer-packed module cannot be dequantized (None when it can): bit widths and packings
    other than the ones decoded here."""
    if qm.layout == "gptq" and (qm.bits not in GPTQ_BITS or qm.packing not in ("gptq", "gptq_v2")):
        return f"{qm.bits}-bit GPTQ ({qm.packing}); streamfold decodes 2/4/8-bit gptq and gptq_v2 packing"
    if qm.layout == "awq" and (qm.bits != 4 or qm.packing != "gemm"):
        return f"{qm.bits}-bit AWQ version {qm.packing!r}; streamfold decodes 4-bit AWQ GEMM"
    return None
