"""The independent oracle for integer weights (compressed-tensors pack- and int-quantized, GPTQ, AWQ GEMM).

It shares nothing with :mod:`streamfold.quant.decode` / :mod:`streamfold.quant.intpack` (which unpack
through byte views, nibble splits and strided shifts): each code is cut out of the row's word stream
by its bit position, ``code i`` = bits ``i·b .. i·b + b - 1`` of the 64-bit pair (word ``⌊i·b/32⌋``,
the next word) as unsigned integers; zero points the same way down the output axis. GPTQ / AWQ codes
likewise from their word and bit position (AWQ's from the packer's order [0, 2, 4, 6, 1, 3, 5, 7],
inverted here); int-quantized I8 codes from their bytes as two's complement. The integer ``u - zp``
(or ``u - 2^(b-1)``) times the scale's and ``g``'s integer mantissas is the exact product, rounded
once by :func:`streamfold.check.quant_oracle.round_exact` (integer shifts, no float arithmetic).
"""
from __future__ import annotations

import numpy as np

from .quant_oracle import Split, compare_bits, product, round_exact, split_float, split_int

INT_FMTS = ("ct-pack", "ct-int", "gptq", "gptq_v2", "awq")  # the record formats checked here


def codes_at(words: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Unsigned ``bits``-bit codes ``0..count`` of each row of int32 ``words`` ``[n, w]`` (int64 ``[n, count]``)."""
    u = words.astype(np.int64) & 0xFFFFFFFF
    u = np.concatenate([u, np.zeros((u.shape[0], 1), np.int64)], axis=1).astype(np.uint64)
    pos = np.arange(count, dtype=np.int64) * bits
    w, shift = pos // 32, (pos % 32).astype(np.uint64)
    pair = u[:, w] | (u[:, w + 1] << np.uint64(32))
    return ((pair >> shift) & np.uint64((1 << bits) - 1)).astype(np.int64)


def ct_pack_expected(words: np.ndarray, bits: int, cols: int, scale_raw: np.ndarray, scale_dtype: str,
                     scale_shape: tuple[int, ...], zero_words: np.ndarray | None, block: tuple[int, int],
                     g: np.ndarray | None, out_dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Expected bits (and exact mask) of a band of ``n`` rows of a pack-quantized weight starting at a
    multiple of 32 rows: ``words`` int32 ``[n, w]``; ``scale_raw`` the band's scales ``scale_shape``
    (``[n, groups]``, or ``[1, 1]`` per tensor); ``zero_words`` the band's packed zero-point words
    ``[z, groups]`` (packed down the rows) or None; ``block`` the tile one scale covers; ``g`` float32 ``[cols]``."""
    n = words.shape[0]
    u = codes_at(words, bits, cols)
    if zero_words is None:
        q = u - (1 << (bits - 1))
    else:
        zp = codes_at(np.ascontiguousarray(zero_words.T), bits, n).T  # [n, groups]
        q = u - zp[:, np.arange(cols) // block[1]] if zp.shape[1] > 1 else u - zp[:, :1]
    s = split_float(scale_raw, scale_dtype).reshape(*scale_shape)
    if s.sign.size == 1:
        s = s.reshape(1, 1)
    elif s.sign.shape[1] > 1:
        s = s[:, np.arange(cols) // block[1]]
    factors: list[Split] = [split_int(q), s]
    if g is not None:
        factors.append(split_float(np.asarray(g, dtype=np.float32), "F32").reshape(1, cols))
    return round_exact(product(*factors), out_dtype)


def check_ct_pack_band(words_raw: np.ndarray, c, scale_raw: np.ndarray, zero_raw: np.ndarray | None,
                       g: np.ndarray | None, got_raw: np.ndarray, base_index: int = 0):
    """A :class:`streamfold.check.oracle.FoldTally` of one ``ct-pack`` record's output bytes."""
    r0, r1 = c.rows
    wpr, bits = c.shape
    zw = None if zero_raw is None else zero_raw.view("<i4").reshape(c.zero[3])
    want, exact = ct_pack_expected(words_raw.view("<i4").reshape(r1 - r0, wpr), bits, c.cols, scale_raw,
                                   c.scale[2], tuple(c.scale[3]), zw, tuple(c.block), g, c.out_dtype)
    return _tally(want, exact, c.out_dtype, got_raw, base_index)


def _tally(want: np.ndarray, exact: np.ndarray, out_dtype: str, got_raw: np.ndarray, base_index: int):
    """compare_bits' tally, with ``exact``: the elements that needed no rounding (verify compares the
    total with the card's counts)."""
    t = compare_bits(want, out_dtype, got_raw, base_index)
    t.exact = int(np.count_nonzero(exact))
    return t


AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ's packer: nibble k of a word holds output 8w + ORDER[k]


def _cols(read, rng: tuple, c0: int, c1: int) -> np.ndarray:
    """Columns ``c0..c1`` of a 2-D ``(file, offset, dtype, [rows, cols])`` range, one read per row
    (``read(file, offset, nbytes)`` -> uint8)."""
    f, off, dtype, (rows, cols) = rng
    isz = {"I32": 4, "F32": 4, "F16": 2, "BF16": 2}[dtype]
    out = np.empty((rows, (c1 - c0) * isz), np.uint8)
    for r in range(rows):
        out[r] = read(f, off + (r * cols + c0) * isz, (c1 - c0) * isz)
    return out


def gptq_awq_expected(c, read, g: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Expected bits (and exact mask) of one GPTQ / AWQ record's output rows ``r0..r1`` (``[n, in]``),
    every code and zero point cut out of its word by its bit position."""
    r0, r1 = c.rows
    qrows, qcols, bits = c.shape
    mask = (1 << bits) - 1
    cols = c.cols
    i = np.arange(cols)[:, None]
    j = np.arange(r0, r1)[None, :]
    if c.fmt == "awq":
        qw = _cols(read, (c.src, c.src_off, "I32", (qrows, qcols)), r0 // 8, r1 // 8).view("<u4").astype(np.int64)
        nib = np.argsort(AWQ_PACK_ORDER)[(j % 8)]  # the nibble holding output j
        q = (qw[np.arange(cols)[:, None], j // 8 - r0 // 8] >> (4 * nib)) & mask  # [in, n]
        zw = _cols(read, c.zero, r0 // 8, r1 // 8).view("<u4").astype(np.int64)
        groups = zw.shape[0]
        z = (zw[np.arange(groups)[:, None], j // 8 - r0 // 8] >> (4 * nib)) & mask  # [groups, n]
        gi = np.arange(cols) // c.block[1]
    else:
        pf = 32 // bits
        qw = _cols(read, (c.src, c.src_off, "I32", (qrows, qcols)), r0, r1).view("<u4").astype(np.int64)
        q = (qw[i // pf, j - r0] >> ((i % pf) * bits)) & mask
        w0 = r0 // pf
        zw = _cols(read, c.zero, w0, -(-r1 // pf)).view("<u4").astype(np.int64)
        groups = zw.shape[0]
        z = (zw[np.arange(groups)[:, None], j // pf - w0] >> ((j % pf) * bits)) & mask
        if c.fmt == "gptq":  # v1 stores the zero point minus one
            z = z + 1
        gi = (read(*c.gidx[:2], cols * 4).view("<i4").astype(np.int64) if c.gidx
              else np.arange(cols) // c.block[1])
    sraw = _cols(read, c.scale, r0, r1)
    s = split_float(sraw.reshape(-1), c.scale[2]).reshape(groups, r1 - r0)
    qv = (q - z[gi]).T  # [n, in]
    sv = s[gi]
    sv = Split(*(x.T for x in (sv.sign, sv.mant, sv.exp, sv.nan)))
    factors: list[Split] = [split_int(qv), sv]
    if g is not None:
        factors.append(split_float(np.asarray(g, dtype=np.float32), "F32").reshape(1, cols))
    return round_exact(product(*factors), c.out_dtype)


def check_int_band(c, read, g: np.ndarray | None, got_raw: np.ndarray, base_index: int = 0):
    """A :class:`streamfold.check.oracle.FoldTally` of one integer-packed record's output bytes
    (``read(file, offset, nbytes)`` -> uint8 source bytes)."""
    if c.fmt == "ct-pack":
        words = read(c.src, c.src_off, c.src_bytes)
        return check_ct_pack_band(words, c, read(c.scale[0], c.scale[1], _nbytes(c.scale)),
                                  read(c.zero[0], c.zero[1], _nbytes(c.zero)) if c.zero else None, g, got_raw,
                                  base_index)
    want, exact = ct_int_expected(c, read, g) if c.fmt == "ct-int" else gptq_awq_expected(c, read, g)
    return _tally(want, exact, c.out_dtype, got_raw, base_index)


def ct_int_expected(c, read, g: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Expected bits of one ``ct-int`` record: signed int8 codes (two's complement from the raw bytes)
    minus the zero point of their group, times its scale and ``g``, as integers, rounded once."""
    r0, r1 = c.rows
    n = r1 - r0
    u = read(c.src, c.src_off, n * c.cols).astype(np.int64).reshape(n, c.cols)
    q = np.where(u >= 128, u - 256, u)
    col_group = np.arange(c.cols) // c.block[1]
    rows_of = (lambda a: np.broadcast_to(a.reshape(1, 1), (n, 1))) if c.block[0] > 1 else (lambda a: a)
    if c.zero:
        isz = {"I8": 1, "I16": 2, "I32": 4}[c.zero[2]]
        zraw = read(c.zero[0], c.zero[1], int(np.prod(c.zero[3])) * isz)
        zp = rows_of(zraw.view({1: "<i1", 2: "<i2", 4: "<i4"}[isz]).astype(np.int64).reshape(c.zero[3]))
        q = q - zp[:, col_group]
    s = split_float(read(c.scale[0], c.scale[1], _nbytes(c.scale)), c.scale[2]).reshape(*c.scale[3])
    if c.block[0] > 1:  # per tensor
        s = Split(*(np.broadcast_to(x.reshape(1, 1), (n, 1)) for x in (s.sign, s.mant, s.exp, s.nan)))
    factors: list[Split] = [split_int(q), s[:, col_group]]
    if g is not None:
        factors.append(split_float(np.asarray(g, dtype=np.float32), "F32").reshape(1, c.cols))
    return round_exact(product(*factors), c.out_dtype)


def _nbytes(rng: tuple) -> int:
    return int(np.prod(rng[3], dtype=np.int64)) * {"I32": 4, "F32": 4, "F16": 2, "BF16": 2, "I64": 8}[rng[2]]
