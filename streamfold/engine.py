"""Execute a plan: stream every shard through bounded buffers on a pool of worker threads.

Jobs are independent positional byte-range writes into preallocated output shards, so the output is
identical for any number of workers. Unchanged tensors are copied by the kernel
(``os.copy_file_range``) without entering Python; folded tensors are read in row chunks into
per-thread reusable buffers (never memory-mapped), so peak memory is set by the chunk budget, not
by tensor or model size. numpy and the ``os`` calls release the GIL, so threads overlap.
"""
from __future__ import annotations

import math
import os
import threading
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .dtypes import DTYPES
from .fold import Scratch, matvec_rows, scale_chunk
from .plan import Action, Plan
from .reader import Checkpoint, TensorInfo
from .writer import ShardLayout, pwrite_all

COPY_BLOCK = 64 << 20
DEFAULT_BUDGET = 96 << 20


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


@dataclass
class Job:
    nbytes: int  # source bytes this job accounts for (progress)
    run: Callable[[Scratch], None]


def pread_into(fd: int, buf: np.ndarray, offset: int, path) -> None:
    view = memoryview(buf).cast("B")
    while view:
        n = os.preadv(fd, [view], offset)
        if n == 0:
            raise OSError(f"{path}: file shrank while reading (is another process writing it?)")
        view = view[n:]
        offset += n


def copy_range(src_fd: int, dst_fd: int, src_off: int, dst_off: int, n: int, scratch: Scratch) -> None:
    """Copy bytes file to file in the kernel, falling back to a buffered read/write."""
    while n > 0:
        try:
            k = os.copy_file_range(src_fd, dst_fd, n, src_off, dst_off)
        except OSError:
            k = 0
        if k <= 0:  # unsupported (cross-device on old kernels, some filesystems): buffered
            buf = scratch.get("copy", min(n, 8 << 20))
            os.preadv(src_fd, [memoryview(buf)], src_off)
            k = os.pwrite(dst_fd, memoryview(buf)[: min(n, buf.nbytes)], dst_off)
        src_off += k
        dst_off += k
        n -= k


def interleave(lists: list[list[Job]]) -> list[Job]:
    """Round-robin across shards: writes to one file serialize on its inode lock, so concurrent
    workers do best on different output files."""
    out: list[Job] = []
    for i in range(max((len(l) for l in lists), default=0)):
        out.extend(l[i] for l in lists if i < len(l))
    return out


