"""Decoders of quantized weights into their exact values (float64), a band of rows at a time.

numpy only. Every decoder returns the exact dequantized value ``q·s`` of each element in
float64, which holds it exactly for every format here (significant bits: FP8 e4m3 4 × an F32 scale
24 = 28; E2M1 2 × a power of two; an INT8 code with its zero point 9 × a bf16/f16/f32 scale ≤ 24 =
33), so nothing is rounded until the kernel (:mod:`streamfold.quant.kernel`) rounds ``q·s·g`` once.

Codes go through lookup tables, never arithmetic on the bit fields:
- F8_E4M3FN: a 256-entry table (0x7F and 0xFF are NaN; no infinities in this format).
- E2M1 (MXFP4, FP4 experts): a 16-entry table, two codes per byte, the LOW nibble first.
- E8M0 (MXFP4 scales, ``ue8m0`` scales stored as bytes): ``2^(u-127)``, 255 is NaN.
- compressed-tensors ``pack-quantized``: ``b``-bit codes packed densely into little-endian int32
  words (code ``i`` at bit ``i·b``); the value is ``(u - zp)·s`` with the unpacked zero point, or
  ``(u - 2^(b-1))·s`` when the scheme is symmetric (no ``weight_zero_point`` tensor).

Block sizes are never inferred from shapes (transformers 5.23 mis-scaled 224-row tensors that way):
the FP8 block decoder takes ``weight_block_size`` from the config, and an edge tile that is shorter
than the block (e.g. rows 512..575 of a 576-row tensor) uses that tile's scale.
"""
from __future__ import annotations

import numpy as np

from ..core.errors import StreamfoldError

# code -> exact value tables (float64 holds every value exactly)
# (built from the bit layout, not ml_dtypes, whose import costs ~0.8 s: see core/dtypes.py; tests compare
# it with ml_dtypes' float8_e4m3fn and transformers' own dequantization)
def _e4m3fn_table() -> np.ndarray:
    u = np.arange(256)
    exp, man = (u >> 3) & 0xF, (u & 7) / 8.0
    mag = np.where(exp == 0, man * 2.0 ** -6, (1.0 + man) * np.exp2(exp - 7.0))  # bias 7, subnormals at exp 0
    mag[(u & 0x7F) == 0x7F] = np.nan  # E4M3FN: no infinities, S.1111.111 is NaN
    return np.where(u & 0x80, -mag, mag)


F8_E4M3FN_TABLE: np.ndarray = _e4m3fn_table()
E2M1_TABLE: np.ndarray = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                                   -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float64)
E8M0_TABLE: np.ndarray = np.array([np.ldexp(1.0, u - 127) for u in range(255)] + [np.nan], dtype=np.float64)
# Every byte as its two E2M1 values, low nibble first: one table lookup per byte.
E2M1_PAIR_TABLE: np.ndarray = np.stack([E2M1_TABLE[np.arange(256) & 0xF], E2M1_TABLE[np.arange(256) >> 4]], axis=1)

# Scale dtypes a decoder accepts, as their safetensors names.
SCALE_DTYPES = ("F32", "BF16", "F16", "F8_E8M0", "U8")


def decode_fp8(codes: np.ndarray) -> np.ndarray:
    """F8_E4M3FN codes (any integer/uint8 view of the raw bytes) -> their exact float64 values."""
    return F8_E4M3FN_TABLE[codes.view(np.uint8)]


def decode_e2m1(packed: np.ndarray) -> np.ndarray:
    """Packed E2M1 bytes ``[..., n]`` -> float64 values ``[..., 2n]``, the low nibble of each byte first."""
    u8 = packed.view(np.uint8)
    return E2M1_PAIR_TABLE[u8].reshape(*u8.shape[:-1], 2 * u8.shape[-1])


def decode_e8m0(codes: np.ndarray) -> np.ndarray:
    """E8M0 exponent bytes -> ``2^(u-127)`` as float64 (255 -> NaN)."""
    return E8M0_TABLE[codes.view(np.uint8)]


