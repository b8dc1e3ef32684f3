"""A conversion plan for a Hub repo made without downloading its weights.

Each source shard becomes a local header-only stub (its header fetched by an HTTP range request, the
rest a sparse hole of the right size) beside the small files (config, index, tokenizer, ...), and the
norm vectors are read by range requests too. The plan's tasks then run wherever their source shards are
fetched (:func:`streamfold.hub.remote.fetch_sources`). Used by ``--stream`` and by ``--ray`` with a repo
id SRC.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np

from ..core.dtypes import DTYPES
from ..core.errors import StreamfoldError
from ..core.reader import INDEX_NAME, SINGLE_NAME
from ..hub.client import Source, _api, _constants, _guard, select_files
from ..hub import remote
from ..hub.remote import HubRef
from ..hub.source import _shards_from_index, download_file
from .conversion import plan


def plan_remote(repo: str, folder: Path, *, revision: str | None = None, token=None, **plan_options):
    """Plan the conversion of Hub repo ``repo`` from remote headers and range-read norm vectors.

    ``folder`` (created) receives the small files and the header-only shard stubs; it must live until
    ``finish`` has copied the small files. ``plan_options``: as for :func:`streamfold.run.conversion.plan`.
    Returns ``(ConversionPlan, HubRef)``."""
    api = _api(token)
    with _guard(repo, revision, "fetching repo info"):
        info = api.model_info(repo, revision=revision, files_metadata=True, token=token)
    commit = info.sha
    sizes = {s.rfilename: s.size for s in (info.siblings or [])}
    folder.mkdir(parents=True, exist_ok=True)
    if INDEX_NAME in sizes:
        shards = _shards_from_index(download_file(repo, INDEX_NAME, commit, folder, token), repo)
    elif SINGLE_NAME in sizes:
        shards = [SINGLE_NAME]
    else:
        raise StreamfoldError(f"{repo}: no {SINGLE_NAME} or {INDEX_NAME} in the repo")
    if "config.json" not in sizes:
        raise StreamfoldError(f"{repo}: no config.json in the repo; a Hugging Face checkpoint needs one")
    take, skipped = select_files(sorted(sizes), shards)
    for rel in take:  # the small files, straight into the folder
        if rel not in shards and rel != INDEX_NAME:
            download_file(repo, rel, commit, folder, token)
    for s in shards:
        if sizes.get(s) is None:
            raise StreamfoldError(f"{repo}: {INDEX_NAME} names shard {s} that the repo does not have")
        with open(folder / s, "wb") as f:  # header-only stub: the data is a sparse hole
            f.write(remote.remote_header(repo, s, commit, sizes[s], token))
            f.truncate(sizes[s])
    shutil.rmtree(folder / ".cache", ignore_errors=True)

    def read(t):  # a norm vector, by range request
        raw = remote.read_range(repo, t.path.name, commit, t.begin, t.end, token)
        return np.frombuffer(raw, dtype=DTYPES[t.dtype]).reshape(t.shape).copy()
    source = Source(path=folder, display=repo, repo_id=repo, revision=revision, commit=commit, files=set(take),
                    skipped=skipped)
    cplan = plan(folder, source=source, read=read, **plan_options)
    return cplan, HubRef(repo, commit, str(_constants().ENDPOINT), token if isinstance(token, str) else None)
