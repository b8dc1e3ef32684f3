"""Hugging Face Hub I/O: repo ids as sources (resolve, download), remote headers, and pushing the output.

Everything that talks to the Hub goes through one ``huggingface_hub.HfApi`` instance, imported
lazily: converting a local folder never imports huggingface_hub. Downloads go through
huggingface_hub's cache, so ``HF_HOME`` / ``HF_HUB_CACHE``, ``HF_HUB_OFFLINE`` and ``HF_TOKEN`` behave as
they do everywhere else in the Hugging Face stack.

Only the files a converted checkpoint needs are fetched: the safetensors shards the index names (or
``model.safetensors``), the index, ``config.json``, tokenizer files and other small files. Other formats
of the same weights (``*.bin``, ``*.pth``, ``consolidated.*``, ``original/``, ONNX, ...) are never
downloaded: they would double the download and, copied beside the folded weights, load unfolded.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from .errors import StreamfoldError
from .files import CARD_NAME, is_wanted, select_repo_files
from .reader import INDEX_NAME, SINGLE_NAME

_REPO_ID = re.compile(r"[A-Za-z0-9_](?:[\w.-]{0,94}[A-Za-z0-9_])?/[A-Za-z0-9_](?:[\w.-]{0,94}[A-Za-z0-9_])?",
                      re.ASCII)


def is_repo_id(text: str) -> bool:
    """``org/name`` in the Hub's repo id syntax (letters, digits, ``-``, ``_``, ``.``; no ``--`` or ``..``)."""
    return bool(_REPO_ID.fullmatch(text)) and "--" not in text and ".." not in text


def wanted_file(path: str) -> bool:
    """Whether a non-shard repo file belongs in a converted checkpoint (the policy: :mod:`streamfold.files`)."""
    return is_wanted(path)


def select_files(listing: list[str], shards: list[str]) -> tuple[list[str], list[str]]:
    """Split a repo's files into (to download, other weight formats not downloaded)."""
    return select_repo_files(listing, shards)


def _exact_pattern(path: str) -> str:
    """An fnmatch pattern matching exactly ``path`` (for snapshot_download's allow_patterns)."""
    return re.sub(r"([*?\[])", r"[\1]", path)


@dataclass
class Source:
    """A resolved SRC: the local folder to read, and where it came from."""

    path: Path
    display: str
    repo_id: str | None = None
    revision: str | None = None
    commit: str | None = None
    files: set[str] | None = None  # Hub: the files selected (relative posix paths); None = all
    skipped: list[str] = field(default_factory=list)  # Hub: repo files not downloaded
    offline: bool = False

    @property
    def label(self) -> str:
        """The repo id, or the local folder's name (never a full local path, for public texts)."""
        return self.repo_id or self.path.resolve().name

    @property
    def card_text(self) -> str | None:
        p = self.path / CARD_NAME
        if (self.files is None or CARD_NAME in self.files) and p.is_file():
            try:
                return p.read_text(encoding="utf-8", errors="replace")
            except OSError:
                return None
        return None

    def to_dict(self) -> dict:
        return {"src": self.display, "repo_id": self.repo_id, "revision": self.revision,
                "commit": self.commit, "path": str(self.path), "offline": self.offline}


# --- huggingface_hub plumbing ---------------------------------------------------------------------

def _hf():
    try:
        import huggingface_hub
    except ImportError:  # pragma: no cover - a declared dependency
        raise StreamfoldError("Hub repo ids need huggingface_hub: pip install huggingface_hub") from None
    return huggingface_hub


def _constants():
    _hf()
    from huggingface_hub import constants  # read at call time: tests and callers may patch it
    return constants


def _offline() -> bool:
    return bool(_constants().HF_HUB_OFFLINE)


def _cache_dir() -> str:
    return str(_constants().HF_HUB_CACHE)


@contextlib.contextmanager
def _quiet_bars(quiet: bool) -> Iterator[None]:
    """Silence huggingface_hub for the block: its progress bars (downloads, LFS and Xet uploads) and its
    log warnings (e.g. "Could not reach the Hub ... Using cached commit hash"); the previous state is
    restored afterwards."""
    if not quiet:
        yield
        return
    from huggingface_hub.utils import (are_progress_bars_disabled, disable_progress_bars,
                                       enable_progress_bars)
    from huggingface_hub.utils import logging as hf_logging  # imported first: it sets the level on import
    was = are_progress_bars_disabled()
    level = hf_logging.get_verbosity()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not was:
            disable_progress_bars()
    hf_logging.set_verbosity(hf_logging.ERROR)
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if not was:
                enable_progress_bars()


