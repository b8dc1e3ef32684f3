"""Check one written output shard against its task, chunk record by chunk record.

The same records the engine executed, checked independently of how it executed them: the header
bytes are the task's; copied ranges are byte-identical to the source; every folded element is the
float32 product rounded once (``oracle.check_scaled``, the element check ``verify`` uses); identity
fills are exact; folded biases equal ``b + W @ beta`` (float64) to within one rounding. Used by the
streaming Hub path (``--stream --verify``), which checks each shard before uploading it and deleting
its source.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .dtypes import DTYPES, widen_bf16
from .fold import Scratch
from .reader import pread_into
from .tasks import Op, Task

PIECE = 8 << 20


def check_task(task: Task, out_path: Path, sources: dict[str, Path]) -> list[str]:
    """Problems found in ``out_path`` (the shard ``task`` wrote), one line each; empty when correct."""
    from .oracle import check_scaled  # the element check verify uses (independent of fold.py)
    lay = task.layout()
    problems: list[str] = []
    size = out_path.stat().st_size
    if size != lay.file_bytes:
        return [f"{task.shard}: {size} bytes, the task lays out {lay.file_bytes}"]
    fds = {name: os.open(p, os.O_RDONLY) for name, p in sources.items() if name in task.sources}
    out = os.open(out_path, os.O_RDONLY)
    scratch = Scratch()
    try:
        head = np.empty(len(lay.header), np.uint8)
        pread_into(out, head, 0, out_path)
        if head.tobytes() != lay.header:
            problems.append(f"{task.shard}: header differs from the task's")
        bad: dict[str, str] = {}
        for c in task.chunks:
            if c.tensor in bad:
                continue
            msg = _check_chunk(task, c, out, fds, out_path, scratch, check_scaled)
            if msg:
                bad[c.tensor] = msg
        problems.extend(f"{t}: {m}" for t, m in bad.items())
    finally:
        for fd in (*fds.values(), out):
            os.close(fd)
    return problems


def _read(fd, off, n, path, scratch, key) -> np.ndarray:
    buf = scratch.get(key, n)
    pread_into(fd, buf, off, path)
    return buf


def _check_chunk(task: Task, c, out: int, fds: dict[str, int], out_path: Path, scratch: Scratch,
                 check_scaled) -> str | None:
    if c.op == Op.COPY:
        for o in range(0, c.size, PIECE):
            n = min(PIECE, c.size - o)
            d = _read(out, c.dst + o, n, out_path, scratch, "d")
            s = _read(fds[c.src], c.src_off + o, n, c.src, scratch, "s")
            if not np.array_equal(d, s):
                return f"differs from the source (unchanged bytes at output offset {c.dst + o + int(np.flatnonzero(d != s)[0])})"
        return None
    if c.op == Op.FOLD:
        r0, r1 = c.rows
        n = r1 - r0
        scale = task.norms[c.norm]["scale"].astype(np.float32)
        m = scale[np.arange(r0, r1) % c.width].reshape(n, 1) if c.per_row else scale.reshape(1, -1)
        s = _read(fds[c.src], c.src_off, c.src_bytes, c.src, scratch, "s")
        d = _read(out, c.dst, c.size, out_path, scratch, "d")
        tally = check_scaled(s.view(DTYPES[c.src_dtype]).reshape(n, c.cols), d.view(DTYPES[c.out_dtype]).reshape(n, c.cols),
                             m, c.src_dtype, c.out_dtype, Scratch(), base_index=r0 * c.cols)
        if tally.bad:
            return f"{tally.bad} folded elements are not source x {c.norm} rounded once (rows {r0}..{r1})"
        return None
    if c.op == Op.FILL:
        want = np.full(c.shape, c.value, dtype=DTYPES[c.out_dtype]).reshape(-1).view(np.uint8)
        d = _read(out, c.dst, c.size, out_path, scratch, "d")
        return None if np.array_equal(d, want) else f"folded norm is not the identity ({c.value:g})"
    if c.op == Op.BIAS:
        return _check_bias(task, c, out, fds, out_path)
    raise AssertionError(c.op)


def _f64(raw: np.ndarray, dtype: str, shape) -> np.ndarray:
    v = widen_bf16(raw) if dtype == "BF16" else raw.view(DTYPES[dtype])
    return v.astype(np.float64).reshape(shape)


def _check_bias(task: Task, c, out: int, fds: dict[str, int], out_path: Path) -> str | None:
    """``b + W @ beta`` in float64 over the whole W, to within half an ulp of the stored dtype (plus a
    float64 summation-order allowance)."""
    wfile, wbegin, wdtype, wshape = c.weight
    nw = int(np.prod(wshape)) * DTYPES[wdtype].itemsize
    w = np.empty(nw, np.uint8)
    pread_into(fds[wfile], w, wbegin, wfile)
    W = _f64(w, wdtype, wshape)
    beta = task.norms[c.norm]["shift"].astype(np.float64)
    b = np.empty(int(np.prod(c.shape)) * DTYPES[c.src_dtype].itemsize, np.uint8)
    pread_into(fds[c.src], b, c.src_off, c.src)
    ref = _f64(b, c.src_dtype, c.shape) + np.tensordot(W, beta, axes=([c.axis], [0]))
    mag = np.tensordot(np.abs(W), np.abs(beta), axes=([c.axis], [0]))
    d = np.empty(c.size, np.uint8)
    pread_into(out, d, c.dst, out_path)
    got = _f64(d, c.out_dtype, c.shape)
    r = np.abs(ref.astype(np.float32))
    ulp = np.abs(np.spacing(r)).astype(np.float64) * (65536.0 if c.out_dtype == "BF16" else
                                                       8192.0 if c.out_dtype == "F16" else 1.0)
    wrong = int(np.sum(~(np.abs(got - ref) <= 0.5 * ulp + mag * 1e-12)))
    return f"{wrong} elements are not the source bias + W @ beta within one rounding" if wrong else None
