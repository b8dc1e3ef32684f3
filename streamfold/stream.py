"""Bounded-disk Hub to Hub conversion (``SRC`` a repo id, ``--push-to-hub REPO --stream``).

The plan is made without downloading any weights: each source shard is a local header-only stub
(its header fetched by an HTTP range request, the rest a sparse hole of the right size), and the
norm vectors are fetched by range requests too. Then, task by task: download the source shards the
task reads (usually one), write its output shard, check it (``--verify``), pre-upload it
(huggingface_hub ``preupload_lfs_files``), delete it and every source shard no later task needs.
One commit at the end adds every shard and the small files; if any shard or check fails nothing is
committed. Peak local disk is about one source shard plus one output shard (plus a source shard a
bias fold in another shard needs), not the model twice.
"""
from __future__ import annotations

import os
import shutil
import struct
import tempfile
import time
from pathlib import Path

import numpy as np

from . import hub
from .conversion import finish, plan
from .dtypes import DTYPES
from .errors import StreamfoldError
from .reader import INDEX_NAME, SINGLE_NAME


class StreamVerifyFailed(StreamfoldError):
    """``--stream --verify`` found a wrong shard: nothing was committed (CLI exit status 3)."""


def _header(repo: str, name: str, commit: str, size: int, token) -> bytes:
    head = hub.read_range(repo, name, commit, 0, min(size, 100_000), token)
    if len(head) < 8:
        raise StreamfoldError(f"{repo}: {name}: not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", head[:8])
    if 8 + n > size:
        raise StreamfoldError(f"{repo}: {name}: header length {n} does not fit in the {size}-byte file")
    return head[: 8 + n] if 8 + n <= len(head) else head[:8] + hub.read_range(repo, name, commit, 8, 8 + n, token)


def _disk(*folders: Path) -> int:
    """Bytes actually allocated under the folders (sparse stubs count only their headers)."""
    total = 0
    for folder in folders:
        for root, _, files in os.walk(folder):
            for f in files:
                try:
                    total += os.stat(os.path.join(root, f)).st_blocks * 512
                except OSError:
                    pass
    return total


def stream_convert(repo: str, dst: Path, *, push_to_hub: str, revision=None, token=None, mode="compat",
                   merged_dtype="source", rules=None, workers=None, memory_budget=None, manifest=False,
                   verify=False, base_model=None, private=False, commit_message=None, progress=None) -> dict:
    """Convert Hub repo ``repo`` into ``push_to_hub`` shard by shard; ``dst`` keeps the small files.

    Returns ``{"plan", "url", "peak_disk", "shards"}``."""
    from . import __version__
    api = hub._api(token)
    with hub._guard(repo, revision, "fetching repo info"):
        info = api.model_info(repo, revision=revision, files_metadata=True, token=token)
    commit = info.sha
    sizes = {s.rfilename: s.size for s in (info.siblings or [])}
    dst.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{dst.name}.stream-", dir=dst.parent))
    stub, dl, out = work / "src", work / "dl", work / "out"
    for d in (stub, dl, out):
        d.mkdir()
    peak = 0
    try:
        if INDEX_NAME in sizes:
            shards = hub._shards_from_index(hub.download_file(repo, INDEX_NAME, commit, stub, token), repo)
        elif SINGLE_NAME in sizes:
            shards = [SINGLE_NAME]
        else:
            raise StreamfoldError(f"{repo}: no {SINGLE_NAME} or {INDEX_NAME} in the repo")
        if "config.json" not in sizes:
            raise StreamfoldError(f"{repo}: no config.json in the repo; a Hugging Face checkpoint needs one")
        take, skipped = hub.select_files(sorted(sizes), shards)
        for rel in take:  # the small files, straight into the stub folder
            if rel not in shards and rel != INDEX_NAME:
                hub.download_file(repo, rel, commit, stub, token)
        for s in shards:
            if sizes.get(s) is None:
                raise StreamfoldError(f"{repo}: {INDEX_NAME} names shard {s} that the repo does not have")
            with open(stub / s, "wb") as f:  # header-only stub: the data is a sparse hole
                f.write(_header(repo, s, commit, sizes[s], token))
                f.truncate(sizes[s])
        shutil.rmtree(stub / ".cache", ignore_errors=True)

        def read(t):  # a norm vector, by range request
            raw = hub.read_range(repo, t.path.name, commit, t.begin, t.end, token)
            return np.frombuffer(raw, dtype=DTYPES[t.dtype]).reshape(t.shape).copy()
        source = hub.Source(path=stub, display=repo, repo_id=repo, revision=revision, commit=commit,
                            files=set(take), skipped=skipped)
        cplan = plan(stub, mode=mode, merged_dtype=merged_dtype, rules=rules, workers=workers,
                     memory_budget=memory_budget, source=source, read=read)
        hub.ensure_repo(push_to_hub, private=private, token=token)
        last_use = {s: i for i, t in enumerate(cplan.tasks) for s in t.sources}
        local: dict[str, Path] = {}
        ops, digests = [], {}
        tick = progress(sum(t.src_bytes for t in cplan.tasks)) if progress else None
        from .conversion import run_task
        for i, task in enumerate(cplan.tasks):
            for s in task.sources:
                if s not in local:
                    local[s] = hub.download_file(repo, s, commit, dl, token)
            peak = max(peak, _disk(work))
            r = run_task(task, out, src=local, workers=workers, memory_budget=memory_budget, hash_output=manifest,
                         progress=tick)
            peak = max(peak, _disk(work))
            if verify:
                from .taskcheck import check_task
                problems = check_task(task, out / task.shard, local)
                if problems:
                    raise StreamVerifyFailed(f"verification of {task.shard} failed, nothing committed: {problems[0]}"
                                          + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
            if r.sha256:
                digests[task.shard] = r.sha256
            ops.append(hub.preupload(push_to_hub, out / task.shard, task.shard, token))
            (out / task.shard).unlink()
            for s in [s for s in local if last_use[s] <= i]:
                local.pop(s).unlink()
        shutil.rmtree(dl / ".cache", ignore_errors=True)
        finish(cplan, out, digests=digests, manifest=manifest, base_model=base_model, push_to_hub=push_to_hub,
               private=private, workers=workers, shards_present=False, dst=dst)
        small = sorted(p for p in out.rglob("*") if p.is_file())
        from huggingface_hub import CommitOperationAdd
        ops += [CommitOperationAdd(path_in_repo=p.relative_to(out).as_posix(), path_or_fileobj=str(p)) for p in small]
        msg = commit_message or f"FlashNorm ({cplan.plan.mode}) conversion of {repo} with streamfold {__version__}"
        result = hub.commit(push_to_hub, ops, msg, private=private, token=token)
        for p in small:  # DST keeps the small files (index, config, card, tokenizer, manifest)
            (dst / p.relative_to(out)).parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(p), dst / p.relative_to(out))
        return {"plan": cplan, "url": result.url, "peak_disk": peak, "shards": len(cplan.tasks),
                "seconds": time.perf_counter()}
    finally:
        shutil.rmtree(work, ignore_errors=True)
