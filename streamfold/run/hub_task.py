"""One task from a Hub source, wherever it runs: fetch its source shards, write its shard, check it,
pre-upload it, delete what it fetched and wrote.

Shared by the streaming Hub path on this machine (:mod:`streamfold.run.stream`: the same steps, task after
task) and the Ray tasks (:mod:`streamfold.run.ray_executor`: :func:`run_hub_task` on each worker).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from .conversion import run_task
from ..core.errors import StreamfoldError
from ..hub.push import preupload
from ..hub.remote import HubRef, fetch_sources
from ..planning.tasks import Task


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
        sources = fetch_sources(ref, task.sources, work / "src")
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
