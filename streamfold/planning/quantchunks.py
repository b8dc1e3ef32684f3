"""``dequant`` chunk records of integer-packed weights (compressed-tensors ``pack-quantized``, GPTQ, AWQ)
and of fused 3-D FP8 experts (:func:`fp8_expert_chunks`).

:func:`streamfold.planning.tasks._shard_task` builds a widened module's records with ``BUILDERS[layout]``
when its layout is here; each builder returns the keyword arguments of ``Chunk(Op.DEQUANT, **kw)``
(this module does not import :mod:`streamfold.planning.tasks`, which imports it).

A ``ct-pack`` record (``fmt`` ``"ct-pack"``): output rows ``r0..r1`` (a multiple of 32 rows, so the
zero points, packed 32/b rows per int32 word along the OUTPUT axis, start on a word boundary) of the
logical ``[out, in]`` weight, written as ``X.weight``. ``src_off``/``src_bytes``: the band's int32 code
words; ``shape``: ``(words per row, bits)``; ``scale``: the band's scale rows ``(file, offset, dtype,
[n, groups])`` (a per-tensor scale: its one value, ``[1, 1]``); ``zero``: the band's packed zero-point
word rows ``(file, offset, "I32", [w, groups])`` or empty for a symmetric scheme; ``block``: the tile
one scale covers (``(1, group)``, ``(1, in)`` per channel, ``(out, in)`` per tensor). Scales and zero
points may sit in other shards than the codes.
"""
from __future__ import annotations

from typing import Callable

from ..core.dtypes import itemsize
from ..core.errors import StreamfoldError
from ..quant.decode import check_block_scale
from ..quant.intpack import check_logical_shape, packed_shape

SCALE_DTYPES = ("F32", "BF16", "F16")


def _range(ckpt, name: str, off_elems: int, shape: tuple[int, ...]) -> tuple:
    t = ckpt.tensors[name]
    return (ckpt.shard_of[name], t.begin + off_elems * itemsize(t.dtype), t.dtype, tuple(shape))


def _grid(qm, name: str, rows: int, cols: int) -> tuple[int, tuple[int, int], list[tuple]]:
    """(scale groups per row, the tile one scale covers, the scale shapes accepted) of a ``[rows, cols]``
    weight under ``qm``'s strategy: group, channel or tensor."""
    if qm.strategy == "group":
        group = qm.block[1]
        if cols % group:
            raise StreamfoldError(f"--dequantize: {name}: {cols} inputs are not a multiple of group_size {group}")
        return cols // group, (1, group), [(rows, cols // group)]
    if qm.strategy == "channel":
        return 1, (1, cols), [(rows, 1)]
    return 1, (rows, cols), [(1,), (), (1, 1)]  # tensor