class Engine:
    """Turns a plan into jobs over open source and output files, and runs them."""

    def __init__(self, ckpt: Checkpoint, plan: Plan, workers: int | None = None,
                 memory_budget: int | None = None) -> None:
        self.ckpt, self.plan = ckpt, plan
        self.workers = max(1, workers or default_workers())
        budget = memory_budget or DEFAULT_BUDGET
        # per worker: source chunk + output chunk (up to 2x for float32 merged) + small scratch
        self.chunk_bytes = max(1 << 16, budget // (self.workers * 4))
        self.layouts: dict[str, ShardLayout] = {}
        for shard, f in ckpt.shards.items():
            out = []
            for t in f.tensors.values():
                a = plan.actions[t.name]
                if a.kind != "drop":
                    out.append((t.name, a.out_dtype, t.shape))
            self.layouts[shard] = ShardLayout(out, f.metadata)

    @property
    def output_bytes(self) -> int:
        return sum(l.data_bytes for l in self.layouts.values())

    def run(self, out_dir, progress: Callable[[int], None] | None = None) -> None:
        biases = self._fold_biases()
        src_fds: dict[str, int] = {}
        dst_fds: dict[str, int] = {}
        try:
            for shard, f in self.ckpt.shards.items():
                src_fds[shard] = os.open(f.path, os.O_RDONLY)
                dst_fds[shard] = self.layouts[shard].create(out_dir / shard)
            per_shard = [self._jobs(f.tensors.values(), self.layouts[shard], src_fds[shard],
                                    dst_fds[shard], biases) for shard, f in self.ckpt.shards.items()]
            self._execute(interleave(per_shard), progress)
        finally:
            for fd in (*src_fds.values(), *dst_fds.values()):
                os.close(fd)

    def _execute(self, jobs: list[Job], progress) -> None:
        local = threading.local()
        lock = threading.Lock()

        def go(job: Job) -> None:
            s = getattr(local, "scratch", None)
            if s is None:
                s = local.scratch = Scratch()
            job.run(s)
            if progress is not None:
                with lock:
                    progress(job.nbytes)

        if self.workers == 1:
            for job in jobs:
                go(job)
            return
        with ThreadPoolExecutor(self.workers, thread_name_prefix="streamfold") as pool:
            futures = [pool.submit(go, j) for j in jobs]
            done, pending = wait(futures, return_when=FIRST_EXCEPTION)
            for fut in pending:
                fut.cancel()
            for fut in futures:
                if fut.done() and not fut.cancelled() and fut.exception() is not None:
                    raise fut.exception()

    def _jobs(self, tensors, layout: ShardLayout, src_fd: int, dst_fd: int,
              biases: dict[str, np.ndarray]) -> list[Job]:
        jobs: list[Job] = []
        run: list[TensorInfo] = []

        def flush() -> None:
            if not run:
                return
            begin, end = run[0].begin, run[-1].end
            dst = layout.tensors[run[0].name].begin
            for off in range(0, end - begin, COPY_BLOCK):
                n = min(COPY_BLOCK, end - begin - off)
                jobs.append(Job(n, lambda s, o=off, n=n: copy_range(src_fd, dst_fd, begin + o, dst + o, n, s)))
            run.clear()

        for t in tensors:
            a = self.plan.actions[t.name]
            if a.kind == "copy":
                run.append(t)
                continue
            flush()
            if a.kind == "drop":
                continue
            out = layout.tensors[t.name]
            if a.kind == "scale":
                jobs.extend(self._scale_jobs(t, a, out.begin, src_fd, dst_fd))
            elif a.kind == "fill":
                data = np.full(t.shape, a.value, dtype=DTYPES[a.out_dtype])
                jobs.append(Job(t.nbytes, lambda s, d=data, o=out.begin: pwrite_all(dst_fd, d, o)))
            elif a.kind == "bias":
                data = biases[t.name]
                jobs.append(Job(t.nbytes, lambda s, d=data, o=out.begin: pwrite_all(dst_fd, d, o)))
        flush()
        return jobs

    def _scale_jobs(self, t: TensorInfo, a: Action, dst_begin: int, src_fd: int, dst_fd: int) -> list[Job]:
        shape, axis = t.shape, a.axis
        width = shape[axis]
        if axis == len(shape) - 1:
            cols = width
            row_mult = None
            mult = a.norm.scale.reshape(1, cols)
        else:  # e.g. fused experts [E, in, out]: each row of length prod(shape[axis+1:]) has one scale
            cols = math.prod(shape[axis + 1:])
            row_mult = a.norm.scale
            mult = None
        rows = t.numel // max(cols, 1)
        isz, osz = DTYPES[t.dtype].itemsize, DTYPES[a.out_dtype].itemsize
        step = max(1, self.chunk_bytes // max(1, cols * max(isz, osz)))
        jobs = []
        for r0 in range(0, rows, step):
            r1 = min(rows, r0 + step)

            def job(s: Scratch, r0=r0, r1=r1) -> None:
                n = r1 - r0
                src = s.get("in", n * cols * isz)
                pread_into(src_fd, src, t.begin + r0 * cols * isz, t.path)
                out = s.get("out", n * cols * osz)
                m = mult if row_mult is None else row_mult[np.arange(r0, r1) % width].reshape(n, 1)
                scale_chunk(src.view(DTYPES[t.dtype]).reshape(n, cols), m, t.dtype, a.out_dtype,
                            out.view(DTYPES[a.out_dtype]).reshape(n, cols), s)
                pwrite_all(dst_fd, out, dst_begin + r0 * cols * osz)
            jobs.append(Job((r1 - r0) * cols * isz, job))
        return jobs

    def _fold_biases(self) -> dict[str, np.ndarray]:
        """``b + W @ beta`` for consumers of LayerNorms with a non-zero bias (W unscaled)."""
        out: dict[str, np.ndarray] = {}
        for name, a in self.plan.actions.items():
            if a.kind != "bias":
                continue
            w = self.ckpt.tensors[a.source]
            beta = a.norm.shift
            if a.axis == len(w.shape) - 1:
                cols = w.shape[-1]
                rows = w.numel // cols
                isz = DTYPES[w.dtype].itemsize
                acc = np.empty(rows, dtype=np.float64)
                step = max(1, self.chunk_bytes // max(1, cols * isz))
                buf = np.empty(step * cols * isz, dtype=np.uint8)
                with open(w.path, "rb", buffering=0) as f:
                    for i in range(0, rows, step):
                        n = min(step, rows - i)
                        chunk = buf[: n * cols * isz]
                        pread_into(f.fileno(), chunk, w.begin + i * cols * isz, w.path)
                        acc[i:i + n] = matvec_rows(chunk.view(DTYPES[w.dtype]).reshape(n, cols), w.dtype, beta)
                acc = acc.reshape(w.shape[:-1])
            else:  # fused/transposed consumers with biases behind a biased LayerNorm: none known; small
                acc = np.tensordot(self.ckpt.read(a.source).astype(np.float64), beta.astype(np.float64),
                                   axes=([a.axis], [0]))
            b = self.ckpt.read(name).astype(np.float64)
            out[name] = (b + acc).astype(DTYPES[a.out_dtype])
        return out
