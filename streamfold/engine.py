"""Execute a plan: fold on worker threads, write from one thread, through bounded buffers.

Every job is a positional write of a fixed byte range into a preallocated output shard, so the
output does not depend on scheduling. Measured on ext4: buffered writes into the page cache do not
get faster with more writers (they contend on the inode lock and the page allocator and burn system
time spinning), so one writer thread issues every write in order, while ``workers - 1`` threads read
and fold the next chunks ahead of it. Unchanged tensors are copied by the kernel
(``os.copy_file_range``) without entering Python. Folded tensors are read in row chunks through
short-lived maps of just that chunk (a whole-file map would keep every touched page resident), and
at most a fixed number of folded chunks wait for the writer, so peak memory is set by the budget,
not by tensor or model size. numpy and the ``os`` calls release the GIL, so the threads overlap.
"""
from __future__ import annotations

import hashlib
import math
import mmap
import os
import queue
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .dtypes import DTYPES
from .fold import Scratch, fold_bias_rows, scale_chunk
from .plan import Action, Plan
from .reader import Checkpoint, TensorInfo, pread_into
from .writer import ShardLayout, pwrite_all

COPY_BLOCK = 64 << 20
WRITEBACK_STEP = 64 << 20
DEFAULT_BUDGET = 96 << 20
MAX_CHUNK = 8 << 20  # larger chunks buy nothing (measured) and delay the first write


def default_workers() -> int:
    return max(1, min(8, os.cpu_count() or 1))


@dataclass
class Job:
    """One byte range of one output shard.

    ``compute(scratch, out)`` (folds) fills ``out`` (``out_bytes`` long) off the writer thread;
    ``write(out)`` then runs on the writer thread (``out`` is None for jobs with nothing to compute).
    """

    nbytes: int  # source bytes this job accounts for (progress)
    write: Callable[[np.ndarray | None], None]
    compute: Callable[[Scratch, np.ndarray], None] | None = None
    out_bytes: int = 0
    shard: str = ""
    end: int = 0  # once written, the shard is complete up to this offset


def with_source_window(fd: int, offset: int, length: int, path, fn: Callable[[np.ndarray], None]) -> None:
    """Call ``fn`` on a read-only map of ``length`` bytes at ``offset``, unmapped right after.

    Reading folded chunks through a short-lived map skips the copy ``pread`` makes (measured: about
    3x less system time), and unmapping at once keeps the mapped pages out of resident memory.
    """
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    try:
        mm = mmap.mmap(fd, offset + length - start, prot=mmap.PROT_READ, offset=start)
    except (OSError, ValueError) as e:
        raise OSError(f"{path}: cannot map bytes {offset}..{offset + length} ({e})") from None
    try:
        fn(np.frombuffer(mm, dtype=np.uint8, count=length, offset=offset - start))
    finally:
        try:
            mm.close()
        except BufferError:  # a traceback still holds a view; the map goes when that does
            pass


def copy_range(src_fd: int, dst_fd: int, src_off: int, dst_off: int, n: int, scratch: Scratch) -> None:
    """Copy bytes file to file in the kernel, falling back to a buffered read/write."""
    while n > 0:
        try:
            k = os.copy_file_range(src_fd, dst_fd, n, src_off, dst_off)
        except OSError:
            k = 0
        if k <= 0:  # unsupported (cross-device on old kernels, some filesystems): buffered
            buf = scratch.get("copy", min(n, 8 << 20))
            got = os.preadv(src_fd, [memoryview(buf)], src_off)
            if got <= 0:
                raise OSError(f"source shrank while copying (offset {src_off})")
            k = os.pwrite(dst_fd, memoryview(buf)[:got], dst_off)
        src_off += k
        dst_off += k
        n -= k