def scale_values(raw: np.ndarray, dtype: str, name: str = "scale") -> np.ndarray:
    """A scale tensor's raw values (any view of its bytes) as exact float64, by safetensors dtype:
    F32/BF16/F16 as stored, F8_E8M0 and U8 as E8M0 exponents ``2^(u-127)``."""
    if dtype == "F32":
        return raw.view(np.float32).astype(np.float64)
    if dtype == "BF16":
        return raw.view(np.uint16).astype(np.uint32).__lshift__(16).view(np.float32).astype(np.float64)
    if dtype == "F16":
        return raw.view(np.float16).astype(np.float64)
    if dtype in ("F8_E8M0", "U8"):
        return decode_e8m0(raw)
    raise StreamfoldError(f"{name}: scale dtype {dtype} is not one of {', '.join(SCALE_DTYPES)}")


def all_powers_of_two(values: np.ndarray) -> bool:
    """True when every value is ``±2^k`` (or zero): its float64 mantissa bits are all zero. A
    ``scale_fmt: ue8m0`` checkpoint claims this of its F32 scales; it is checked per tensor, since
    widening an unfolded weight is exact only then (``q·2^k`` fits bf16)."""
    bits = values.astype(np.float64).view(np.uint64)
    finite = (bits & np.uint64(0x7FF0000000000000)) != np.uint64(0x7FF0000000000000)
    return bool(finite.all() and not np.any(bits & np.uint64(0x000FFFFFFFFFFFFF)))


