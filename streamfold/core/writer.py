"""Streaming safetensors writer: lay out a shard, write its header first, fill tensors in place.

The header (8-byte aligned, space padded, as the safetensors library writes it) fixes every
tensor's byte range up front, so tensor data can then be written by any thread, in any order,
with positional writes into the preallocated file; the result does not depend on that order.
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .dtypes import DTYPES


@dataclass(frozen=True)
class OutTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute offset in the output file
    end: int


class ShardLayout:
    """Byte layout of one output shard, tensors in the given order."""

    def __init__(self, tensors: list[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str] | None) -> None:
        header: dict = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        pos = 0
        spans = []
        for name, dtype, shape in tensors:
            n = DTYPES[dtype].itemsize
            for d in shape:
                n *= d
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + n]}
            spans.append((name, dtype, tuple(shape), pos, pos + n))
            pos += n
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-(8 + len(raw)) % 8)
        self.header = struct.pack("<Q", len(raw)) + raw
        base = len(self.header)
        self.tensors: dict[str, OutTensor] = {
            name: OutTensor(name, dtype, shape, base + b, base + e) for name, dtype, shape, b, e in spans}
        self.data_bytes = pos
        self.file_bytes = base + pos

    def create(self, path: Path) -> int:
        """Create the file at full size with the header written; returns a writable fd."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o666)  # minus the umask, as cp
        try:
            os.ftruncate(fd, self.file_bytes)
            pwrite_all(fd, self.header, 0)
        except BaseException:
            os.close(fd)
            raise
        return fd


def pwrite_all(fd: int, data, offset: int) -> None:
    """``os.pwrite`` until every byte is written."""
    if isinstance(data, np.ndarray):  # memoryview cannot export ml_dtypes' bf16
        data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n
