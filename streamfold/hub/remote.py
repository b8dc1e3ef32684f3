"""A Hub repo read without downloading its weights: byte ranges, remote headers, a plan made from them.

:func:`plan_remote` makes a conversion plan from a repo at one commit: each source shard becomes a
local header-only stub (its header fetched by an HTTP range request, the rest a sparse hole of the
right size) beside the small files (config, index, tokenizer, ...), and the norm vectors are read by
range requests too. The plan's tasks then run wherever their source shards are fetched
(:func:`fetch_sources`, pinned to the planned commit and endpoint: a Ray worker on another machine
downloads the same bytes the driver planned from). Used by ``--stream`` and by ``--ray`` with a repo
id SRC.
"""
from __future__ import annotations

import shutil
import struct
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .dtypes import DTYPES
from .errors import StreamfoldError
from .hub import Source, _api, _constants, _guard, _hf, select_files
from .hub_source import _shards_from_index, download_file
from .reader import INDEX_NAME, SINGLE_NAME

HEAD_GUESS = 100_000  # one range request reads most safetensors headers whole


@dataclass
class HubRef:
    """Where a planned Hub source's bytes are (JSON-able, for workers): repo, the commit planned, the
    endpoint, and a token only when one was given explicitly (else each worker's own ``HF_TOKEN``)."""

    repo: str
    commit: str
    endpoint: str
    token: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def read_range(repo_id: str, filename: str, commit: str, start: int, end: int, token=None) -> bytes:
    """Bytes ``[start, end)`` of one repo file, by an HTTP range request (as huggingface_hub reads
    safetensors headers): a norm vector or a header without downloading the shard."""
    hf = _hf()
    from huggingface_hub.utils import get_session, hf_raise_for_status
    if end <= start:
        return b""
    url = hf.hf_hub_url(repo_id=repo_id, filename=filename, revision=commit, endpoint=_constants().ENDPOINT)
    headers = {**_api(token)._build_hf_headers(token=token), "range": f"bytes={start}-{end - 1}"}
    with _guard(repo_id, commit, f"reading {filename} bytes {start}..{end}"):
        r = get_session().get(url, headers=headers, follow_redirects=True)
        hf_raise_for_status(r)
    data = r.content
    if r.status_code == 200 and len(data) > end - start:  # a server that ignores Range sent the whole file
        data = data[start:end]
    if len(data) != end - start:
        raise StreamfoldError(f"{repo_id}: {filename}: asked for bytes {start}..{end}, got {len(data)} bytes")
    return data


def remote_header(repo: str, name: str, commit: str, size: int, token=None) -> bytes:
    """The safetensors header of one repo file (8-byte length + JSON), by one or two range requests."""
    head = read_range(repo, name, commit, 0, min(size, HEAD_GUESS), token)
    if len(head) < 8:
        raise StreamfoldError(f"{repo}: {name}: not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", head[:8])
    if 8 + n > size:
        raise StreamfoldError(f"{repo}: {name}: header length {n} does not fit in the {size}-byte file")
    return head[: 8 + n] if 8 + n <= len(head) else head[:8] + read_range(repo, name, commit, 8, 8 + n, token)


def plan_remote(repo: str, folder: Path, *, revision: str | None = None, token=None, **plan_options):
    """Plan the conversion of Hub repo ``repo`` from remote headers and range-read norm vectors.

    ``folder`` (created) receives the small files and the header-only shard stubs; it must live until
    ``finish`` has copied the small files. ``plan_options``: as for :func:`streamfold.conversion.plan`.
    Returns ``(ConversionPlan, HubRef)``."""
    from .conversion import plan
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
            f.write(remote_header(repo, s, commit, sizes[s], token))
            f.truncate(sizes[s])
    shutil.rmtree(folder / ".cache", ignore_errors=True)

    def read(t):  # a norm vector, by range request
        raw = read_range(repo, t.path.name, commit, t.begin, t.end, token)
        return np.frombuffer(raw, dtype=DTYPES[t.dtype]).reshape(t.shape).copy()
    source = Source(path=folder, display=repo, repo_id=repo, revision=revision, commit=commit, files=set(take),
                    skipped=skipped)
    cplan = plan(folder, source=source, read=read, **plan_options)
    return cplan, HubRef(repo, commit, str(_constants().ENDPOINT), token if isinstance(token, str) else None)


def fetch_sources(ref: HubRef, names, folder: Path, have: dict[str, Path] | None = None) -> dict[str, Path]:
    """Download the repo files ``names`` (at ``ref.commit``) into ``folder``, except those in ``have``;
    returns ``have`` plus the new ones (name -> path). Not the shared cache: the caller deletes them."""
    out = dict(have or {})
    for name in names:
        if name not in out:
            out[name] = download_file(ref.repo, name, ref.commit, folder, ref.token, endpoint=ref.endpoint)
    return out