class TrailingHasher:
    """sha256 of each output shard, computed on a background thread that follows the writer.

    The writer reports "shard written up to byte N" after each job (jobs write a shard's bytes in
    order); this thread reads those bytes back from the page cache and hashes them, so a manifest
    costs hashing time on another core instead of a second pass over the output at the end.
    """

    def __init__(self, fds: dict[str, int]) -> None:
        self.fds = fds
        self.pos = {shard: 0 for shard in fds}
        self.hashes = {shard: hashlib.sha256() for shard in fds}
        self.todo: queue.SimpleQueue = queue.SimpleQueue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="streamfold-sha", daemon=True)
        self.thread.start()

    def written(self, shard: str, end: int) -> None:
        self.todo.put((shard, end))

    def _loop(self) -> None:
        buf = np.empty(8 << 20, dtype=np.uint8)
        while (item := self.todo.get()) is not None:
            if self.error is not None:
                continue
            shard, end = item
            try:
                while self.pos[shard] < end:
                    n = min(buf.nbytes, end - self.pos[shard])
                    pread_into(self.fds[shard], buf[:n], self.pos[shard], shard)
                    self.hashes[shard].update(memoryview(buf)[:n])
                    self.pos[shard] += n
            except BaseException as e:  # surfaced by finish()
                self.error = e

    def finish(self, sizes: dict[str, int]) -> dict[str, str]:
        """Hash each shard to its full size and return the hex digests."""
        for shard, size in sizes.items():
            self.todo.put((shard, size))
        self.todo.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error
        return {shard: h.hexdigest() for shard, h in self.hashes.items()}

    def abort(self) -> None:
        self.error = self.error or RuntimeError("aborted")
        self.todo.put(None)
        self.thread.join()


