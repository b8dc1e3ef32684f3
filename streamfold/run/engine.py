"""Execute tasks: fold on worker threads, write from one thread, through bounded buffers.

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
import mmap
import os
import queue
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..core.dtypes import DTYPES
from ..core.fold import Scratch, fold_bias_rows, scale_chunk
from ..core.reader import pread_into
from ..planning.tasks import DEFAULT_BUDGET, Chunk, Op, Task, chunk_bytes_for, default_workers
from ..core.writer import pwrite_all
from .dequant_job import DequantCounts, dequant_job

WRITEBACK_STEP = 64 << 20
PARTIAL_SUFFIX = ".partial"
# on_done(shard, size, sha256 or None): a shard is complete and has its final name
ShardDone = Callable[[str, int, "str | None"], None]

__all__ = ["Engine", "DEFAULT_BUDGET", "default_workers", "partial_name", "PARTIAL_SUFFIX"]


def partial_name(shard: str) -> str:
    """The name a shard is written under until it is complete (never mistaken for a finished shard)."""
    return f".{shard}.{os.getpid()}{PARTIAL_SUFFIX}"


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

    def written(self, shard: str, end: int, complete: Callable[[str], None] | None = None) -> None:
        """Hash ``shard`` up to ``end``; then, if given, call ``complete(hexdigest)`` on this thread."""
        self.todo.put((shard, end, complete))

    def _loop(self) -> None:
        buf = np.empty(8 << 20, dtype=np.uint8)
        while (item := self.todo.get()) is not None:
            if self.error is not None:
                continue
            shard, end, complete = item
            try:
                while self.pos[shard] < end:
                    n = min(buf.nbytes, end - self.pos[shard])
                    pread_into(self.fds[shard], buf[:n], self.pos[shard], shard)
                    self.hashes[shard].update(memoryview(buf)[:n])
                    self.pos[shard] += n
                if complete is not None:
                    complete(self.hashes[shard].hexdigest())
            except BaseException as e:  # surfaced by finish()
                self.error = e

    def finish(self, sizes: dict[str, int]) -> dict[str, str]:
        """Hash each shard to its full size and return the hex digests."""
        for shard, size in sizes.items():
            self.todo.put((shard, size, None))
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
    """Runs tasks: opens their source and output files, turns chunk records into jobs, runs them.

    The output depends only on the tasks and the source bytes, never on ``workers``, the budget or
    the order tasks are given in. Each shard is written under a temporary name
    (:func:`partial_name`) and renamed to its own name once every byte of it is written.
    """

    def __init__(self, workers: int | None = None, memory_budget: int | None = None) -> None:
        self.workers = max(1, workers or default_workers())
        budget = memory_budget or DEFAULT_BUDGET
        # Buffers: one source chunk per folding thread, plus `slots` output chunks (up to 2x a
        # source chunk for float32 merged) queued for the writer.
        folders = max(1, self.workers - 1)
        self.chunk_bytes = chunk_bytes_for(self.workers, budget)
        # Every output slot the budget allows: folding runs further ahead while the writer is busy
        # with a long kernel copy, and the writer rarely waits for a fold (measured: fewer idle gaps).
        self.slots = max(folders + 2, (budget - folders * self.chunk_bytes) // (2 * self.chunk_bytes))
        self.counts = DequantCounts()  # exact / rounded elements of dequantized tensors, per shard

    def run(self, tasks: list[Task], sources: Path | dict[str, Path], out_dir: Path,
            progress: Callable[[int], None] | None = None, hash_outputs: bool = False,
            on_done: ShardDone | None = None, check_sources: bool = True) -> dict[str, str]:
        """Write every task's shard into ``out_dir``; with ``hash_outputs``, return their sha256.

        ``sources`` is the source folder, or a map of source file name -> path. ``on_done`` is called
        as each shard is completed (on the writer or hashing thread)."""
        out_dir = Path(out_dir)
        names = sorted({s for t in tasks for s in t.sources})
        paths = {s: (sources[s] if isinstance(sources, dict) else Path(sources) / s) for s in names}
        if check_sources:
            for t in tasks:
                t.check_sources(paths)
        layouts = {t.shard: t.layout() for t in tasks}
        src_fds: dict[str, int] = {}
        dst_fds: dict[str, int] = {}
        partials: dict[str, Path] = {}
        hasher = None
        try:
            for s in names:
                src_fds[s] = os.open(paths[s], os.O_RDONLY)
            for t in tasks:
                partials[t.shard] = out_dir / partial_name(t.shard)
                dst_fds[t.shard] = layouts[t.shard].create(partials[t.shard])
            jobs: list[Job] = []
            for t in tasks:
                before = len(jobs)
                jobs.extend(self._jobs(t, src_fds, dst_fds[t.shard], paths))
                for j in jobs[before:]:
                    j.shard = t.shard
            hasher = TrailingHasher(dst_fds) if hash_outputs else None
            left = dict.fromkeys(dst_fds, 0)
            for j in jobs:
                left[j.shard] += 1
            flushed = dict.fromkeys(dst_fds, 0)

            def complete(shard: str, digest: str | None = None) -> None:
                os.rename(partials.pop(shard), out_dir / shard)
                if on_done is not None:
                    on_done(shard, layouts[shard].file_bytes, digest)

            def finished(shard: str) -> None:
                if hasher is not None:
                    hasher.written(shard, layouts[shard].file_bytes, lambda d, s=shard: complete(s, d))
                else:
                    complete(shard)

            for shard, n in left.items():
                if n == 0:  # a shard with no tensor data (header only)
                    finished(shard)

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
                left[job.shard] -= 1
                if left[job.shard] == 0:
                    finished(job.shard)
                if progress is not None:
                    progress(job.nbytes)
            if self.workers == 1:
                self._run_serial(jobs, done)
            else:
                self._run_pipelined(jobs, done)
            digests = hasher.finish({s: l.file_bytes for s, l in layouts.items()}) if hasher else {}
            hasher = None
            return digests
        finally:
            if hasher is not None:
                hasher.abort()
            for fd in (*src_fds.values(), *dst_fds.values()):
                os.close(fd)
            for p in partials.values():  # shards not completed: nothing half-written is left
                try:
                    os.unlink(p)
                except OSError:
                    pass

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

    def _jobs(self, task: Task, src_fds: dict[str, int], dst_fd: int, paths: dict[str, Path]) -> list[Job]:
        jobs: list[Job] = []
        copy_scratch = Scratch()
        # one multiplier object per norm: Scratch caches the tiled vector by identity
        rowvec = {k: v["scale"].reshape(1, -1) for k, v in task.norms.items() if "scale" in v}
        biases = {c.tensor: self._bias(task, c, src_fds, paths) for c in task.chunks if c.op == Op.BIAS}
        for c in task.chunks:
            if c.op == Op.COPY:
                fd = src_fds[c.src]
                jobs.append(Job(c.src_bytes, lambda _, c=c, fd=fd: copy_range(fd, dst_fd, c.src_off, c.dst, c.size,
                                                                              copy_scratch), end=c.dst + c.size))
            elif c.op == Op.FOLD:
                jobs.append(self._fold_job(c, task.norms[c.norm]["scale"], rowvec[c.norm], src_fds[c.src],
                                           dst_fd, paths[c.src]))
            elif c.op == Op.FILL:
                data = np.full(c.shape, c.value, dtype=DTYPES[c.out_dtype])
                jobs.append(Job(c.src_bytes, lambda _, d=data, o=c.dst: pwrite_all(dst_fd, d, o), end=c.dst + c.size))
            elif c.op == Op.DEQUANT:
                g = task.norms[c.norm]["scale"] if c.norm else None
                jobs.append(dequant_job(c, g, src_fds, dst_fd, paths, with_source_window, Job,
                                        self.counts.adder(task.shard)))
            elif c.op == Op.BIAS:
                data = biases[c.tensor]
                jobs.append(Job(c.src_bytes, lambda _, d=data, o=c.dst: pwrite_all(dst_fd, d, o), end=c.dst + c.size))
            else:  # pragma: no cover
                raise AssertionError(c.op)
        return jobs

    @staticmethod
    def _fold_job(c: Chunk, scale: np.ndarray, rowvec: np.ndarray, src_fd: int, dst_fd: int, path) -> Job:
        r0, r1 = c.rows
        n, cols = r1 - r0, c.cols
        sdt, odt = DTYPES[c.src_dtype], DTYPES[c.out_dtype]

        def compute(s: Scratch, out: np.ndarray) -> None:
            m = scale[np.arange(r0, r1) % c.width].reshape(n, 1) if c.per_row else rowvec

            def fold(src: np.ndarray) -> None:
                scale_chunk(src.view(sdt).reshape(n, cols), m, c.src_dtype, c.out_dtype,
                            out.view(odt).reshape(n, cols), s)
            with_source_window(src_fd, c.src_off, c.src_bytes, path, fold)

        def write(out: np.ndarray) -> None:
            pwrite_all(dst_fd, out, c.dst)
        return Job(c.src_bytes, write, compute, c.size, end=c.dst + c.size)

    @staticmethod
    def _bias(task: Task, c: Chunk, src_fds: dict[str, int], paths: dict[str, Path]) -> np.ndarray:
        """``b + W @ beta`` for a consumer of a LayerNorm with a non-zero bias (W unscaled), each element
        the exact sum rounded once (:func:`fold.fold_bias_rows`)."""
        wfile, wbegin, wdtype, wshape = c.weight
        beta = task.norms[c.norm]["shift"]
        b = _read(src_fds[c.src], c.src_off, c.src_dtype, c.shape, paths[c.src]).reshape(-1)
        isz = DTYPES[wdtype].itemsize
        if c.axis == len(wshape) - 1:
            cols = wshape[-1]
            rows = (int(np.prod(wshape)) // cols) if cols else 0
            res = np.empty(rows, dtype=DTYPES[c.out_dtype])
            buf = np.empty(c.step * cols * isz, dtype=np.uint8)
            for i in range(0, rows, c.step):
                n = min(c.step, rows - i)
                chunk = buf[: n * cols * isz]
                pread_into(src_fds[wfile], chunk, wbegin + i * cols * isz, paths[wfile])
                res[i:i + n] = fold_bias_rows(chunk.view(DTYPES[wdtype]).reshape(n, cols), wdtype, beta, b[i:i + n],
                                              c.out_dtype)
        else:  # fused/transposed consumers with biases behind a biased LayerNorm: none known; small
            full = np.moveaxis(_read(src_fds[wfile], wbegin, wdtype, wshape, paths[wfile]), c.axis, -1)
            res = fold_bias_rows(full.reshape(-1, full.shape[-1]), wdtype, beta, b, c.out_dtype)
        return res.reshape(c.shape)


def _read(fd: int, offset: int, dtype: str, shape: tuple[int, ...], path) -> np.ndarray:
    buf = np.empty(int(np.prod(shape)) * DTYPES[dtype].itemsize, dtype=np.uint8)
    pread_into(fd, buf, offset, path)
    return buf.view(DTYPES[dtype]).reshape(shape)
