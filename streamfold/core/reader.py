"""Read safetensors checkpoints without torch: a parsed, validated header plus numpy views.

A safetensors file is ``u64 header_len | JSON header | data``; the header maps tensor names to
``{"dtype", "shape", "data_offsets": [begin, end]}`` relative to the data section. Everything is
validated before any output is written, so a bad shard fails the whole job up front.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .dtypes import DTYPES, itemsize
from .errors import StreamfoldError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit


class DuplicateKey(ValueError):
    """A JSON object names the same key twice (``json`` would silently keep the last one)."""

    def __init__(self, key: str) -> None:
        super().__init__(f"duplicate key {key!r}")
        self.key = key


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise DuplicateKey(k)
        out[k] = v
    return out


def loads_strict(text: str):
    """``json.loads`` that refuses duplicate keys in any object (raises :class:`DuplicateKey`).

    Duplicates make a file ambiguous: Python keeps the last value, other readers may keep the first,
    so a tensor entry, an index entry or a config key could mean two different things."""
    return json.loads(text, object_pairs_hook=_no_duplicates)


def _is_count(x) -> bool:
    """A non-negative JSON integer (``true``/``false`` are ints in Python, not here)."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: absolute byte range ``[begin, end)`` in ``path``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    path: Path
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class SafetensorsFile:
    """One validated safetensors file: tensors in file order, and zero-copy memmap views."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self.metadata: dict[str, str] | None = None
        self.tensors: dict[str, TensorInfo] = {}
        self._mmap: np.memmap | None = None
        self._parse()

    def _fail(self, what: str) -> StreamfoldError:
        return StreamfoldError(f"{self.path}: {what}")

    def _parse(self) -> None:
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise self._fail("not a safetensors file (shorter than 8 bytes); re-download it")
                (n,) = struct.unpack("<Q", head)
                if n > MAX_HEADER or 8 + n > size:
                    raise self._fail(
                        f"header length {n} does not fit in the {size}-byte file; the file is "
                        "truncated or not safetensors, re-download it")
                raw = f.read(n)
        except OSError as e:
            raise self._fail(f"cannot read ({e.strerror or e})") from None
        try:
            header = loads_strict(raw.decode("utf-8"))
        except DuplicateKey as e:
            raise self._fail(f"corrupt header ({e}: the header names it twice); re-download the file") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise self._fail(f"corrupt header (invalid JSON: {e}); re-download the file") from None
        if not isinstance(header, dict):
            raise self._fail("corrupt header (not a JSON object); re-download the file")
        meta = header.pop("__metadata__", None)
        if meta is not None:
            if not isinstance(meta, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
                raise self._fail("corrupt header (__metadata__ must map strings to strings)")
            self.metadata = meta
        self.header_size = 8 + n
        data_len = size - self.header_size
        entries = []
        for name, e in header.items():
            if not isinstance(e, dict) or set(e) != {"dtype", "shape", "data_offsets"}:
                raise self._fail(f"corrupt header entry for tensor {name!r}")
            dtype, shape, offs = e["dtype"], e["shape"], e["data_offsets"]
            if not isinstance(dtype, str) or dtype not in DTYPES:
                raise self._fail(f"tensor {name!r} has unknown dtype {json.dumps(dtype)[:40]}")
            if (not isinstance(shape, list) or not all(_is_count(d) for d in shape)
                    or not isinstance(offs, list) or len(offs) != 2
                    or not all(_is_count(o) for o in offs)):
                raise self._fail(f"corrupt shape or data_offsets for tensor {name!r}")
            entries.append((offs[0], offs[1], name, dtype, tuple(shape)))
        entries.sort(key=lambda t: (t[0], t[1]))
        pos = 0
        for begin, end, name, dtype, shape in entries:
            if begin != pos:
                what = "overlaps the previous tensor" if begin < pos else "leaves a gap before it"
                raise self._fail(f"tensor {name!r} data_offsets [{begin}, {end}] {what}; "
                                 "the header is corrupt, re-download the file")
            numel = 1
            for d in shape:
                numel *= d
            if end - begin != numel * itemsize(dtype):
                raise self._fail(f"tensor {name!r} spans {end - begin} bytes but shape {list(shape)} "
                                 f"x {dtype} needs {numel * itemsize(dtype)}")
            pos = end
        if pos != data_len:
            if pos > data_len:
                raise self._fail(f"truncated: tensors need {pos} data bytes but only {data_len} are "
                                 "present; re-download the file")
            raise self._fail(f"{data_len - pos} unexpected trailing bytes after the last tensor")
        for begin, end, name, dtype, shape in entries:
            self.tensors[name] = TensorInfo(name, dtype, shape, self.path,
                                            self.header_size + begin, self.header_size + end)

    def array(self, name: str) -> np.ndarray:
        """A read-only zero-copy memmap view of tensor ``name``."""
        t = self.tensors[name]
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        raw = self._mmap[t.begin:t.end]
        return raw.view(DTYPES[t.dtype]).reshape(t.shape)

    def close(self) -> None:
        self._mmap = None


def pread_into(fd: int, buf: np.ndarray, offset: int, path) -> None:
    """Fill ``buf`` with the bytes at ``offset`` of ``fd`` (``pread`` until complete)."""
    view = memoryview(buf).cast("B")
    while view:
        n = os.preadv(fd, [view], offset)
        if n == 0:
            raise StreamfoldError(f"{path}: file shrank while reading (is another process writing it?)")
        view = view[n:]
        offset += n


def read_config(src: Path) -> dict:
    """``config.json`` of a checkpoint directory, as a dict."""
    path = src / "config.json"
    if not path.is_file():
        raise StreamfoldError(f"{path}: missing; a Hugging Face checkpoint needs its config.json")
    try:
        cfg = loads_strict(path.read_text(encoding="utf-8"))
    except DuplicateKey as e:
        raise StreamfoldError(f"{path}: {e} (ambiguous: loaders disagree on which value wins); "
                              "remove one") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StreamfoldError(f"{path}: invalid JSON ({e}); fix or re-download it") from None
    if not isinstance(cfg, dict):
        raise StreamfoldError(f"{path}: not a JSON object; fix or re-download it")
    return cfg


class Checkpoint:
    """A sharded (index + shards) or single-file safetensors checkpoint directory."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise StreamfoldError(f"{self.root}: not a directory (give a checkpoint folder or a Hub repo id)")
        index_path = self.root / INDEX_NAME
        self.index_metadata: dict = {}
        if index_path.is_file():
            try:
                index = loads_strict(index_path.read_text(encoding="utf-8"))
                weight_map = index["weight_map"]
                if not isinstance(weight_map, dict) or not all(
                        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                    raise TypeError
            except DuplicateKey as e:
                raise StreamfoldError(f"{index_path}: {e} (the index names it twice, so its shard is "
                                      "ambiguous); re-download it") from None
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
                raise StreamfoldError(f"{index_path}: not a valid index (needs a \"weight_map\" of "
                                      "tensor name -> shard file); re-download it") from None
            self.index_metadata = index.get("metadata") or {}
            shard_names = list(dict.fromkeys(weight_map.values()))
            self.sharded = True
        elif (self.root / SINGLE_NAME).is_file():
            weight_map = None
            shard_names = [SINGLE_NAME]
            self.sharded = False
        else:
            raise StreamfoldError(f"{self.root}: no {SINGLE_NAME} or {INDEX_NAME}; "
                                  "streamfold converts safetensors checkpoints")
        for s in shard_names:
            if "/" in s or "\\" in s or s in (".", ".."):
                raise StreamfoldError(f"{index_path}: shard name {s!r} must be a plain file name")
            if not (self.root / s).is_file():
                raise StreamfoldError(f"{self.root / s}: shard named in {INDEX_NAME} is missing; "
                                      "re-download the checkpoint")
        self.shards: dict[str, SafetensorsFile] = {s: SafetensorsFile(self.root / s) for s in shard_names}
        self.tensors: dict[str, TensorInfo] = {}
        self.shard_of: dict[str, str] = {}
        for s, f in self.shards.items():
            for name, t in f.tensors.items():
                if name in self.tensors:
                    raise StreamfoldError(f"{self.root / s}: tensor {name!r} also in {self.shard_of[name]}")
                self.tensors[name] = t
                self.shard_of[name] = s
        if weight_map is not None:
            for name, s in weight_map.items():
                if self.shard_of.get(name) != s:
                    raise StreamfoldError(f"{self.root / s}: lacks tensor {name!r} that {INDEX_NAME} "
                                          "places there; the index and shards disagree, re-download")

    def __iter__(self) -> Iterator[TensorInfo]:
        return iter(self.tensors.values())

    def array(self, name: str) -> np.ndarray:
        """A read-only zero-copy view of a tensor (memmap; pages count toward RSS once touched)."""
        return self.shards[self.shard_of[name]].array(name)

    def read(self, name: str) -> np.ndarray:
        """A copy of one (small) tensor, read with ``pread``: unlike touching a memmap, this does not
        map the kernel's read-around pages into the process (tens of MB for a few norm vectors)."""
        t = self.tensors[name]
        with open(t.path, "rb", buffering=0) as f:
            raw = os.pread(f.fileno(), t.nbytes, t.begin)
        if len(raw) != t.nbytes:
            raise StreamfoldError(f"{t.path}: file shrank while reading tensor {name!r}")
        return np.frombuffer(raw, dtype=DTYPES[t.dtype]).reshape(t.shape).copy()

    def close(self) -> None:
        for f in self.shards.values():
            f.close()

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())
