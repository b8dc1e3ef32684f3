"""The one file policy: which files of a source checkpoint a converted checkpoint gets.

Used by convert (what to copy), hub (what to download), verify (what must be there, and what must
not) and manifest (what it covers), so they cannot disagree. For a path relative to the checkpoint:

- hidden (any part starts with ``.``: ``.gitattributes``, ``.git/``, ``.cache/``): tool files, never
  copied, downloaded or hashed, and not listed anywhere;
- the weights converted (the shards, the index) and ``config.json``: rewritten, not copied;
- the model card (``README.md``): read for its metadata, replaced by streamfold's own card;
- another format of the same weights, or another framework's export (suffixes below, ``consolidated.*``,
  anything under an export folder such as ``original/`` or ``onnx/``): never copied (copied beside
  the folded weights they would load unfolded), listed as "not copied (other weight formats)";
- everything else (tokenizer, generation config, chat template, license, custom code): copied as is.
"""
from __future__ import annotations

import os
from pathlib import Path

from .reader import INDEX_NAME

CARD_NAME = "README.md"
CONFIG_NAME = "config.json"
WEIGHT_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt", ".h5", ".msgpack", ".safetensors", ".gguf", ".onnx",
                   ".onnx_data", ".ot", ".tflite", ".mlmodel", ".npz", ".nemo", ".pb", ".llamafile")
EXPORT_DIRS = frozenset({"original", "onnx", "openvino", "coreml", "tflite", "gguf", "mlx", "tensorrt"})


def is_hidden(rel: str) -> bool:
    """A tool file (``.git/...``, ``.gitattributes``): ignored silently everywhere."""
    return any(p.startswith(".") for p in rel.split("/"))


def is_other_weights(rel: str) -> bool:
    """Weights in another format, or another framework's export: never carried over."""
    parts = rel.split("/")
    name = parts[-1]
    return parts[0] in EXPORT_DIRS or name.endswith(WEIGHT_SUFFIXES) or name.startswith("consolidated.")


def is_wanted(rel: str) -> bool:
    """A non-shard file a converted checkpoint needs from the source (the card included: its metadata)."""
    return not is_hidden(rel) and not is_other_weights(rel)


def select_repo_files(listing: list[str], shards: list[str]) -> tuple[list[str], list[str]]:
    """Split a repo's files into (to download, other weight formats not downloaded); hidden files
    are in neither list."""
    shard_set = set(shards)
    take = sorted(p for p in listing if p in shard_set or p == INDEX_NAME or is_wanted(p))
    taken = set(take)
    return take, sorted(p for p in listing if p not in taken and not is_hidden(p))


def other_files(src: str | os.PathLike, shards: set[str]) -> tuple[list[Path], list[str]]:
    """The files of local checkpoint ``src`` to copy into its conversion (relative paths), and the
    other weight formats not copied (POSIX relative paths). ``shards``: the shard file names."""
    src = Path(src)
    rewritten = set(shards) | {INDEX_NAME, CONFIG_NAME, CARD_NAME}
    keep: list[Path] = []
    skipped: list[str] = []
    for root, dirs, names in os.walk(src):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(names):
            rel = (Path(root) / f).relative_to(src)
            posix = rel.as_posix()
            if posix in rewritten or is_hidden(posix):
                continue
            if is_other_weights(posix):
                skipped.append(posix)
            else:
                keep.append(rel)
    return keep, skipped


FLASHNORM_VERSION = 1  # the flashnorm_version this streamfold writes and understands


def flashnorm_config(cfg: dict, mode: str, vision: bool = False) -> dict:
    """The source ``config.json`` with the FlashNorm flags added (``flashnorm_vision``: the vision tower
    was folded too, ``--fold-vision``; absent otherwise)."""
    out = dict(cfg)
    out.update({"flashnorm": True, "flashnorm_mode": mode, "flashnorm_version": FLASHNORM_VERSION})
    if vision:
        out["flashnorm_vision"] = True
    return out