def block_grid(rows: int, cols: int, block: tuple[int, int]) -> tuple[int, int]:
    """The ``[ceil(rows/br), ceil(cols/bc)]`` scale grid of an FP8 block-quantized ``[rows, cols]``."""
    br, bc = block
    return -(-rows // br), -(-cols // bc)


def check_block_scale(name: str, shape: tuple[int, ...], scale_shape: tuple[int, ...],
                      block: tuple[int, int]) -> None:
    """Refuse (one line naming ``name``) a scale tensor whose shape is not the weight's block grid for
    the config's ``weight_block_size`` (leading expert dimensions must match too)."""
    if len(shape) < 2 or len(scale_shape) != len(shape):
        raise StreamfoldError(f"{name}: scale shape {list(scale_shape)} does not fit weight shape {list(shape)}")
    want = (*shape[:-2], *block_grid(shape[-2], shape[-1], block))
    if tuple(scale_shape) != want:
        raise StreamfoldError(f"{name}: scale shape {list(scale_shape)} is not the {block[0]}x{block[1]} block "
                              f"grid {list(want)} of weight shape {list(shape)} (weight_block_size from config)")


def fp8_block_band(codes: np.ndarray, scale: np.ndarray, block: tuple[int, int], row0: int) -> np.ndarray:
    """Exact values of rows ``row0 .. row0 + len(codes)`` of an FP8 block-quantized matrix.

    ``codes``: the band's F8_E4M3FN bytes ``[n, cols]``; ``scale``: the float64 scale rows covering
    the band, starting at tile row ``row0 // br`` (``[>= last_tile - first_tile + 1, ceil(cols/bc)]``);
    ``block``: ``(br, bc)`` from the config. Returns float64 ``[n, cols]``, each element ``q·s`` of
    its tile, exactly. An edge tile shorter than the block (rows or columns) uses its own scale."""
    n, cols = codes.shape
    br, bc = block
    out = decode_fp8(codes)
    t0 = row0 // br
    full = cols // bc
    r = 0
    while r < n:  # one tile row at a time: a slice and a broadcast multiply, no expanded scale matrix
        tile = (row0 + r) // br
        e = min(n, (tile + 1) * br - row0)
        s = scale[tile - t0]
        band = out[r:e]
        if full:
            band[:, :full * bc].reshape(e - r, full, bc).__imul__(s[:full, None])
        if cols > full * bc:
            band[:, full * bc:] *= s[full]
        r = e
    return out


def fp8_scaled_band(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Exact ``q·s`` of an FP8 band with a per-tensor (``scale`` ``[1]`` or ``[]``) or per-channel
    (``[n, 1]``, the band's rows) scale: compressed-tensors ``float-quantized`` tensor/channel."""
    out = decode_fp8(codes)
    out *= scale.reshape(-1, 1) if scale.size > 1 else scale.reshape(())
    return out


def mxfp4_band(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Exact values of MXFP4 rows: ``blocks`` U8 ``[n, G, 16]`` (32 E2M1 codes per group, low nibble
    first), ``scales`` U8 ``[n, G]`` E8M0 -> float64 ``[n, G*32]`` (gpt-oss stores ``[E, rows, G, 16]``:
    pass one expert's rows; transformers' dequantized tensor is this one transposed, ``[in, out]``)."""
    n, groups, width = blocks.shape
    out = decode_e2m1(blocks).reshape(n, groups, 2 * width)
    out *= decode_e8m0(scales)[:, :, None]
    return out.reshape(n, groups * 2 * width)


def unpack_int32(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Unsigned ``bits``-bit codes from compressed-tensors' dense int32 packing, along the last axis:
    ``packed`` I32 ``[n, words]`` -> uint8 ``[n, count]``, code ``i`` at bit ``i·bits`` of the
    little-endian word stream (for 4 and 8 bits: nibbles low first, bytes in order)."""
    if not 1 <= bits <= 8:
        raise StreamfoldError(f"pack-quantized: {bits}-bit codes are not supported (1..8)")
    n, words = packed.shape
    if words * 32 < count * bits:
        raise StreamfoldError(f"pack-quantized: {words} int32 words cannot hold {count} {bits}-bit codes")
    u8 = np.ascontiguousarray(packed).astype("<i4", copy=False).view(np.uint8).reshape(n, words * 4)
    if bits == 8:
        return u8[:, :count].copy()
    if bits == 4:
        pairs = np.stack([u8 & 0xF, u8 >> 4], axis=-1).reshape(n, words * 8)
        return pairs[:, :count].copy()
    # general widths: the bit stream as little-endian bytes, one code from the two bytes it touches
    start = np.arange(count, dtype=np.int64) * bits
    byte, shift = start // 8, (start % 8).astype(np.uint16)
    padded = np.concatenate([u8, np.zeros((n, 1), dtype=np.uint8)], axis=1).astype(np.uint16)
    two = padded[:, byte] | (padded[:, byte + 1] << 8)
    return ((two >> shift) & ((1 << bits) - 1)).astype(np.uint8)


def int_pack_band(packed: np.ndarray, bits: int, cols: int, scale: np.ndarray, group: int | None,
                  zero_point: np.ndarray | None = None) -> np.ndarray:
    """Exact values of compressed-tensors ``pack-quantized`` rows: ``packed`` I32 ``[n, words]``,
    ``scale`` float64 ``[n, cols/group]`` (``group`` None: per channel ``[n, 1]``, or per tensor
    ``[1]``), ``zero_point`` the band's UNPACKED unsigned zero points ``[n, groups]`` (see
    :func:`unpack_zero_points`) or None for a symmetric scheme (offset ``2^(bits-1)``). Returns
    float64 ``[n, cols]`` = ``(u - zp)·s``."""
    n = packed.shape[0]
    q = unpack_int32(packed, bits, cols).astype(np.float64)
    if zero_point is None:
        q -= float(1 << (bits - 1))
    if group is None:
        if zero_point is not None:
            q -= zero_point.reshape(n, -1)[:, :1]
        q *= scale.reshape(-1, 1) if scale.size > 1 else scale.reshape(())
        return q
    if cols % group:
        raise StreamfoldError(f"pack-quantized: {cols} columns are not a multiple of group size {group}")
    g = q.reshape(n, cols // group, group)
    if zero_point is not None:
        g -= zero_point.reshape(n, cols // group, 1)
    g *= scale.reshape(n, cols // group, 1)
    return q


def unpack_zero_points(packed_zp: np.ndarray, bits: int, rows: int) -> np.ndarray:
    """compressed-tensors packs ``weight_zero_point`` along the OUTPUT axis (``packed_dim=0``):
    I32 ``[ceil(rows·bits/32), groups]`` -> unsigned codes ``[rows, groups]`` (the value's offset
    ``2^(bits-1)`` cancels against the weight code's, so ``u - zp`` uses both unsigned)."""
    return unpack_int32(np.ascontiguousarray(packed_zp.T), bits, rows).T.copy()
