"""Pushing the output to the Hub: one commit, whatever the number of files; pre-uploads for the streaming path."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..core.errors import StreamfoldError
from .client import _api, _guard, _hf, _listing, _offline, _quiet_bars, is_repo_id


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