def _is_network_error(e: BaseException) -> bool:
    if type(e).__name__ == "RevisionResolutionError":  # resolve_revision: unreachable and no cached ref
        return e.__cause__ is None or _is_network_error(e.__cause__)
    mod = type(e).__module__.split(".")[0]
    return (isinstance(e, (ConnectionError, TimeoutError))
            or mod in ("httpx", "httpx2", "httpcore", "requests", "urllib3")
            or type(e).__name__ in ("OfflineModeIsEnabled", "ConnectError", "ConnectTimeout",
                                    "ReadTimeout", "TimeoutException"))


def _hub_error(e: BaseException, repo_id: str, revision: str | None, what: str) -> StreamfoldError:
    """One line for a failed Hub call on ``repo_id``."""
    name = type(e).__name__
    rev = f" at revision {revision!r}" if revision else ""
    first = str(e).strip().splitlines()[0] if str(e).strip() else name
    if name == "GatedRepoError":
        return StreamfoldError(f"{repo_id}: gated repo; accept its terms on {_constants().ENDPOINT}/{repo_id} "
                               "and set HF_TOKEN (or run `hf auth login`)")
    if name == "RepositoryNotFoundError":
        return StreamfoldError(f"{repo_id}: no such local folder and no such Hub repo (or it is private: set "
                               "HF_TOKEN or run `hf auth login`)")
    if name == "RevisionNotFoundError":
        return StreamfoldError(f"{repo_id}: revision {revision!r} not found on the Hub (give a branch, tag or "
                               "commit of the repo)")
    if name == "DisabledRepoError":
        return StreamfoldError(f"{repo_id}: the repo is disabled on the Hub")
    if name in ("EntryNotFoundError", "RemoteEntryNotFoundError"):
        return StreamfoldError(f"{repo_id}{rev}: {what}: file not found in the repo")
    if name in ("NotASafetensorsRepoError",):
        return StreamfoldError(f"{repo_id}{rev}: no {SINGLE_NAME} or {INDEX_NAME} in the repo; streamfold "
                               "converts safetensors checkpoints")
    if name == "SafetensorsParsingError":
        return StreamfoldError(f"{repo_id}{rev}: cannot parse a safetensors header ({first})")
    if name == "HFValidationError":
        return StreamfoldError(f"{repo_id}: not a valid Hub repo id ({first})")
    if name in ("IncompleteSnapshotError", "LocalEntryNotFoundError"):
        state = "only partly in" if name == "IncompleteSnapshotError" else "not in"
        if _offline():
            return StreamfoldError(f"{repo_id}{rev}: {state} the local Hugging Face cache ({_cache_dir()}) and "
                                   "HF_HUB_OFFLINE is set; download it once online or unset HF_HUB_OFFLINE")
        return StreamfoldError(f"{repo_id}{rev}: cannot reach the Hub and the repo is not in the local cache "
                               f"({_cache_dir()}); check the network connection ({first})")
    status = getattr(getattr(e, "response", None), "status_code", None)
    if status in (401, 403):
        return StreamfoldError(f"{repo_id}: {what}: not authorized (HTTP {status}); set HF_TOKEN to a token "
                               "with access (or run `hf auth login`)")
    if _is_network_error(e) or status is not None:
        return StreamfoldError(f"{repo_id}: {what}: Hub request failed ({name}: {first})")
    return StreamfoldError(f"{repo_id}: {what} failed ({name}: {first})")


def _api(token):
    return _hf().HfApi(token=token)


def _guard(repo_id: str, revision: str | None, what: str):
    """Context manager turning any huggingface_hub / network failure into a one-line StreamfoldError."""
    @contextlib.contextmanager
    def cm():
        try:
            yield
        except StreamfoldError:
            raise
        except (ValueError, OSError, ConnectionError, TimeoutError) as e:
            raise _hub_error(e, repo_id, revision, what) from None
        except Exception as e:
            cause = _hub_cause(e)
            if cause is not None:
                raise _hub_error(cause, repo_id, revision, what) from None
            raise
    return cm()


_HUB_MODULES = ("huggingface_hub", "httpx", "httpx2", "httpcore", "requests", "urllib3")


def _hub_cause(e: BaseException) -> BaseException | None:
    """The huggingface_hub / HTTP error behind ``e``: itself, or what it wraps (LFS uploads raise
    ``RuntimeError("Error while uploading ...")`` from the HTTP error); None if it is not one."""
    seen = 0
    while e is not None and seen < 8:
        if type(e).__module__.startswith(_HUB_MODULES) or isinstance(e, (ConnectionError, TimeoutError)):
            return e
        e, seen = e.__cause__, seen + 1
    return None


# --- resolving SRC ----------------------------------------------------------------------------------

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


def _listing(folder: Path) -> list[str]:
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            out.append((Path(root) / f).relative_to(folder).as_posix())
    return out


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


# --- pushing --------------------------------------------------------------------------------------

