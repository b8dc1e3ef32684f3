"""A Hub repo id as SRC: resolve the revision to a commit, download only the needed files, or use the cache.

Downloads go through huggingface_hub's cache, so ``HF_HOME`` / ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE`` and
``HF_TOKEN`` behave as they do everywhere else in the Hugging Face stack.

Only the files a converted checkpoint needs are fetched: the safetensors shards the index names (or
``model.safetensors``), the index, ``config.json``, tokenizer files and other small files. Other formats
of the same weights (``*.bin``, ``*.pth``, ``consolidated.*``, ``original/``, ONNX, ...) are never
downloaded: they would double the download and, copied beside the folded weights, load unfolded.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from ..core.errors import StreamfoldError
from .client import (Source, _api, _cache_dir, _guard, _is_network_error, _listing, _offline, _quiet_bars,
                  is_repo_id, select_files)
from ..core.reader import INDEX_NAME, SINGLE_NAME


def _exact_pattern(path: str) -> str:
    """An fnmatch pattern matching exactly ``path`` (for snapshot_download's allow_patterns)."""
    return re.sub(r"([*?\[])", r"[\1]", path)


def resolve_source(src: str | os.PathLike, *, revision: str | None = None, token: str | bool | None = None,
                   quiet: bool = True) -> Source:
    """The local folder to read for ``src``: an existing path as is (a local path always wins), or a Hub
    repo id ``org/name`` downloaded (only the needed files) into huggingface_hub's cache."""
    text = os.fspath(src)
    path = Path(text)
    if path.exists():
        if revision is not None:
            raise StreamfoldError(f"{text}: --revision applies to Hub repo ids, but this is a local folder")
        return Source(path=path, display=str(path))
    if not is_repo_id(text):
        raise StreamfoldError(f"{text}: no such folder, and not a Hub repo id (org/name); give a local "
                              "checkpoint folder or a repo id")
    if _offline():
        return _from_cache(text, revision)
    with _quiet_bars(quiet):
        return _download(text, revision, token)


def _shards_from_index(index_path: Path, repo_id: str) -> list[str]:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        shards = list(dict.fromkeys(weight_map.values()))
        if not all(isinstance(s, str) for s in shards):
            raise TypeError
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError):
        raise StreamfoldError(f"{repo_id}: {INDEX_NAME} is not a valid index (needs a \"weight_map\" of "
                              "tensor name -> shard file)") from None
    return shards


def _from_cache(repo_id: str, revision: str | None) -> Source:
    """Offline: the cached snapshot of ``repo_id`` at ``revision`` (a branch, tag or commit)."""
    api = _api(None)
    with _guard(repo_id, revision, "reading the local cache"):
        folder = Path(api.snapshot_download(repo_id, revision=revision, local_files_only=True,
                                            allow_patterns=["config.json"]))
    listing = _listing(folder)
    if INDEX_NAME in listing:
        shards = _shards_from_index(folder / INDEX_NAME, repo_id)
    elif SINGLE_NAME in listing:
        shards = [SINGLE_NAME]
    else:
        raise StreamfoldError(f"{repo_id}: the cached snapshot ({folder}) has no {SINGLE_NAME} or {INDEX_NAME} "
                              "and HF_HUB_OFFLINE is set; download it once online")
    missing = [s for s in shards if not (folder / s).is_file()]
    if missing:
        raise StreamfoldError(f"{repo_id}: the cached snapshot lacks shard {missing[0]} and HF_HUB_OFFLINE is "
                              "set; download it once online or unset HF_HUB_OFFLINE")
    take, skipped = select_files(listing, shards)
    return Source(path=folder, display=repo_id, repo_id=repo_id, revision=revision, commit=folder.name,
                  files=set(take), skipped=skipped, offline=True)


def _resolved_info(api, repo_id: str, revision: str | None, token, files_metadata: bool = False):
    """The repo's info at the commit ``revision`` (a branch, tag or commit; default the main branch) names.

    ``resolve_revision`` records ``revision -> commit`` in the cache's ``refs/`` as huggingface_hub does for
    its own downloads. Without it the cache would never learn which commit ``main`` is (downloads pinned
    to a commit record no ref), and offline runs or the fall back to the cache would not find the snapshot.
    """
    resolved = api.resolve_revision(repo_id, revision=revision, token=token)
    return api.model_info(repo_id, revision=resolved.resolved, files_metadata=files_metadata, token=token)


def _info_or_cache(api, repo_id: str, revision: str | None, token, files_metadata: bool = False):
    """:func:`_resolved_info`, or, when the Hub cannot be reached, the cached snapshot (a Source)."""
    with _guard(repo_id, revision, "fetching repo info"):
        try:
            return _resolved_info(api, repo_id, revision, token, files_metadata=files_metadata)
        except Exception as e:
            if _is_network_error(e):
                return _unreachable(e, repo_id, revision)
            raise


def _unreachable(e: BaseException, repo_id: str, revision: str | None) -> Source:
    """The Hub cannot be reached: the cached snapshot, as huggingface_hub falls back to, or one line."""
    try:
        return _from_cache(repo_id, revision)
    except StreamfoldError:
        first = (str(e).strip().splitlines() or [""])[0]
        raise StreamfoldError(f"{repo_id}: cannot reach the Hub ({type(e).__name__}: {first}) and the repo is not "
                              f"(completely) in the local cache ({_cache_dir()}); check the network connection") from None


def _download(repo_id: str, revision: str | None, token) -> Source:
    """Online: resolve the revision to a commit, pick the files, download them into the cache."""
    api = _api(token)
    info = _info_or_cache(api, repo_id, revision, token)
    if isinstance(info, Source):  # unreachable: the cached snapshot
        return info
    commit = info.sha
    listing = sorted(s.rfilename for s in (info.siblings or []))
    if INDEX_NAME in listing:
        with _guard(repo_id, revision, f"downloading {INDEX_NAME}"):
            index = api.hf_hub_download(repo_id, INDEX_NAME, revision=commit, token=token)
        shards = _shards_from_index(Path(index), repo_id)
        absent = [s for s in shards if s not in listing]
        if absent:
            raise StreamfoldError(f"{repo_id}: {INDEX_NAME} names shard {absent[0]} that the repo does not have")
    elif SINGLE_NAME in listing:
        shards = [SINGLE_NAME]
    else:
        other = [p for p in listing if p.endswith((".bin", ".pth", ".pt", ".gguf"))]
        hint = f" (it has {other[0]}; streamfold converts safetensors checkpoints)" if other else ""
        raise StreamfoldError(f"{repo_id}: no {SINGLE_NAME} or {INDEX_NAME} in the repo{hint}")
    if "config.json" not in listing:
        raise StreamfoldError(f"{repo_id}: no config.json in the repo; a Hugging Face checkpoint needs one")
    take, skipped = select_files(listing, shards)
    with _guard(repo_id, revision, "downloading"):
        folder = Path(api.snapshot_download(repo_id, revision=commit, token=token,
                                            allow_patterns=[_exact_pattern(p) for p in take]))
    return Source(path=folder, display=repo_id, repo_id=repo_id, revision=revision, commit=commit,
                  files=set(take), skipped=skipped)



def download_file(repo_id: str, filename: str, commit: str, folder: Path, token=None,
                  endpoint: str | None = None) -> Path:
    """Download one repo file into ``folder`` (not the shared cache: the caller deletes it when done)."""
    api = _api(token, endpoint)
    with _guard(repo_id, commit, f"downloading {filename}"):
        return Path(api.hf_hub_download(repo_id, filename, revision=commit, local_dir=str(folder), token=token))
