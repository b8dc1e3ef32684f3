"""The plan as data: one independent, JSON-serialisable Task per output shard.

A Task names everything needed to write one output shard and nothing else: the shard's header
(tensor names, dtypes, shapes, offsets), the source files it reads (with their sizes and header
hashes, so a task refuses a source that changed since planning), the chunk records, and the norm
vectors the folds need (tiny; carried as exact bit patterns). Any process on any machine that sees
the same source bytes writes the same output bytes from it: the engine (local threads), a Ray worker,
``verify`` and ``inspect`` all read these records, and nothing downstream re-derives chunking or bias
math.

Chunk records (``Op``):

- ``copy``: ``size`` bytes from ``src`` at ``src_off`` to ``dst`` (a run of unchanged tensors);
- ``fold``: rows ``r0..r1`` of a ``[rows, cols]`` view of a weight, multiplied by the norm vector
  ``norm``: along the columns (``per_row`` false: the multiplier is ``scale[None, :]``) or, for
  fused ``[E, in, out]`` layouts scaled on a middle axis, one scale per row (``scale[r % width]``);
- ``fill``: ``count`` elements of ``dtype`` set to ``value`` (a folded norm's identity);
- ``bias``: a consumer bias plus ``W @ shift`` (LayerNorm bias fold), ``W`` read in ``step``-row
  chunks;
- ``dequant``: rows ``r0..r1`` of a quantized ``[rows, cols]`` weight decoded and, when ``norm`` is
  set, folded with it (``--dequantize``), every element the exact ``q·s·g`` rounded once to
  ``out_dtype``; ``scale`` is the byte range of the scale rows those rows use, ``(file, offset, dtype,
  shape)`` (the scale may sit in another shard), ``block`` the config's block size. With ``fmt``
  ``mxfp4`` (gpt-oss experts, written transposed as ``[E, in, out]``): ``rows`` are rows ``h0..h1`` of
  ONE expert's output ``[in, out]`` (multiples of 32), ``src_off`` that expert's blocks ``shape``
  ``[out, in/32, 16]``, ``scale`` its E8M0 scales ``[out, in/32]``, ``cols`` = out, ``width`` = in.
"""
from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

import numpy as np

from ..core.dtypes import itemsize
from ..core.errors import StreamfoldError
from .planner import Kind, Plan
from ..quant.decode import check_block_scale
from .dequant import mxfp4_shape, output_of, tile
from .quantchunks import BUILDERS
from ..core.reader import Checkpoint
from ..core.writer import ShardLayout

