"""Resume: a journal of completed shards in the staging folder (:mod:`streamfold.run.staging`).

The staging folder (``.DST.streamfold-partial`` beside DST, locked while a run owns it) holds the
shards as they complete (each written under a temporary name and renamed when whole) and
``.streamfold-journal.json``: the conversion's fingerprint (every source file's size, header sha256
and mtime, the norm vectors, the options) and, per completed shard, its size, inode and mtime, and
its sha256 when the run hashed its output (``--manifest`` or Ray with ``--manifest``). When a run is
killed (SIGKILL, OOM) the staging lock dies with it; the next run of the same conversion is offered
the folder (``Staging(adopt=...)``) and adopts it when the fingerprint matches, re-using every
journaled shard that checks out (same size, inode and mtime: nothing rewrote it; the same sha256,
re-hashed, where one was recorded) and writing the rest. A different fingerprint declines it (the
staging helper removes it) with one line saying why.

The sha256 is not computed by default because hashing every output byte costs about as much CPU as
the fold (measured for ``--manifest``); a SIGKILL cannot corrupt a completed, renamed shard (its bytes
are in the page cache), so the stat identity check covers the crash this journal is for.
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Callable

from .engine import PARTIAL_SUFFIX
from ..core.manifest import hash_file
from ..quant.counts import merge_counts

JOURNAL = ".streamfold-journal.json"


def _why(old: dict, new: dict) -> str:
    """What differs between two fingerprints, in a few words."""
    if old.get("schema") != new.get("schema"):
        return "it was written by another streamfold version"
    for k in sorted(set(old.get("options", {})) | set(new.get("options", {}))):
        a, b = old.get("options", {}).get(k), new.get("options", {}).get(k)
        if a != b:
            return f"option {k} changed ({a!r} -> {b!r})"
    if old.get("commit") != new.get("commit"):
        return f"the source commit changed ({old.get('commit')} -> {new.get('commit')})"
    so, sn = old.get("sources", {}), new.get("sources", {})
    for s in sorted(set(so) | set(sn)):
        if so.get(s) != sn.get(s):
            a, b = so.get(s) or {}, sn.get(s) or {}
            what = next((w for w, k in (("size", "size"), ("header", "header_sha256"), ("modification time", "mtime_ns"))
                         if a.get(k) != b.get(k)), "")
            return f"source {s} changed ({what})" if s in so and s in sn else f"the source shards changed ({s})"
    return "the norm values in the source changed"


class Journal:
    """The completed-shard journal of one conversion; ``adopt`` is the staging helper's callback."""

    def __init__(self, fingerprint: dict, log: Callable[[str], None] | None = None,
                 counted: set[str] | frozenset = frozenset()) -> None:
        self.fingerprint = fingerprint
        self.counted = counted  # shards that dequantize: re-used only with their element counts journaled
        self.log = log or (lambda _m: None)
        self.done: dict[str, dict] = {}
        self.path: Path | None = None
        self._mutex = threading.Lock()

    def adopt(self, folder: Path, owner: dict | None) -> bool:
        """Whether to keep a killed run's staging folder: only for the same fingerprint."""
        try:
            old = json.loads((folder / JOURNAL).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            old = None
        if not isinstance(old, dict):
            why = "it has no readable journal"
        elif old.get("fingerprint") != self.fingerprint:
            why = _why(old.get("fingerprint") or {}, self.fingerprint)
        else:
            kept, bad = {}, []
            for shard, rec in (old.get("shards") or {}).items():
                if self._intact(folder / shard, rec) and (shard not in self.counted or rec.get("dequant") is not None):
                    kept[shard] = rec
                else:
                    bad.append(shard)
            for shard in bad:
                (folder / shard).unlink(missing_ok=True)
            self.done = kept
            extra = f"; redoing {len(bad)} that did not check out ({bad[0]}...)" if bad else ""
            self.log(f"streamfold: resuming the interrupted conversion: re-using {len(kept)} completed "
                     f"shard(s){extra}")
            return True
        self.log(f"streamfold: not resuming the interrupted conversion in {folder.name}: {why}; starting fresh")
        return False

    @staticmethod
    def _intact(path: Path, rec: dict) -> bool:
        try:
            st = os.stat(path)
        except OSError:
            return False
        if (st.st_size, st.st_ino, st.st_mtime_ns) != (rec.get("size"), rec.get("ino"), rec.get("mtime_ns")):
            return False
        return rec.get("sha256") is None or hash_file(path) == rec["sha256"]

    def start(self, folder: Path) -> None:
        """Begin journaling into ``folder`` (fresh or adopted): the fingerprint is on disk before any shard."""
        self.path = folder
        for p in folder.glob(f".*{PARTIAL_SUFFIX}"):  # half-written by the killed run
            p.unlink(missing_ok=True)
        self._save()

    def record(self, shard: str, size: int, sha256: str | None, dequant: dict | None = None) -> None:
        """Journal a completed shard (called from the engine's writer or hashing thread); ``dequant``: its
        ``{tensor: [exact, rounded]}`` counts, kept so a resumed run's model card still has them."""
        st = os.stat(self.path / shard)
        with self._mutex:
            self.done[shard] = {"size": size, "ino": st.st_ino, "mtime_ns": st.st_mtime_ns, "sha256": sha256,
                                "dequant": dequant}
            self._save()

    def dequant_counts(self) -> dict[str, list[int]] | None:
        """Every journaled shard's dequantized-element counts merged (None: nothing was dequantized)."""
        return merge_counts(r.get("dequant") for r in self.done.values())

    def digests(self) -> dict[str, str]:
        return {s: r["sha256"] for s, r in self.done.items() if r.get("sha256")}

    def _save(self) -> None:
        tmp = self.path / (JOURNAL + ".tmp")
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "shards": self.done}, indent=1), encoding="utf-8")
        os.replace(tmp, self.path / JOURNAL)

    def seal(self) -> None:
        """Remove the journal: the folder is now exactly the output, ready to finish and publish."""
        (self.path / JOURNAL).unlink(missing_ok=True)
