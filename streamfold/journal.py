"""Resume: a deterministic staging folder beside DST with a journal of completed shards.

``.DST.streamfold-staging/`` holds the shards as they complete (each written under a temporary name
and renamed when whole) and ``.streamfold-journal.json``: the conversion's fingerprint (every source
file's size and header sha256, the options, the task records) and, per completed shard, its size,
inode and mtime, and its sha256 when the run hashed its output (``--manifest`` or Ray). A run of the
same conversion that finds the folder re-uses every journaled shard that checks out (same size,
same inode and mtime: nothing rewrote it; same sha256, re-hashed, where one was recorded) and
writes the rest. A different fingerprint discards the folder and says why in one line. While a run
owns the folder it holds an ``flock`` on ``.streamfold-lock`` (with its pid inside), so a second run
into the same DST is refused; a killed owner's lock dies with it, and its folder is adopted (same
fingerprint) or reclaimed (different).

The sha256 is not computed by default because hashing every output byte costs about as much CPU as
the fold (measured for ``--manifest``); a SIGKILL cannot corrupt a completed, renamed shard (its bytes
are in the page cache), so the stat identity check covers the crash this journal is for.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Callable

from .engine import PARTIAL_SUFFIX
from .errors import StreamfoldError
from .manifest import hash_file

JOURNAL = ".streamfold-journal.json"
LOCK = ".streamfold-lock"


def staging_path(dst: Path) -> Path:
    return dst.parent / f".{dst.name}.streamfold-staging"


def _why(old: dict, new: dict) -> str:
    """What differs between two fingerprints, in a few words."""
    if old.get("schema") != new.get("schema"):
        return "it was written by another streamfold version"
    for k in sorted(set(old.get("options", {})) | set(new.get("options", {}))):
        a, b = old.get("options", {}).get(k), new.get("options", {}).get(k)
        if a != b:
            return f"option {k} changed ({a!r} -> {b!r})"
    so, sn = old.get("sources", {}), new.get("sources", {})
    for s in sorted(set(so) | set(sn)):
        if so.get(s) != sn.get(s):
            a, b = so.get(s) or {}, sn.get(s) or {}
            what = next((w for w, k in (("size", "size"), ("header", "header_sha256"), ("modification time", "mtime_ns"))
                         if a.get(k) != b.get(k)), "")
            return f"source {s} changed ({what})" if s in so and s in sn else f"the source shards changed ({s})"
    return "the norm values in the source changed"


class Staging:
    """The staging folder of one conversion into ``dst``, locked for this process."""

    def __init__(self, dst: Path, fingerprint: dict, resume: bool = True,
                 note: Callable[[str], None] | None = None) -> None:
        self.path = staging_path(dst)
        self.fingerprint = fingerprint
        self.note = note or (lambda _m: None)
        self.done: dict[str, dict] = {}
        self._mutex = threading.Lock()
        existed = self.path.is_dir()
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.pread(self._lock_fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self._lock_fd)
            raise StreamfoldError(f"{dst}: another streamfold (pid {pid}) is converting into it right now "
                                  f"(staging folder {self.path})") from None
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"{os.getpid()}\n".encode(), 0)
        if existed:
            self._adopt(resume)
        self._save()  # the fingerprint is on disk before any shard is written

    def _adopt(self, resume: bool) -> None:
        try:
            old = json.loads((self.path / JOURNAL).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
        if not resume:
            self._reclaim("--no-resume")
        elif old is None or not isinstance(old, dict):
            self._reclaim("it has no readable journal")
        elif old.get("fingerprint") != self.fingerprint:
            self._reclaim(_why(old.get("fingerprint") or {}, self.fingerprint))
        else:
            kept, bad = {}, []
            for shard, rec in (old.get("shards") or {}).items():
                if self._intact(shard, rec):
                    kept[shard] = rec
                else:
                    bad.append(shard)
                    (self.path / shard).unlink(missing_ok=True)
            self.done = kept
            extra = f"; redoing {len(bad)} that did not check out ({bad[0]}...)" if bad else ""
            if kept or bad:
                self.note(f"resuming the interrupted conversion: re-using {len(kept)} completed shard(s){extra}")
        for p in self.path.glob(f".*{PARTIAL_SUFFIX}"):  # half-written by the killed run
            p.unlink(missing_ok=True)

    def _intact(self, shard: str, rec: dict) -> bool:
        try:
            st = os.stat(self.path / shard)
        except OSError:
            return False
        if (st.st_size, st.st_ino, st.st_mtime_ns) != (rec.get("size"), rec.get("ino"), rec.get("mtime_ns")):
            return False
        return rec.get("sha256") is None or hash_file(self.path / shard) == rec["sha256"]

    def _reclaim(self, why: str) -> None:
        self.note(f"not resuming the interrupted conversion in {self.path.name}: {why}; starting fresh")
        for p in self.path.iterdir():
            if p.name == LOCK:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        self.done = {}

    def record(self, shard: str, size: int, sha256: str | None) -> None:
        """Journal a completed shard (called from the engine's writer or hashing thread)."""
        st = os.stat(self.path / shard)
        with self._mutex:
            self.done[shard] = {"size": size, "ino": st.st_ino, "mtime_ns": st.st_mtime_ns, "sha256": sha256}
            self._save()

    def digests(self) -> dict[str, str]:
        return {s: r["sha256"] for s, r in self.done.items() if r.get("sha256")}

    def _save(self) -> None:
        tmp = self.path / (JOURNAL + ".tmp")
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "shards": self.done}, indent=1), encoding="utf-8")
        os.replace(tmp, self.path / JOURNAL)

    def seal(self) -> None:
        """Remove the journal and lock: the folder is now exactly the output, ready to publish."""
        (self.path / JOURNAL).unlink(missing_ok=True)
        (self.path / LOCK).unlink(missing_ok=True)
        self.release()

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def discard(self) -> None:
        self.release()
        shutil.rmtree(self.path, ignore_errors=True)
