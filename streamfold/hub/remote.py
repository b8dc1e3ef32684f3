"""A Hub repo read without downloading its weights: byte ranges, remote headers, pinned fetches.

:func:`read_range` and :func:`remote_header` read parts of a shard at one commit by HTTP range
requests (``streamfold.run.hub_plan`` makes a conversion plan from them); :func:`fetch_sources`
downloads a task's source shards, pinned to the planned commit and endpoint: a Ray worker on another
machine downloads the same bytes the driver planned from.
"""
from __future__ import annotations

import struct
from dataclasses import asdict, dataclass
from pathlib import Path


from ..core.errors import StreamfoldError
from .client import _api, _constants, _guard, _hf
from .source import download_file

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


def read_range(repo_id: str, filename: str, commit: str, start: int, end: int, token=None,
               endpoint: str | None = None) -> bytes:
    """Bytes ``[start, end)`` of one repo file, by an HTTP range request (as huggingface_hub reads
    safetensors headers): a norm vector or a header without downloading the shard (``endpoint``:
    default ``HF_ENDPOINT``)."""
    hf = _hf()
    from huggingface_hub.utils import get_session, hf_raise_for_status
    if end <= start:
        return b""
    url = hf.hf_hub_url(repo_id=repo_id, filename=filename, revision=commit, endpoint=endpoint or _constants().ENDPOINT)
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


def remote_header(repo: str, name: str, commit: str, size: int, token=None, endpoint: str | None = None) -> bytes:
    """The safetensors header of one repo file (8-byte length + JSON), by one or two range requests."""
    at = {"endpoint": endpoint} if endpoint else {}
    head = read_range(repo, name, commit, 0, min(size, HEAD_GUESS), token, **at)
    if len(head) < 8:
        raise StreamfoldError(f"{repo}: {name}: not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", head[:8])
    if 8 + n > size:
        raise StreamfoldError(f"{repo}: {name}: header length {n} does not fit in the {size}-byte file")
    return head[: 8 + n] if 8 + n <= len(head) else head[:8] + read_range(repo, name, commit, 8, 8 + n, token, **at)


def fetch_sources(ref: HubRef, names, folder: Path, have: dict[str, Path] | None = None) -> dict[str, Path]:
    """Download the repo files ``names`` (at ``ref.commit``) into ``folder``, except those in ``have``;
    returns ``have`` plus the new ones (name -> path). Not the shared cache: the caller deletes them."""
    out = dict(have or {})
    for name in names:
        if name not in out:
            out[name] = download_file(ref.repo, name, ref.commit, folder, ref.token, endpoint=ref.endpoint)
    return out


RANGE_GAP = 1 << 20  # byte ranges closer than this are read in one request


def merge_ranges(ranges, gap: int = RANGE_GAP) -> list[tuple[int, int]]:
    """``(start, end)`` ranges sorted and merged where they overlap or lie less than ``gap`` bytes apart."""
    out: list[list[int]] = []
    for a, b in sorted(ranges):
        if out and a <= out[-1][1] + gap:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return [(a, b) for a, b in out]


def fetch_ranges(ref: HubRef, name: str, size: int, ranges, folder: Path) -> Path:
    """A sparse local stand-in for repo file ``name`` (``size`` bytes, at ``ref.commit``) holding only its
    header and the byte ``ranges`` a task reads, at their offsets (e.g. the scale rows of a weight whose
    scales sit in another shard); the rest is a hole. Readers at those offsets see the repo's bytes."""
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(remote_header(ref.repo, name, ref.commit, size, ref.token, ref.endpoint))
        for a, b in merge_ranges(ranges):
            f.seek(a)
            f.write(read_range(ref.repo, name, ref.commit, a, b, ref.token, ref.endpoint))
        f.truncate(size)
    return path
