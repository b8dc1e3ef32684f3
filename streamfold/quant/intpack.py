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

from ..core.errors import StreamfoldError
from .formats import QuantModule

PACKED = ("ct-pack",)  # layouts whose widened output is the logical ``X.weight`` [out, in], not the codes tensor


def packed_shape(qm: QuantModule, codes: tuple[int, ...]) -> tuple[int, int]:
    """The unpacked ``[out, in]`` of a packed codes tensor, from its header shape and the config's bits."""
    if len(codes) != 2 or not isinstance(qm.bits, int) or not 1 <= qm.bits <= 8:
        return tuple(codes)  # refused later, naming the tensor (check_logical_shape / check_shape)
    rows, words = codes
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
