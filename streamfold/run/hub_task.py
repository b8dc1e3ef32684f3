"""One task from a Hub source, wherever it runs: fetch its source shards, write its shard, check it,
pre-upload it, delete what it fetched and wrote.

Shared by the streaming Hub path on this machine (:mod:`streamfold.run.stream`: the same steps, task after
task) and the Ray tasks (:mod:`streamfold.run.ray_executor`: :func:`run_hub_task` on each worker).
"""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

from .conversion import run_task
from ..core.dtypes import DTYPES
from ..core.errors import StreamfoldError
from ..hub.push import preupload
from ..hub.remote import HubRef, fetch_ranges, fetch_sources
from ..planning.tasks import Op, Task


class StreamVerifyFailed(StreamfoldError):
    """``--stream --verify`` (or ``--ray --verify`` from a Hub repo) found a wrong shard: nothing was
    committed or published (CLI exit status 3)."""


def disk_used(*paths: Path) -> int:
    """Bytes actually allocated under the folders or files (sparse stubs count only their headers)."""
    total = 0
    for path in paths:
        for root, _, files in os.walk(path) if path.is_dir() else [(path.parent, [], [path.name])]:
            for f in files:
                try:
                    total += os.stat(os.path.join(root, f)).st_blocks * 512
                except OSError:
                    pass
    return total


def scale_ranges(task: Task) -> dict[str, list[tuple[int, int]]]:
    """The source files ``task`` reads only for ``dequant`` scale rows (scales in another shard than their
    weight), with those byte ranges: fetched by range requests instead of downloading the shard."""
    whole = {c.src for c in task.chunks if c.src} | {c.weight[0] for c in task.chunks if c.op == Op.BIAS}
    out: dict[str, list[tuple[int, int]]] = {}
    for c in task.chunks:
        if c.op == Op.DEQUANT and c.scale[0] not in whole:
            sfile, soff, sdtype, sshape = c.scale
            out.setdefault(sfile, []).append((soff, soff + math.prod(sshape) * DTYPES[sdtype].itemsize))
    return out


def fetch_task_sources(ref: HubRef, task: Task, folder: Path, ranged: Path,
                       have: dict[str, Path] | None = None) -> tuple[dict[str, Path], dict[str, Path]]:
    """``task``'s source files: shards it reads whole downloaded into ``folder`` (except those in
    ``have``: re-used), shards it reads only scale rows from as sparse range-fetched stand-ins in
    ``ranged`` (not for re-use: a later task may need the whole shard). Returns (``have`` plus the
    downloads, the stand-ins: delete them after the task); the task's sources are the two merged."""
    have = dict(have or {})
    parts = {s: r for s, r in scale_ranges(task).items() if s not in have}
    full = fetch_sources(ref, [s for s in task.sources if s not in parts], folder, have)
    return full, {s: fetch_ranges(ref, s, task.sources[s].size, r, ranged) for s, r in parts.items()}


def check_shard(task: Task, path: Path, sources: dict[str, Path]) -> None:
    """Check one written shard against its task (``--verify``); a wrong one is deleted and raises."""
    from ..check.taskcheck import check_task
    problems = check_task(task, path, sources)
    if problems:
        path.unlink(missing_ok=True)  # never left under its final name for a later run to adopt
        raise StreamVerifyFailed(f"verification of {task.shard} failed, nothing committed or published: {problems[0]}"
                                 + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))


def ship_shard(task: Task, out: Path, push_to_hub: str, token=None):
    """Pre-upload ``out/task.shard`` to ``push_to_hub`` and delete it; returns the commit operation."""
    op = preupload(push_to_hub, out / task.shard, task.shard, token)
    (out / task.shard).unlink()
    return op


def run_hub_task(task: Task, ref: HubRef, work: Path, out_dir: Path | None = None, *, workers=None,
                 memory_budget=None, hash_output=False, verify=False, push_to_hub: str | None = None,
                 push_token=None, progress=None) -> dict:
    """One task from a Hub source, in a folder ``work`` of its own (removed first, as a killed attempt
    may have left it, and at the end): fetch its source shards, write its shard into ``out_dir``
    (default: inside ``work``), check it, pre-upload and delete it when ``push_to_hub``.

    Returns ``{"shard", "size", "sha256", "op", "peak_disk", "dequant"}`` (``op``: the commit operation, or
    None; ``dequant``: the shard's dequantized-element counts, :class:`ShardResult`)."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        full, stubs = fetch_task_sources(ref, task, work / "src", work / "ranges")
        sources = {**full, **stubs}
        out = out_dir if out_dir is not None else work / "out"
        out.mkdir(exist_ok=True)
        r = run_task(task, out, src=sources, workers=workers, memory_budget=memory_budget,
                     hash_output=hash_output, progress=progress)
        peak = disk_used(work) + (disk_used(out / task.shard) if out_dir is not None else 0)
        if verify:
            check_shard(task, out / task.shard, sources)
        op = ship_shard(task, out, push_to_hub, push_token) if push_to_hub else None
        return {"shard": r.shard, "size": r.size, "sha256": r.sha256, "op": op, "peak_disk": peak,
                "dequant": r.dequant}
    finally:
        shutil.rmtree(work, ignore_errors=True)