def preflight(*, push_to_hub: str | None = None, base_model: str | None = None, token=None) -> None:
    """Fail fast, before any download or conversion, on options that cannot work."""
    if base_model is not None and not is_repo_id(base_model):
        raise StreamfoldError(f"--base-model {base_model}: not a Hub repo id (org/name)")
    if push_to_hub is not None:
        check_push_target(push_to_hub, token)


def check_push_target(repo_id: str, token=None) -> None:
    """A push to ``repo_id`` can work: valid id, not offline, a token available."""
    if not is_repo_id(repo_id):
        raise StreamfoldError(f"--push-to-hub {repo_id}: not a Hub repo id (give org/name or user/name)")
    if _offline():
        raise StreamfoldError(f"--push-to-hub {repo_id}: HF_HUB_OFFLINE is set; pushing needs the network")
    if token is None or token is True:
        from huggingface_hub import get_token
        if get_token() is None:
            raise StreamfoldError(f"--push-to-hub {repo_id}: no Hugging Face token; set HF_TOKEN or run "
                                  "`hf auth login`")


@dataclass
class PushResult:
    url: str
    commit_url: str | None


def push_folder(folder: str | os.PathLike, repo_id: str, *, private: bool = False,
                commit_message: str | None = None, token: str | bool | None = None,
                quiet: bool = True) -> PushResult:
    """Create ``repo_id`` (a model repo) if needed and upload every file of ``folder`` in one commit.

    ``private`` applies only when the repo is created. ``create_commit`` uploads the large files first
    (LFS, or Xet when ``hf_xet`` is installed; nothing in the repo refers to them yet) and then makes one
    commit naming every file, so a failed push leaves the repo as it was. ``upload_folder`` is not used:
    with ``hf_xet`` installed it commits a large folder in several batches (each a commit), and a push
    that fails part way would leave a repo mixing new and old files.
    """
    folder = Path(folder)
    api = _api(token)
    msg = commit_message or "Upload FlashNorm checkpoint (streamfold)"
    try:
        with _quiet_bars(quiet):
            with _guard(repo_id, None, "creating the repo"):
                repo_url = api.create_repo(repo_id, repo_type="model", private=True if private else None,
                                           exist_ok=True, token=token)
            ops = [_hf().CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(folder / rel))
                   for rel in _listing(folder)]
            with _guard(repo_id, None, "uploading"):
                info = api.create_commit(repo_id=repo_id, repo_type="model", operations=ops, commit_message=msg,
                                         token=token)
    except StreamfoldError as e:
        raise StreamfoldError(f"{e} (pushing {folder}; the converted checkpoint is complete there, retry with: "
                              f"hf upload {repo_id} {folder} .)") from None
    url = getattr(repo_url, "url", None) or str(repo_url)
    return PushResult(url=url, commit_url=getattr(info, "commit_url", None))


# --- byte ranges and pre-uploads (the streaming path) ---------------------------------------------

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


def download_file(repo_id: str, filename: str, commit: str, folder: Path, token=None) -> Path:
    """Download one repo file into ``folder`` (not the shared cache: the caller deletes it when done)."""
    api = _api(token)
    with _guard(repo_id, commit, f"downloading {filename}"):
        return Path(api.hf_hub_download(repo_id, filename, revision=commit, local_dir=str(folder), token=token))


def preupload(repo_id: str, path: Path, path_in_repo: str, token=None):
    """Upload one file's content ahead of the commit; returns the operation to commit later. Small
    files the Hub stores as regular (non-LFS) files are kept in memory, so ``path`` may be deleted."""
    from huggingface_hub import CommitOperationAdd
    api = _api(token)
    op = CommitOperationAdd(path_in_repo=path_in_repo, path_or_fileobj=str(path))
    with _guard(repo_id, None, f"uploading {path_in_repo}"):
        api.preupload_lfs_files(repo_id, additions=[op], token=token, repo_type="model")
    if not getattr(op, "_is_uploaded", False):  # a regular file: committed inline, from memory
        op = CommitOperationAdd(path_in_repo=path_in_repo, path_or_fileobj=path.read_bytes())
    return op


def commit(repo_id: str, operations: list, message: str, *, private: bool = False, token=None) -> PushResult:
    """One commit of pre-uploaded (and small) files; creates the repo if needed."""
    api = _api(token)
    url = ensure_repo(repo_id, private=private, token=token)
    with _guard(repo_id, None, "creating the commit"):
        info = api.create_commit(repo_id, operations=operations, commit_message=message, token=token,
                                 repo_type="model")
    return PushResult(url=url, commit_url=getattr(info, "commit_url", None))


def ensure_repo(repo_id: str, *, private: bool = False, token=None) -> str:
    api = _api(token)
    with _guard(repo_id, None, "creating the repo"):
        repo_url = api.create_repo(repo_id, repo_type="model", private=True if private else None, exist_ok=True,
                                   token=token)
    return getattr(repo_url, "url", None) or str(repo_url)
