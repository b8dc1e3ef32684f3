"""Run read-only check jobs on threads: positional reads through cached file descriptors, and a pool.

The checks (:mod:`streamfold.check.taskcheck`) read the output once, piece by piece, and each piece also
feeds its file's ``SHA256SUMS`` hash (:class:`~streamfold.core.manifest.OrderedHasher`, which takes the
pieces of one file in order). Jobs are run in the order given, one file's jobs interleaved with the
others' (:func:`run_jobs`), so several files are read at once and a hash never waits long for its
predecessor. Every job runs even when one raises (a hash needs every piece); the first error is
re-raised at the end. Buffers are per thread (:class:`~streamfold.core.fold.Scratch`), so memory is
``workers`` x the largest piece, whatever the model size. Nothing is memory-mapped.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..core.fold import Scratch
from ..core.manifest import OrderedHasher
from ..core.reader import pread_into


@dataclass
class Job:
    """``nbytes`` output bytes to read and check (or only hash) with ``run(scratch)``."""

    nbytes: int
    run: Callable[[Scratch], None]


class Reader:
    """``pread`` into buffers through one read-only descriptor per file, counting the bytes read."""

    def __init__(self) -> None:
        self.fds: dict[str, int] = {}
        self.bytes_read = 0
        self.lock = threading.Lock()

    def read(self, path: Path, offset: int, buf: np.ndarray) -> None:
        key = str(path)
        with self.lock:
            fd = self.fds.get(key)
            if fd is None:
                fd = self.fds[key] = os.open(path, os.O_RDONLY)
        pread_into(fd, buf, offset, path)
        with self.lock:
            self.bytes_read += buf.nbytes

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def feed(hasher: OrderedHasher | None, offset: int, buf, fail: str | None = None) -> None:
    """Pass bytes read at ``offset`` to a file's hash (or, with ``fail``, mark that range unreadable)."""
    if hasher is not None:
        hasher.feed(offset, buf if fail is None else len(buf), fail)


def interleave(groups: list[list[Job]]) -> list[Job]:
    """One job of each group in turn (each group keeps its order), so several files are read at once."""
    out: list[Job] = []
    its = [iter(g) for g in groups if g]
    while its:
        nxt = []
        for it in its:
            j = next(it, None)
            if j is not None:
                out.append(j)
                nxt.append(it)
        its = nxt
    return out


def run_jobs(groups: list[list[Job]], workers: int, progress: Callable[[int], Callable[[int], None]] | None = None
             ) -> None:
    """Run every job of ``groups`` (one group per output file) on ``workers`` threads.

    ``progress(total_bytes)`` returns a ``tick(nbytes)`` called after each job."""
    jobs = interleave(groups)
    tick = progress(sum(j.nbytes for j in jobs)) if progress else None
    local = threading.local()
    lock = threading.Lock()
    errors: list[BaseException] = []

    def go(job: Job) -> None:
        s = getattr(local, "scratch", None)
        if s is None:
            s = local.scratch = Scratch()
        try:
            job.run(s)
        except BaseException as e:  # noqa: BLE001 - re-raised after every job ran (hash chains need all)
            with lock:
                errors.append(e)
        if tick is not None:
            with lock:
                tick(job.nbytes)

    if workers <= 1:
        for j in jobs:
            go(j)
    else:
        with ThreadPoolExecutor(workers, thread_name_prefix="streamfold-verify") as pool:
            list(pool.map(go, jobs))
    if errors:
        raise errors[0]