class Engine:
    """Turns a plan into jobs over open source and output files, and runs them."""

    def __init__(self, ckpt: Checkpoint, plan: Plan, workers: int | None = None,
                 memory_budget: int | None = None) -> None:
        self.ckpt, self.plan = ckpt, plan
        self.workers = max(1, workers or default_workers())
        budget = memory_budget or DEFAULT_BUDGET
        # Buffers: one source chunk per folding thread, plus `slots` output chunks (up to 2x a
        # source chunk for float32 merged) queued for the writer.
        folders = max(1, self.workers - 1)
        self.chunk_bytes = max(1 << 16, min(MAX_CHUNK, budget // (3 * folders + 6)))
        # Every output slot the budget allows: folding runs further ahead while the writer is busy
        # with a long kernel copy, and the writer rarely waits for a fold (measured: fewer idle gaps).
        self.slots = max(folders + 2, (budget - folders * self.chunk_bytes) // (2 * self.chunk_bytes))
        self.layouts: dict[str, ShardLayout] = {}
        for shard, f in ckpt.shards.items():
            out = []
            for t in f.tensors.values():
                a = plan.actions[t.name]
                if a.kind != "drop":
                    out.append((t.name, a.out_dtype, t.shape))
            out += [(t.name, t.dtype, t.shape) for t in plan.added if t.shard == shard]  # restored norms
            self.layouts[shard] = ShardLayout(out, f.metadata)

    @property
    def output_bytes(self) -> int:
        return sum(l.data_bytes for l in self.layouts.values())

    def run(self, out_dir, progress: Callable[[int], None] | None = None,
            hash_outputs: bool = False) -> dict[str, str]:
        """Write every output shard into ``out_dir``; with ``hash_outputs``, return their sha256."""
        biases = self._fold_biases()
        src_fds: dict[str, int] = {}
        dst_fds: dict[str, int] = {}
        hasher = None
        try:
            for shard, f in self.ckpt.shards.items():
                src_fds[shard] = os.open(f.path, os.O_RDONLY)
                dst_fds[shard] = self.layouts[shard].create(out_dir / shard)
            jobs = []
            for shard, f in self.ckpt.shards.items():
                for job in self._jobs(f.tensors.values(), self.layouts[shard], src_fds[shard],
                                      dst_fds[shard], biases) + self._added_jobs(shard, dst_fds[shard]):
                    job.shard = shard
                    jobs.append(job)
            hasher = TrailingHasher(dst_fds) if hash_outputs else None

            flushed = dict.fromkeys(dst_fds, 0)

            def done(job: Job) -> None:
                if hasher is not None:
                    hasher.written(job.shard, job.end)
                elif job.end - flushed[job.shard] >= WRITEBACK_STEP:
                    # Start writeback of what is written so far (DONTNEED on dirty pages queues them
                    # for the disk without waiting): the disk works during the conversion instead of
                    # after it, and finished output does not pile up in the page cache.
                    os.posix_fadvise(dst_fds[job.shard], flushed[job.shard], job.end - flushed[job.shard],
                                     os.POSIX_FADV_DONTNEED)
                    flushed[job.shard] = job.end
                if progress is not None:
                    progress(job.nbytes)
            if self.workers == 1:
                self._run_serial(jobs, done)
            else:
                self._run_pipelined(jobs, done)
            digests = hasher.finish({s: l.file_bytes for s, l in self.layouts.items()}) if hasher else {}
            hasher = None
            return digests
        finally:
            if hasher is not None:
                hasher.abort()
            for fd in (*src_fds.values(), *dst_fds.values()):
                os.close(fd)

    def _run_serial(self, jobs: list[Job], done: Callable[[Job], None]) -> None:
        """The single-threaded reference path: every job computed and written in order."""
        scratch = Scratch()
        for job in jobs:
            out = None
            if job.compute is not None:
                out = scratch.get("out", job.out_bytes)
                job.compute(scratch, out)
            job.write(out)
            done(job)

    def _run_pipelined(self, jobs: list[Job], done: Callable[[Job], None]) -> None:
        """Fold ahead on ``workers - 1`` threads; write in job order on this thread."""
        local = threading.local()
        free: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(self.slots):
            free.put(None)  # a slot; its buffer is allocated on first use and then reused

        def fold(job: Job, buf):
            s = getattr(local, "scratch", None)
            if s is None:
                s = local.scratch = Scratch()
            if buf is None or buf.nbytes < job.out_bytes:
                buf = np.empty(max(job.out_bytes, self.chunk_bytes), dtype=np.uint8)
            job.compute(s, buf[: job.out_bytes])
            return buf

        pending: deque = deque()
        in_flight = 0
        with ThreadPoolExecutor(max(1, self.workers - 1), thread_name_prefix="streamfold") as pool:
            try:
                for job in jobs:
                    if job.compute is not None:
                        while in_flight == self.slots:  # all output buffers busy: write the oldest first
                            in_flight -= self._write_head(pending, free, done)
                        pending.append((job, pool.submit(fold, job, free.get())))
                        in_flight += 1
                    else:
                        pending.append((job, None))
                    while pending and pending[0][1] is None:  # nothing to wait for: write now
                        self._write_head(pending, free, done)
                while pending:
                    in_flight -= self._write_head(pending, free, done)
            except BaseException:
                for _, fut in pending:
                    if fut is not None:
                        fut.cancel()
                raise

    @staticmethod
    def _write_head(pending: deque, free: queue.SimpleQueue, done: Callable[[Job], None]) -> int:
        """Write the oldest pending job; returns 1 if it held an output buffer."""
        job, fut = pending.popleft()
        if fut is None:
            job.write(None)
            held = 0
        else:
            buf = fut.result()
            job.write(buf[: job.out_bytes])
            free.put(buf)
            held = 1
        done(job)
        return held

    def _jobs(self, tensors, layout: ShardLayout, src_fd: int, dst_fd: int,
              biases: dict[str, np.ndarray]) -> list[Job]:
        jobs: list[Job] = []
        run: list[TensorInfo] = []
        copy_scratch = Scratch()

        def flush() -> None:
            if not run:
                return
            begin, end = run[0].begin, run[-1].end
            dst = layout.tensors[run[0].name].begin
            for off in range(0, end - begin, COPY_BLOCK):
                n = min(COPY_BLOCK, end - begin - off)
                jobs.append(Job(n, lambda _, o=off, n=n: copy_range(src_fd, dst_fd, begin + o, dst + o, n,
                                                                     copy_scratch), end=dst + off + n))
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
                jobs.append(Job(t.nbytes, lambda _, d=data, o=out.begin: pwrite_all(dst_fd, d, o), end=out.end))
            elif a.kind == "bias":
                data = biases[t.name]
                jobs.append(Job(t.nbytes, lambda _, d=data, o=out.begin: pwrite_all(dst_fd, d, o), end=out.end))
        flush()
        return jobs

    def _added_jobs(self, shard: str, dst_fd: int) -> list[Job]:
        """Fill the tensors the plan adds to ``shard`` (laid out after its source tensors)."""
        jobs = []
        for t in self.plan.added:
            if t.shard == shard:
                out = self.layouts[shard].tensors[t.name]
                data = np.full(t.shape, t.value, dtype=DTYPES[t.dtype])
                jobs.append(Job(0, lambda _, d=data, o=out.begin: pwrite_all(dst_fd, d, o), end=out.end))
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
            n = r1 - r0

            def compute(s: Scratch, out: np.ndarray, r0=r0, r1=r1, n=n) -> None:
                m = mult if row_mult is None else row_mult[np.arange(r0, r1) % width].reshape(n, 1)
                def fold(src: np.ndarray) -> None:
                    scale_chunk(src.view(DTYPES[t.dtype]).reshape(n, cols), m, t.dtype, a.out_dtype,
                                out.view(DTYPES[a.out_dtype]).reshape(n, cols), s)
                with_source_window(src_fd, t.begin + r0 * cols * isz, n * cols * isz, t.path, fold)

            def write(out: np.ndarray, r0=r0) -> None:
                pwrite_all(dst_fd, out, dst_begin + r0 * cols * osz)
            jobs.append(Job(n * cols * isz, write, compute, n * cols * osz, end=dst_begin + r1 * cols * osz))
        return jobs

    def _fold_biases(self) -> dict[str, np.ndarray]:
        """``b + W @ beta`` for consumers of LayerNorms with a non-zero bias (W unscaled), each element
        the exact sum rounded once (:func:`fold.fold_bias_rows`)."""
        out: dict[str, np.ndarray] = {}
        for name, a in self.plan.actions.items():
            if a.kind != "bias":
                continue
            w = self.ckpt.tensors[a.source]
            beta = a.norm.shift
            b = self.ckpt.read(name).reshape(-1)
            if a.axis == len(w.shape) - 1:
                cols = w.shape[-1]
                rows = w.numel // cols
                isz = DTYPES[w.dtype].itemsize
                res = np.empty(rows, dtype=DTYPES[a.out_dtype])
                step = max(1, self.chunk_bytes // max(1, cols * isz))
                buf = np.empty(step * cols * isz, dtype=np.uint8)
                with open(w.path, "rb", buffering=0) as f:
                    for i in range(0, rows, step):
                        n = min(step, rows - i)
                        chunk = buf[: n * cols * isz]
                        pread_into(f.fileno(), chunk, w.begin + i * cols * isz, w.path)
                        res[i:i + n] = fold_bias_rows(chunk.view(DTYPES[w.dtype]).reshape(n, cols), w.dtype,
                                                      beta, b[i:i + n], a.out_dtype)
            else:  # fused/transposed consumers with biases behind a biased LayerNorm: none known; small
                full = np.moveaxis(self.ckpt.read(a.source), a.axis, -1)
                res = fold_bias_rows(full.reshape(-1, full.shape[-1]), w.dtype, beta, b, a.out_dtype)
            out[name] = res.reshape(self.ckpt.tensors[name].shape)
        return out