SCHEMA = 1
COPY_BLOCK = 64 << 20  # one copy record: larger kernel copies buy nothing and delay progress
MAX_CHUNK = 8 << 20  # larger fold chunks buy nothing (measured) and delay the first write
DEFAULT_BUDGET = 96 << 20
# Output bytes per dequant band (at most a chunk): 2 MiB measured less system time than 4 MiB or a 10 MB
# chunk (the writer's copy of a buffer still in cache; benchmarks/README.md section 6)
DEQUANT_BAND = 2 << 20


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def chunk_bytes_for(workers: int | None, memory_budget: int | None) -> int:
    """Source bytes per fold chunk: one chunk per folding thread plus the writer's slots fit the budget."""
    folders = max(1, (workers or default_workers()) - 1)
    return max(1 << 16, min(MAX_CHUNK, (memory_budget or DEFAULT_BUDGET) // (3 * folders + 6)))


class Op(StrEnum):
    COPY = "copy"
    FOLD = "fold"
    FILL = "fill"
    BIAS = "bias"
    DEQUANT = "dequant"


@dataclass
class Chunk:
    """One byte range of an output shard and how to produce it (fields unused by ``op`` stay default)."""

    op: Op
    tensor: str  # the tensor it belongs to (copy: the first tensor of the run)
    dst: int  # absolute offset in the output shard
    size: int  # output bytes
    src: str = ""  # source file name (relative to the source folder)
    src_off: int = 0
    src_bytes: int = 0  # source bytes this chunk accounts for (progress)
    rows: tuple[int, int] = (0, 0)  # fold: r0, r1 / bias: the weight's rows
    cols: int = 0
    width: int = 0  # the norm's length
    per_row: bool = False
    norm: str = ""  # key into Task.norms
    src_dtype: str = ""
    out_dtype: str = ""
    value: float = 0.0  # fill
    shape: tuple[int, ...] = ()  # bias: the bias shape; fill: the tensor shape
    weight: tuple = ()  # bias: (file, offset, dtype, shape) of the consumer weight W
    axis: int = -1  # bias: the axis of W that meets the norm
    step: int = 0  # bias: rows of W per read
    scale: tuple = ()  # dequant: (file, offset, dtype, shape) of the scale rows of ``rows``
    block: tuple = ()  # dequant: the block size (rows, cols) one scale covers
    fmt: str = ""  # dequant: "" FP8 tiles; "mxfp4": gpt-oss experts; ct-pack, ct-int, gptq, awq: quantchunks
    zero: tuple = ()  # dequant ct-pack/ct-int/gptq/awq: (file, offset, dtype, shape) of the zero points
    gidx: tuple = ()  # dequant gptq: (file, offset, dtype, shape) of g_idx (the group of each input)

    def to_dict(self) -> dict:
        d = {"op": str(self.op), "tensor": self.tensor, "dst": self.dst, "size": self.size}
        for k, default in _CHUNK_DEFAULTS.items():
            v = getattr(self, k)
            if v != default:
                d[k] = [list(x) if isinstance(x, tuple) else x for x in v] if isinstance(v, tuple) else v
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Chunk":
        kw = dict(d)
        kw["op"] = Op(kw["op"])
        for k in ("rows", "shape"):
            if k in kw:
                kw[k] = tuple(kw[k])
        for k in ("weight", "scale", "zero", "gidx"):
            if k in kw:
                f, off, dt, shape = kw[k]
                kw[k] = (f, off, dt, tuple(shape))
        if "block" in kw:
            kw["block"] = tuple(kw["block"])
        return cls(**kw)


_CHUNK_DEFAULTS = {k: v.default for k, v in Chunk.__dataclass_fields__.items()
                   if k not in ("op", "tensor", "dst", "size")}


@dataclass
class SourceFile:
    """A source file as planned: its size and the sha256 of its header."""

    size: int
    header_sha256: str


@dataclass
class Task:
    """Everything needed to write one output shard (see the module docstring)."""

    shard: str
    tensors: list[tuple[str, str, tuple[int, ...]]]  # output header order: name, dtype, shape
    metadata: dict[str, str] | None
    sources: dict[str, SourceFile]
    chunks: list[Chunk]
    norms: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # norm -> {"scale", "shift"}
    schema: int = SCHEMA

    def layout(self) -> ShardLayout:
        """The output shard's byte layout (header and every tensor's range)."""
        return ShardLayout(self.tensors, self.metadata)

    @property
    def file_bytes(self) -> int:
        return self.layout().file_bytes

    @property
    def src_bytes(self) -> int:
        return sum(c.src_bytes for c in self.chunks)

    def count(self, op: Op) -> int:
        return sum(1 for c in self.chunks if c.op == op)

    def to_dict(self) -> dict:
        lay = self.layout()
        return {
            "schema": self.schema, "shard": self.shard, "metadata": self.metadata,
            "header": [{"name": n, "dtype": dt, "shape": list(sh),
                        "offsets": [lay.tensors[n].begin - len(lay.header), lay.tensors[n].end - len(lay.header)]}
                       for n, dt, sh in self.tensors],
            "file_bytes": lay.file_bytes,
            "sources": {k: {"size": v.size, "header_sha256": v.header_sha256} for k, v in self.sources.items()},
            "norms": {k: {part: array_to_dict(a) for part, a in v.items()} for k, v in self.norms.items()},
            "chunks": [c.to_dict() for c in self.chunks],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Task":
        if d.get("schema") != SCHEMA:
            raise StreamfoldError(f"task for {d.get('shard')!r}: schema {d.get('schema')!r}, this streamfold "
                                  f"reads schema {SCHEMA}")
        task = cls(shard=d["shard"], tensors=[(t["name"], t["dtype"], tuple(t["shape"])) for t in d["header"]],
                   metadata=d["metadata"],
                   sources={k: SourceFile(v["size"], v["header_sha256"]) for k, v in d["sources"].items()},
                   chunks=[Chunk.from_dict(c) for c in d["chunks"]],
                   norms={k: {part: array_from_dict(a) for part, a in v.items()} for k, v in d["norms"].items()})
        lay = task.layout()  # the header offsets must be the ones this layout computes
        base = len(lay.header)
        for t in d["header"]:
            o = lay.tensors[t["name"]]
            if [o.begin - base, o.end - base] != t["offsets"]:
                raise StreamfoldError(f"task for {task.shard!r}: tensor {t['name']!r} offsets {t['offsets']} "
                                      "do not match its header")
        if lay.file_bytes != d["file_bytes"]:
            raise StreamfoldError(f"task for {task.shard!r}: file_bytes {d['file_bytes']} do not match its header")
        return task

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "Task":
        return cls.from_dict(json.loads(text))

    def check_sources(self, paths: dict[str, Path]) -> None:
        """Refuse to run on source files whose size or header differ from what was planned."""
        for name, want in self.sources.items():
            p = paths[name]
            got = source_file(p)
            if got != want:
                what = "size" if got.size != want.size else "header"
                raise StreamfoldError(f"{p}: source {what} changed since the conversion was planned "
                                      f"({name}); plan again")


def array_to_dict(a: np.ndarray) -> dict:
    """An array as its exact bytes (base64), dtype and shape."""
    a = np.ascontiguousarray(a)
    return {"dtype": a.dtype.str, "shape": list(a.shape), "b64": base64.b64encode(a.tobytes()).decode("ascii")}


def array_from_dict(d: dict) -> np.ndarray:
    raw = base64.b64decode(d["b64"])
    return np.frombuffer(raw, dtype=np.dtype(d["dtype"])).reshape(d["shape"]).copy()


def source_file(path: Path) -> SourceFile:
    """Size and header sha256 of a safetensors file (reads only the header)."""
    try:
        size = os.stat(path).st_size
        with open(path, "rb") as f:
            head = f.read(8)
            (n,) = struct.unpack("<Q", head) if len(head) == 8 else (0,)
            raw = head + f.read(min(n, max(0, size - 8)))
    except OSError as e:
        raise StreamfoldError(f"{path}: cannot read ({e.strerror or e})") from None
    return SourceFile(size, hashlib.sha256(raw).hexdigest())


def build_tasks(ckpt: Checkpoint, plan: Plan, chunk_bytes: int) -> list[Task]:
    """One task per output shard (output shards mirror the source's), in source shard order."""
    files = {shard: source_file(f.path) for shard, f in ckpt.shards.items()}
    return [_shard_task(ckpt, plan, shard, files, chunk_bytes) for shard in ckpt.shards]


def _shard_task(ckpt: Checkpoint, plan: Plan, shard: str, files: dict[str, SourceFile], chunk_bytes: int) -> Task:
    f = ckpt.shards[shard]
    out = [_named(output_of(t.name, a, t.shape), a.out_dtype) for t in f.tensors.values()
           if (a := plan.actions[t.name]).kind != Kind.DROP]  # MXFP4 experts: renamed and reshaped
    added = [t for t in getattr(plan, "added", ()) if t.shard == shard]  # identity norms a mode change restores
    out += [(t.name, t.dtype, tuple(t.shape)) for t in added]
    task = Task(shard=shard, tensors=out, metadata=f.metadata, sources={}, chunks=[])
    layout = task.layout()
    used = {shard}
    run: list = []

    def flush() -> None:
        if not run:
            return
        begin, end = run[0].begin, run[-1].end
        dst = layout.tensors[run[0].name].begin
        for off in range(0, end - begin, COPY_BLOCK):
            n = min(COPY_BLOCK, end - begin - off)
            task.chunks.append(Chunk(Op.COPY, run[0].name, dst + off, n, src=shard, src_off=begin + off, src_bytes=n))
        run.clear()

    for t in f.tensors.values():  # file order
        a = plan.actions[t.name]
        if a.kind == Kind.COPY:
            run.append(t)
            continue
        flush()
        if a.kind == Kind.DROP:
            continue
        o = layout.tensors[output_of(t.name, a, t.shape)[0]]
        if a.kind == Kind.SCALE:
            task.norms.setdefault(a.norm.weight, {})["scale"] = a.norm.scale
            task.chunks.extend(_fold_chunks(t, a, o.begin, shard, chunk_bytes))
        elif a.kind == Kind.FILL:
            task.chunks.append(Chunk(Op.FILL, t.name, o.begin, o.end - o.begin, src_bytes=t.nbytes,
                                     out_dtype=a.out_dtype, value=float(a.value), shape=t.shape))
        elif a.kind == Kind.BIAS:
            w = ckpt.tensors[a.source]
            wshard = ckpt.shard_of[a.source]
            used.add(wshard)
            task.norms.setdefault(a.norm.weight, {})["shift"] = a.norm.shift
            cols = w.shape[-1]
            step = max(1, chunk_bytes // max(1, cols * itemsize(w.dtype)))
            task.chunks.append(Chunk(Op.BIAS, t.name, o.begin, o.end - o.begin, src=shard, src_off=t.begin,
                                     src_bytes=t.nbytes, src_dtype=t.dtype, out_dtype=a.out_dtype,
                                     shape=t.shape, weight=(wshard, w.begin, w.dtype, w.shape), axis=a.axis,
                                     norm=a.norm.weight, step=step))
        elif a.kind == Kind.DEQUANT:
            if a.norm is not None:
                task.norms.setdefault(a.norm.weight, {})["scale"] = a.norm.scale
            if a.quant.layout in BUILDERS:  # integer formats, fused FP8 experts (streamfold.planning.quantchunks)
                chunks = [Chunk(Op.DEQUANT, **kw) for kw in BUILDERS[a.quant.layout](ckpt, t, a, o.begin, shard,
                                                                                    chunk_bytes)]
            else:
                chunks = (_mxfp4_chunks if a.quant.layout == "mxfp4" else _dequant_chunks)(ckpt, t, a, o.begin,
                                                                                          shard, chunk_bytes)
            used.update(x[0] for c in chunks for x in (c.scale, c.zero, c.gidx) if x)
            task.chunks.extend(chunks)
        else:  # pragma: no cover - every Kind is handled above
            raise AssertionError(a.kind)
    flush()
    for t in added:  # laid out after the source's tensors
        o = layout.tensors[t.name]
        task.chunks.append(Chunk(Op.FILL, t.name, o.begin, o.end - o.begin, out_dtype=t.dtype, value=float(t.value),
                                 shape=tuple(t.shape)))
    task.sources = {s: files[s] for s in sorted(used)}
    return task


def _named(name_shape: tuple[str, tuple[int, ...]], dtype: str) -> tuple[str, str, tuple[int, ...]]:
    return name_shape[0], dtype, name_shape[1]


def _fold_chunks(t, a, dst_begin: int, shard: str, chunk_bytes: int) -> list[Chunk]:
    shape, axis = t.shape, a.axis
    width = shape[axis]
    per_row = axis != len(shape) - 1
    # fused experts [E, in, out] scaled on axis 1: each row of prod(shape[axis+1:]) has one scale
    cols = math.prod(shape[axis + 1:]) if per_row else width
    rows = t.numel // max(cols, 1)
    isz, osz = itemsize(t.dtype), itemsize(a.out_dtype)
    step = max(1, chunk_bytes // max(1, cols * max(isz, osz)))
    out = []
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        n = r1 - r0
        out.append(Chunk(Op.FOLD, t.name, dst_begin + r0 * cols * osz, n * cols * osz, src=shard,
                         src_off=t.begin + r0 * cols * isz, src_bytes=n * cols * isz, rows=(r0, r1), cols=cols,
                         width=width, per_row=per_row, norm=a.norm.weight, src_dtype=t.dtype,
                         out_dtype=a.out_dtype))
    return out


def _dequant_chunks(ckpt: Checkpoint, t, a, dst_begin: int, shard: str, chunk_bytes: int) -> list[Chunk]:
    """Row bands of a quantized weight, each a whole number of scale blocks, with its scale rows' range."""
    qm = a.quant
    st = ckpt.tensors[qm.scales[0]]
    block = tile(qm, t.shape)
    scale_shape = (1, 1) if qm.strategy == "tensor" and st.numel == 1 else st.shape  # [] or [1]: one tile
    check_block_scale(st.name, t.shape, scale_shape, block)
    rows, cols = t.shape
    grid_cols = scale_shape[-1]
    isz, osz, ssz = itemsize(t.dtype), itemsize(a.out_dtype), itemsize(st.dtype)
    br = block[0]
    step = max(br, min(chunk_bytes, DEQUANT_BAND) // max(1, cols * osz) // br * br)  # by OUTPUT bytes
    out = []
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        n = r1 - r0
        t0, t1 = r0 // br, (r1 - 1) // br + 1
        out.append(Chunk(Op.DEQUANT, t.name, dst_begin + r0 * cols * osz, n * cols * osz, src=shard,
                         src_off=t.begin + r0 * cols * isz, src_bytes=n * cols * isz, rows=(r0, r1), cols=cols,
                         width=cols, norm=a.norm.weight if a.norm is not None else "", src_dtype=t.dtype,
                         out_dtype=a.out_dtype, scale=(ckpt.shard_of[st.name], st.begin + t0 * grid_cols * ssz,
                                                       st.dtype, (t1 - t0, grid_cols)), block=block))
    return out


def _mxfp4_chunks(ckpt: Checkpoint, t, a, dst_begin: int, shard: str, chunk_bytes: int) -> list[Chunk]:
    """Bands of 32-row multiples of each expert's transposed output ``[in, out]`` (one expert at a time:
    each record reads that expert's blocks and scales; ``src_bytes`` is the band's share of them)."""
    qm = a.quant
    st = ckpt.tensors[qm.scales[0]]
    experts, rows, groups, width = t.shape
    if tuple(st.shape) != (experts, rows, groups):
        raise StreamfoldError(f"{st.name}: MXFP4 scale shape {list(st.shape)} is not [{experts}, {rows}, {groups}] "
                              f"(one E8M0 exponent per 32 codes of {t.name} {list(t.shape)})")
    _, inner, outer = mxfp4_shape(tuple(t.shape))
    osz, ssz = itemsize(a.out_dtype), itemsize(st.dtype)
    step = max(32, min(chunk_bytes, DEQUANT_BAND) // max(1, outer * osz) // 32 * 32)  # by OUTPUT bytes
    out = []
    for e in range(experts):
        for h0 in range(0, inner, step):
            h1 = min(inner, h0 + step)
            n = h1 - h0
            out.append(Chunk(Op.DEQUANT, qm.logical, dst_begin + (e * inner + h0) * outer * osz, n * outer * osz,
                             src=shard, src_off=t.begin + e * rows * groups * width, src_bytes=n * outer // 2,
                             rows=(h0, h1), cols=outer, width=inner, norm=a.norm.weight if a.norm is not None else "",
                             src_dtype=t.dtype, out_dtype=a.out_dtype, shape=(rows, groups, width), block=(1, 32),
                             scale=(ckpt.shard_of[st.name], st.begin + e * rows * groups * ssz, st.dtype,
                                    (rows, groups)), fmt="mxfp4"))
    return out
