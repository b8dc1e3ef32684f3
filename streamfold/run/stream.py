"""Bounded-disk Hub to Hub conversion (``SRC`` a repo id, ``--push-to-hub REPO --stream [--ray]``).

The plan is made without downloading any weights (:func:`streamfold.hub.remote.plan_remote`: remote
headers, range-read norm vectors). Then, task by task: download the source shards the task reads
(usually one), write its output shard, check it (``--verify``), pre-upload it (huggingface_hub
``preupload_lfs_files``), delete it and every source shard no later task needs. One commit at the
end adds every shard and the small files; if any shard or check fails nothing is committed. Peak
local disk is about one source shard plus one output shard (plus a source shard a bias fold in
another shard needs), not the model twice.

With ``--ray`` each output shard is one Ray task doing the same on its worker
(:func:`streamfold.run.hub_task.run_hub_task`: fetch into a per-task folder of the worker's temporary
directory, run, check, pre-upload, delete) and returning the upload's commit operation; the driver
makes the one commit. Each worker's peak disk is its task's source shard(s) plus its output shard.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from .conversion import finish, run_task
from ..hub.push import commit, ensure_repo
from ..hub.remote import HubRef
from ..quant.counts import merge_counts
from .hub_plan import plan_remote
from .hub_task import check_shard, disk_used, fetch_task_sources, ship_shard


def stream_convert(repo: str, dst: Path, *, push_to_hub: str, revision=None, token=None, mode="compat",
                   merged_dtype="source", rules=None, workers=None, memory_budget=None, manifest=False,
                   verify=False, base_model=None, private=False, commit_message=None, progress=None,
                   executor: str = "local", ray_address: str | None = None, dequantize=None) -> dict:
    """Convert Hub repo ``repo`` into ``push_to_hub`` shard by shard; ``dst`` keeps the small files.

    Returns ``{"plan", "url", "peak_disk", "shards", "dequant"}`` (with Ray, ``peak_disk`` is the largest
    of any one task on its worker; ``dequant``: ``{tensor: [exact, rounded]}`` with ``dequantize``)."""
    from ..core.version import __version__
    if executor == "ray":
        from .ray_executor import require_ray
        require_ray()
    dst.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dst.name}.stream-", dir=dst.parent))
    stub, dl, out = work / "src", work / "dl", work / "out"
    for d in (dl, out):
        d.mkdir()
    try:
        cplan, ref = plan_remote(repo, stub, revision=revision, token=token, mode=mode, merged_dtype=merged_dtype,
                                 rules=rules, workers=workers, memory_budget=memory_budget,
                                 **({"dequantize": dequantize} if dequantize else {}))
        ensure_repo(push_to_hub, private=private, token=token)
        if executor == "ray":
            from .ray_executor import run_on_ray
            results = run_on_ray(cplan.tasks, None, None, address=ray_address, workers=workers,
                                 memory_budget=memory_budget, hash_outputs=manifest, hub=ref, verify=verify,
                                 push_to_hub=push_to_hub)
            ops = [results[t.shard]["op"] for t in cplan.tasks]
            digests = {s: r["sha256"] for s, r in results.items() if r["sha256"]}
            peak = max((r["peak_disk"] for r in results.values()), default=0)
            counts = merge_counts(r.get("dequant") for r in results.values())
        else:
            ops, digests, peak, counts = _stream_here(cplan, ref, dl, out, workers=workers,
                                                      memory_budget=memory_budget, manifest=manifest, verify=verify,
                                                      push_to_hub=push_to_hub, token=token, progress=progress)
        finish(cplan, out, digests=digests, manifest=manifest, base_model=base_model, push_to_hub=push_to_hub,
               private=private, workers=workers, shards_present=False, dst=dst, dequant_counts=counts)
        small = sorted(p for p in out.rglob("*") if p.is_file())
        from huggingface_hub import CommitOperationAdd
        ops += [CommitOperationAdd(path_in_repo=p.relative_to(out).as_posix(), path_or_fileobj=str(p)) for p in small]
        msg = commit_message or f"FlashNorm ({cplan.plan.mode}) conversion of {repo} with streamfold {__version__}"
        result = commit(push_to_hub, ops, msg, private=private, token=token)
        for p in small:  # DST keeps the small files (index, config, card, tokenizer, manifest)
            (dst / p.relative_to(out)).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(p), dst / p.relative_to(out))
        return {"plan": cplan, "url": result.url, "peak_disk": peak, "shards": len(cplan.tasks), "dequant": counts}
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _stream_here(cplan, ref: HubRef, dl: Path, out: Path, *, workers, memory_budget, manifest, verify,
                 push_to_hub, token, progress) -> tuple[list, dict[str, str], int, dict | None]:
    """The tasks one after another on this machine, each source shard fetched once and deleted after
    the last task that reads it whole (a shard a task reads only scale rows from is range-fetched for
    that task: :func:`streamfold.run.hub_task.fetch_task_sources`). Returns (commit operations, shard
    sha256s, peak disk, dequantized-element counts)."""
    last_use = {s: i for i, t in enumerate(cplan.tasks) for s in t.sources}
    local: dict[str, Path] = {}
    ops, digests, peak, counts = [], {}, 0, []
    tick = progress(sum(t.src_bytes for t in cplan.tasks)) if progress else None
    for i, task in enumerate(cplan.tasks):
        local, stubs = fetch_task_sources(ref, task, dl, dl.parent / "ranges", local)
        sources = {**local, **stubs}
        peak = max(peak, disk_used(dl.parent))
        r = run_task(task, out, src=sources, workers=workers, memory_budget=memory_budget, hash_output=manifest,
                     progress=tick)
        peak = max(peak, disk_used(dl.parent))
        if verify:
            check_shard(task, out / task.shard, sources)
        if r.sha256:
            digests[task.shard] = r.sha256
        counts.append(r.dequant)
        ops.append(ship_shard(task, out, push_to_hub, token))
        for p in stubs.values():
            p.unlink()
        for s in [s for s in local if last_use[s] <= i]:
            local.pop(s).unlink()
    shutil.rmtree(dl / ".cache", ignore_errors=True)
    return ops, digests, peak, merge_counts(counts)