def ct_pack_chunks(ckpt, t, a, dst_begin: int, shard: str, chunk_bytes: int) -> list[dict]:
    """Row bands of a compressed-tensors pack-quantized weight (see the module docstring)."""
    qm = a.quant
    shape_name = qm.module + ".weight_shape"
    rows, cols = check_logical_shape(qm, tuple(t.shape), ckpt.read(shape_name).reshape(-1))
    words, bits = t.shape[1], qm.bits
    st = ckpt.tensors[qm.module + ".weight_scale"]
    if st.dtype not in SCALE_DTYPES:
        raise StreamfoldError(f"--dequantize: {st.name} is {st.dtype}; pack-quantized scales must be one of "
                              f"{', '.join(SCALE_DTYPES)}")
    groups, block, want = _grid(qm, qm.weight, rows, cols)
    if tuple(st.shape) not in want:
        raise StreamfoldError(f"--dequantize: {st.name} has shape {list(st.shape)}, not {list(want[0])} "
                              f"({qm.strategy} scales of {qm.weight}, [{rows}, {cols}])")
    zp = next((x for x in qm.aux if x.endswith(".weight_zero_point")), None)
    if zp is not None:
        zt = ckpt.tensors[zp]
        zwant = (-(-rows * bits // 32), groups)
        if qm.strategy == "tensor" or zt.dtype != "I32" or tuple(zt.shape) != zwant:
            raise StreamfoldError(f"--dequantize: {zp} is {zt.dtype} {list(zt.shape)}, not the I32 {list(zwant)} "
                                  f"zero points packed along the output axis ({qm.strategy} strategy)")
    osz = itemsize(a.out_dtype)
    step = max(32, chunk_bytes // max(1, cols * 8) // 32 * 32)  # the kernel works in float64
    out = []
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        n = r1 - r0
        scale = (_range(ckpt, st.name, 0, (1, 1)) if qm.strategy == "tensor"
                 else _range(ckpt, st.name, r0 * groups, (n, groups)))
        zero = ()
        if zp is not None:
            w0, w1 = r0 * bits // 32, -(-r1 * bits // 32)
            zero = _range(ckpt, zp, w0 * groups, (w1 - w0, groups))
        out.append(dict(tensor=qm.logical, dst=dst_begin + r0 * cols * osz, size=n * cols * osz, src=shard,
                        src_off=t.begin + r0 * words * 4, src_bytes=n * words * 4, rows=(r0, r1), cols=cols,
                        width=cols, norm=a.norm.weight if a.norm is not None else "", src_dtype=t.dtype,
                        out_dtype=a.out_dtype, scale=scale, zero=zero, block=block, shape=(words, bits),
                        fmt="ct-pack"))
    return out


BUILDERS: dict[str, Callable[..., list[dict]]] = {"ct-pack": ct_pack_chunks}


def _gptq_awq_chunks(ckpt, t, a, dst_begin: int, shard: str, chunk_bytes: int) -> list[dict]:
    """Bands of 32 output rows (a multiple of every packing factor) of a GPTQ or AWQ GEMM weight. The
    codes of one output row are a column of ``qweight``: each record names the whole ``qweight``
    (``src_off``; ``shape`` = its shape + bits), the whole ``scales``, ``qzeros`` and (GPTQ) ``g_idx``,
    and the executor reads only the band's columns; ``src_bytes`` is the band's share of the codes."""
    qm = a.quant
    bits = qm.bits
    pf = 32 // bits
    rows, cols = packed_shape(qm, tuple(t.shape))  # [out, in]
    group = qm.block[1] if qm.strategy == "group" else cols
    groups = -(-cols // group)
    st, zt = ckpt.tensors[qm.module + ".scales"], ckpt.tensors[qm.module + ".qzeros"]
    zwant = (groups, rows // pf)
    if st.dtype not in SCALE_DTYPES or tuple(st.shape) != (groups, rows):
        raise StreamfoldError(f"--dequantize: {st.name} is {st.dtype} {list(st.shape)}, not float [{groups}, {rows}] "
                              f"({qm.method} group_size {group if qm.strategy == 'group' else -1} of {qm.weight} "
                              f"{list(t.shape)})")
    if zt.dtype != "I32" or tuple(zt.shape) != zwant:
        raise StreamfoldError(f"--dequantize: {zt.name} is {zt.dtype} {list(zt.shape)}, not I32 {list(zwant)}")
    gidx = ()
    if qm.layout == "gptq":
        name = qm.module + ".g_idx"
        if name in ckpt.tensors:
            gi = ckpt.read(name).reshape(-1)
            if ckpt.tensors[name].dtype != "I32" or gi.shape != (cols,) or gi.min(initial=0) < 0 \
                    or gi.max(initial=0) >= groups:
                raise StreamfoldError(f"--dequantize: {name} is not {cols} I32 group indices below {groups}")
            gidx = _range(ckpt, name, 0, (cols,))
        elif cols % group:
            raise StreamfoldError(f"--dequantize: {qm.weight}: {cols} inputs are not a multiple of group_size {group}")
    fmt = "awq" if qm.layout == "awq" else ("gptq" if qm.packing == "gptq" else "gptq_v2")
    osz = itemsize(a.out_dtype)
    step = max(32, chunk_bytes // max(1, cols * 8) // 32 * 32)  # the kernel works in float64
    out = []
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        n = r1 - r0
        out.append(dict(tensor=qm.logical, dst=dst_begin + r0 * cols * osz, size=n * cols * osz, src=shard,
                        src_off=t.begin, src_bytes=n * cols * bits // 8, rows=(r0, r1), cols=cols, width=cols,
                        norm=a.norm.weight if a.norm is not None else "", src_dtype=t.dtype,
                        out_dtype=a.out_dtype, scale=_range(ckpt, st.name, 0, st.shape),
                        zero=_range(ckpt, zt.name, 0, zt.shape), gidx=gidx, block=(1, group),
                        shape=(*t.shape, bits), fmt=fmt))
    return out


BUILDERS["gptq"] = BUILDERS["awq"] = _gptq_awq_chunks


def fp8_expert_chunks(ckpt, t, a, dst_begin: int, shard: str, chunk_bytes: int) -> list[dict]:
    """Fused FP8 experts (``X.experts.gate_up_proj`` F8 ``[E, out, in]``, ``..._scale_inv`` ``[E,
    ceil(out/br), ceil(in/bc)]``): each expert is an FP8 block-quantized ``[out, in]`` matrix, cut into the
    same records as a 2-D weight (``fmt`` ""; ``rows`` local to the expert, ragged edge tiles per expert),
    with ``src_off``, ``dst`` and the scale range offset to that expert."""
    qm = a.quant
    st = ckpt.tensors[qm.scales[0]]
    if len(t.shape) != 3 or not qm.block:
        raise StreamfoldError(f"--dequantize: {t.name} has shape {list(t.shape)}; fused FP8 experts are "
                              "[experts, out, in] with weight_block_size in the config")
    experts, rows, cols = t.shape
    check_block_scale(st.name, tuple(t.shape), tuple(st.shape), tuple(qm.block))
    grid_rows, grid_cols = st.shape[1], st.shape[2]
    isz, osz, ssz = itemsize(t.dtype), itemsize(a.out_dtype), itemsize(st.dtype)
    br = qm.block[0]
    step = max(br, chunk_bytes // max(1, cols * 8) // br * br)  # the kernel works in float64
    out = []
    for e in range(experts):
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)
            n = r1 - r0
            t0, t1 = r0 // br, (r1 - 1) // br + 1
            out.append(dict(tensor=t.name, dst=dst_begin + (e * rows + r0) * cols * osz, size=n * cols * osz,
                            src=shard, src_off=t.begin + (e * rows + r0) * cols * isz, src_bytes=n * cols * isz,
                            rows=(r0, r1), cols=cols, width=cols, norm=a.norm.weight if a.norm is not None else "",
                            src_dtype=t.dtype, out_dtype=a.out_dtype,
                            scale=(ckpt.shard_of[st.name], st.begin + ((e * grid_rows + t0) * grid_cols) * ssz,
                                   st.dtype, (t1 - t0, grid_cols)), block=tuple(qm.block)))
    return out


BUILDERS["fp8-fused"] = fp8_expert_chunks


ZP_DTYPES = ("I8", "I16", "I32")


def ct_int_chunks(ckpt, t, a, dst_begin: int, shard: str, chunk_bytes: int) -> list[dict]:
    """Row bands of a compressed-tensors ``int-quantized`` weight (``weight`` I8 ``[out, in]``, signed
    codes; ``weight_scale`` per channel ``[out, 1]``, group ``[out, in/G]`` or tensor; an asymmetric
    scheme's ``weight_zero_point`` unpacked, shaped like the scale). ``fmt`` ``"ct-int"``: ``scale`` and
    ``zero`` are the band's rows of each (a per-tensor scale / zero point: its one value)."""
    qm = a.quant
    if len(t.shape) != 2:
        raise StreamfoldError(f"--dequantize: {t.name} has shape {list(t.shape)}; int-quantized weights are 2-D")
    rows, cols = t.shape
    st = ckpt.tensors[qm.module + ".weight_scale"]
    groups, block, want = _grid(qm, t.name, rows, cols)
    zp = next((x for x in qm.aux if x.endswith(".weight_zero_point")), None)
    for x in (st, ckpt.tensors[zp] if zp else None):
        if x is not None and tuple(x.shape) not in want:
            raise StreamfoldError(f"--dequantize: {x.name} has shape {list(x.shape)}, not {list(want[0])} "
                                  f"({qm.strategy} quantization of {t.name} {list(t.shape)})")
    if zp and ckpt.tensors[zp].dtype not in ZP_DTYPES:
        raise StreamfoldError(f"--dequantize: {zp} is {ckpt.tensors[zp].dtype}, not an integer zero point")
    osz = itemsize(a.out_dtype)
    step = max(1, chunk_bytes // max(1, cols * 8))
    out = []
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        n = r1 - r0
        per = ((lambda name: _range(ckpt, name, 0, (1, 1))) if qm.strategy == "tensor"
               else (lambda name: _range(ckpt, name, r0 * groups, (n, groups))))
        out.append(dict(tensor=t.name, dst=dst_begin + r0 * cols * osz, size=n * cols * osz, src=shard,
                        src_off=t.begin + r0 * cols, src_bytes=n * cols, rows=(r0, r1), cols=cols, width=cols,
                        norm=a.norm.weight if a.norm is not None else "", src_dtype=t.dtype,
                        out_dtype=a.out_dtype, scale=per(st.name), zero=per(zp) if zp else (), block=block,
                        fmt="ct-int"))
    return out


BUILDERS["ct-int"] = ct_int_chunks
