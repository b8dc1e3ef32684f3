"""``SHA256SUMS``: a manifest of every file in a converted checkpoint, in ``sha256sum`` format.

Each line is ``<64 hex digits>  <relative/path>`` (two spaces, POSIX separators, sorted by path), so
``cd DST && sha256sum -c SHA256SUMS`` checks a checkpoint with no Python at all. The manifest lists
every file under the folder except itself and hidden files and folders (``.git``, ``.cache``, ...:
the file policy in ``files.py``; convert never writes them). ``streamfold verify`` checks it, and
reports files it does not list.
"""
from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .errors import StreamfoldError
from .files import is_hidden

MANIFEST_NAME = "SHA256SUMS"
READ_BLOCK = 8 << 20


def list_files(root: str | os.PathLike) -> list[str]:
    """Every file under ``root`` a manifest covers, as sorted POSIX relative paths."""
    root = Path(root)
    out = []
    for d, dirs, files in os.walk(root):
        dirs[:] = [x for x in dirs if not is_hidden(x)]
        for f in files:
            rel = (Path(d) / f).relative_to(root).as_posix()
            if rel != MANIFEST_NAME and not is_hidden(rel):
                out.append(rel)
    return sorted(out)


def hash_file(path: str | os.PathLike, block: int = READ_BLOCK) -> str:
    """sha256 hex digest of a file, read in ``block``-byte pieces into one reused buffer."""
    h = hashlib.sha256()
    buf = bytearray(block)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while True:
            n = f.readinto(buf)
            if not n:
                break
            h.update(view[:n])  # hashlib releases the GIL for large updates
    return h.hexdigest()


def hash_files(root: Path, rels: list[str], workers: int = 2) -> dict[str, str]:
    """Digests of several files, largest first on ``workers`` threads."""
    order = sorted(rels, key=lambda r: -(root / r).stat().st_size)
    if workers <= 1 or len(order) <= 1:
        return {r: hash_file(root / r) for r in order}
    with ThreadPoolExecutor(min(workers, len(order)), thread_name_prefix="streamfold-sha") as pool:
        return dict(zip(order, pool.map(lambda r: hash_file(root / r), order)))


def format_manifest(digests: dict[str, str]) -> str:
    for rel in digests:
        if "\n" in rel or "\\" in rel:  # sha256sum would escape these; never produced by convert
            raise StreamfoldError(f"{rel!r}: file name cannot be listed in {MANIFEST_NAME}")
    return "".join(f"{digests[rel]}  {rel}\n" for rel in sorted(digests))


def write_manifest(root: str | os.PathLike, digests: dict[str, str] | None = None,
                   workers: int = 2) -> Path:
    """Write ``root/SHA256SUMS`` covering every file (hashing those not in ``digests``)."""
    root = Path(root)
    digests = dict(digests or {})
    todo = [r for r in list_files(root) if r not in digests]
    digests.update(hash_files(root, todo, workers))
    path = root / MANIFEST_NAME
    path.write_text(format_manifest(digests), encoding="utf-8")
    return path


def parse_manifest(path: str | os.PathLike) -> tuple[dict[str, str], list[str]]:
    """``({relative path: hex digest}, [problems])`` from a ``sha256sum``-format file."""
    entries: dict[str, str] = {}
    problems: list[str] = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return {}, [f"{MANIFEST_NAME}: cannot read ({e})"]
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, rel = line.partition("  ")
        if not sep:
            digest, sep, rel = line.partition(" *")  # sha256sum binary-mode marker
        digest = digest.lower()
        if not sep or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest) or not rel:
            problems.append(f"{MANIFEST_NAME} line {i}: not '<sha256>  <path>': {line[:80]!r}")
            continue
        rel = rel[2:] if rel.startswith("./") else rel
        if rel in entries:
            problems.append(f"{MANIFEST_NAME} line {i}: {rel} listed twice")
        entries[rel] = digest
    return entries, problems


class OrderedHasher:
    """sha256 of one file fed by many threads, each with a byte range; ranges are hashed in file
    order (a thread waits for its predecessor). Any range reported missing breaks the digest."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._h = hashlib.sha256()
        self._next = 0
        self._cond = threading.Condition()
        self.broken: str | None = None

    def feed(self, offset: int, data, fail: str | None = None) -> None:
        """Hash ``data`` (bytes at ``offset``); or, with ``fail``, skip ``len(data)`` bytes and record why."""
        n = len(data) if not isinstance(data, int) else data
        with self._cond:
            self._cond.wait_for(lambda: self._next >= offset)
            if self._next != offset:  # overlap: the caller's ranges are wrong
                self.broken = self.broken or f"internal: range at {offset} overlaps hashed data"
            elif fail is not None:
                self.broken = self.broken or fail
            elif self.broken is None:
                self._h.update(data)
            self._next = max(self._next, offset + n)
            self._cond.notify_all()

    @property
    def complete(self) -> bool:
        return self._next == self.size

    def hexdigest(self) -> str | None:
        return self._h.hexdigest() if self.broken is None and self.complete else None
