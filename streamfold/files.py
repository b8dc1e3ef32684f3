"""What an output folder holds besides the shards: the file policy and the config flags.

One place decides which source files are carried over (tokenizer, generation config, license,
custom code), which are not (other formats of the same weights would load unfolded), the model
card's name, and the flags ``config.json`` gains. convert, the Hub path and verify all use it.
"""
from __future__ import annotations

import os
from pathlib import Path

from .reader import INDEX_NAME

FLASHNORM_VERSION = 1
CARD_NAME = "README.md"
# Weight files that are never carried over: other formats of the same weights would load unfolded.
SKIP_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt", ".h5", ".msgpack", ".safetensors", ".gguf", ".onnx")
SKIP_DIRS = {".git", ".cache", ".huggingface"}


def other_files(src: Path, shard_names: set[str]) -> tuple[list[Path], list[str]]:
    """(files to copy, files not copied) of a source folder, as relative paths, sorted."""
    keep, skipped = [], []
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        for f in sorted(files):
            rel = (Path(root) / f).relative_to(src)
            if rel.as_posix() in shard_names or rel.as_posix() in (INDEX_NAME, "config.json"):
                continue
            if f.endswith(SKIP_SUFFIXES) or f.startswith("consolidated."):
                skipped.append(rel.as_posix())
            else:
                keep.append(rel)
    return keep, skipped


def flashnorm_config(cfg: dict, mode: str) -> dict:
    """The source ``config.json`` with the FlashNorm flags added."""
    out = dict(cfg)
    out.update({"flashnorm": True, "flashnorm_mode": mode, "flashnorm_version": FLASHNORM_VERSION})
    return out
