"""Hugging Face Hub plumbing: repo ids, :class:`Source`, one ``HfApi``, and one-line errors for Hub failures.

Everything that talks to the Hub goes through one ``huggingface_hub.HfApi`` instance, imported
lazily: converting a local folder never imports huggingface_hub. The jobs built on this are in their
own modules: :mod:`streamfold.hub.source` (a repo id as SRC: resolve, download, the cache),
:mod:`streamfold.hub.push` (the output: one commit, pre-uploads) and :mod:`streamfold.hub.remote`
(range reads: remote headers, norm vectors, planning without downloading the weights).
"""
from __future__ import annotations

import contextlib
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ..core.errors import StreamfoldError
from ..core.files import CARD_NAME, is_wanted, select_repo_files
from ..core.reader import INDEX_NAME, SINGLE_NAME

_REPO_ID = re.compile(r"[A-Za-z0-9_](?:[\w.-]{0,94}[A-Za-z0-9_])?/[A-Za-z0-9_](?:[\w.-]{0,94}[A-Za-z0-9_])?",
                      re.ASCII)


def is_repo_id(text: str) -> bool:
    """``org/name`` in the Hub's repo id syntax (letters, digits, ``-``, ``_``, ``.``; no ``--`` or ``..``)."""
    return bool(_REPO_ID.fullmatch(text)) and "--" not in text and ".." not in text


def wanted_file(path: str) -> bool:
    """Whether a non-shard repo file belongs in a converted checkpoint (the policy: :mod:`streamfold.core.files`)."""
    return is_wanted(path)


def select_files(listing: list[str], shards: list[str]) -> tuple[list[str], list[str]]:
    """Split a repo's files into (to download, other weight formats not downloaded)."""
    return select_repo_files(listing, shards)


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


def _api(token, endpoint: str | None = None):
    return _hf().HfApi(endpoint=endpoint, token=token)


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


def _listing(folder: Path) -> list[str]:
    """A local folder's files as relative POSIX paths, hidden folders left out (as a repo listing)."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            out.append((Path(root) / f).relative_to(folder).as_posix())
    return out
