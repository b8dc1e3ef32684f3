"""``inspect``: the fold plan and output sizes for a SRC from headers only (local, cached or remote)."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from .run.conversion import load_plan
from .core.errors import AlreadyFlashNorm, StreamfoldError
from .hub.client import Source, _api, _guard, _offline, _quiet_bars, is_repo_id, select_files
from .hub.source import _info_or_cache, resolve_source
from .planning.planner import Kind
from .core.reader import INDEX_NAME, Checkpoint, TensorInfo
from .core.units import human_bytes


def output_bytes(plan, tensors: dict[str, TensorInfo]) -> int:
    """Tensor data bytes of the converted checkpoint (what ``ConversionReport.bytes_out`` counts)."""
    from .core.dtypes import itemsize
    from .planning.dequant import output_of
    total = 0
    for name, t in tensors.items():
        a = plan.actions[name]
        if a.kind != Kind.DROP:
            total += math.prod(output_of(name, a, t.shape)[1]) * itemsize(a.out_dtype)
    for t in getattr(plan, "added", ()):  # identity norms restored by a mode change
        total += math.prod(t.shape) * itemsize(t.dtype)
    return total


def _out_bytes(plan, tensors: dict[str, TensorInfo]) -> int:
    """output_bytes, or the input size when there is no plan (already FlashNorm: nothing to write)."""
    return output_bytes(plan, tensors) if plan is not None else sum(t.nbytes for t in tensors.values())


@dataclass
class Inspection:
    """The fold plan for a SRC, with sizes; from local headers, cached files, or remote headers."""

    plan: object
    source: Source | None
    src: str
    how: str  # "local", "cache" or "remote"
    shards: int
    tensors: int
    bytes_in: int
    bytes_out: int
    download_files: list[str] | None = None
    download_bytes: int | None = None
    skipped_files: list[str] = field(default_factory=list)
    # An already-FlashNorm SRC: its FlashNormState; ``plan`` is then None (nothing to do) or a mode change.
    state: object | None = None

    def to_dict(self) -> dict:
        d = self.plan.to_dict() if self.plan is not None else {"model_type": self.state.model_type,
                                                                 "family": self.state.family}
        if self.state is not None:
            d["flashnorm"] = self.state.to_dict()
            d["mode_change"] = f"{self.state.mode} -> {self.plan.mode}" if self.plan is not None else None
            d["added"] = [t.name for t in self.plan.added] if self.plan is not None else []
        d["source"] = {"src": self.src, "how": self.how,
                       "repo_id": self.source.repo_id if self.source else None,
                       "commit": self.source.commit if self.source else None}
        d["sizes"] = {"shards": self.shards, "tensors": self.tensors, "bytes_in": self.bytes_in,
                      "bytes_out": self.bytes_out}
        if self.download_files is not None:
            d["download"] = {"files": self.download_files, "bytes": self.download_bytes,
                             "not_downloaded": self.skipped_files}
        return d

    def describe(self, each: bool = False) -> str:
        where = {"local": "local headers",
                 "cache": "the local Hugging Face cache",
                 "remote": "remote safetensors headers; no weights downloaded"}[self.how]
        commit = f" @ {self.source.commit[:12]}" if self.source and self.source.commit else ""
        if self.state is not None:  # already FlashNorm: its state, not a plan to fold again
            from .planning.remode import describe_remode
            lines = [f"source: {self.src}{commit} ({where})", self.state.describe(each)]
            if self.plan is not None:
                lines += [describe_remode(self.plan), f"sizes: {human_bytes(self.bytes_in)} in -> "
                          f"{human_bytes(self.bytes_out)} out ({self.plan.mode})"]
            return "\n".join(lines)
        lines = [f"source: {self.src}{commit} ({where})", self.plan.describe(each),
                 f"sizes: {self.tensors} tensors in {self.shards} shard(s), {human_bytes(self.bytes_in)} in -> "
                 f"{human_bytes(self.bytes_out)} out ({self.plan.mode}, merged dtype {self.plan.merged_dtype})"]
        if self.download_files is not None:
            size = f", {human_bytes(self.download_bytes)}" if self.download_bytes is not None else ""
            lines.append(f"converting downloads {len(self.download_files)} files{size}")
            if self.skipped_files:
                lines.append(f"  not downloaded (other weight formats / exports): "
                             f"{', '.join(self.skipped_files)}")
        return "\n".join(lines)


def inspect(src: str | os.PathLike, *, mode: str | None = None, merged_dtype: str | None = None,
            rules=None, revision: str | None = None, token: str | bool | None = None,
            dequantize=None, fold_vision: bool = False) -> Inspection:
    """The fold plan and output sizes for ``src``, reading headers only.

    A local folder (or, with ``HF_HUB_OFFLINE`` set, a cached Hub repo) is planned from its files. A Hub
    repo id is planned from its safetensors headers fetched remotely (plus ``config.json`` and the index):
    nothing the size of the weights is downloaded, and LayerNorm bias folds, which depend on the bias
    values, are decided at conversion.

    An already-FlashNorm SRC gives its FlashNormState (``.state``: mode, version, each foldable norm
    identity or absent) and no plan, or with ``mode`` set to the other mode, the plan of that change.
    ``dequantize``: plan ``--dequantize`` (local sources only so far). ``fold_vision``: the tower too.
    """
    text = os.fspath(src)
    if Path(text).exists() or not is_repo_id(text) or _offline():
        return _inspect_folder(resolve_source(text, revision=revision, token=token), text, mode=mode,
                               merged_dtype=merged_dtype, rules=rules, dequantize=dequantize,
                               fold_vision=fold_vision)
    if dequantize:
        raise StreamfoldError("--dequantize: inspect plans a local (or cached) checkpoint only so far")
    with _quiet_bars(True):
        found = _inspect_remote(text, mode=mode, merged_dtype=merged_dtype, rules=rules, revision=revision,
                                token=token, fold_vision=fold_vision)
    if isinstance(found, Source):  # the Hub is unreachable: the cached snapshot, as converting would use
        return _inspect_folder(found, text, mode=mode, merged_dtype=merged_dtype, rules=rules, fold_vision=fold_vision)
    return found


def _inspect_folder(source: Source, text: str, *, mode, merged_dtype, rules, dequantize=None,
                    fold_vision: bool = False) -> Inspection:
    try:
        ckpt, _, plan = load_plan(source.path, mode=mode, merged_dtype=merged_dtype, rules=rules, label=text,
                                  dequantize=dequantize, fold_vision=fold_vision)
    except AlreadyFlashNorm as e:  # nothing to fold: its FlashNorm state instead of a plan
        plan, state, ckpt = None, e.state, Checkpoint(source.path)
    else:
        state = plan.flashnorm
    try:
        tensors = dict(ckpt.tensors)
        shards = len(ckpt.shards)
    finally:
        ckpt.close()
    hub = source.repo_id is not None
    return Inspection(plan=plan, source=source if hub else None, src=text, how="cache" if hub else "local",
                      shards=shards, tensors=len(tensors), bytes_in=sum(t.nbytes for t in tensors.values()),
                      bytes_out=_out_bytes(plan, tensors), download_files=sorted(source.files) if hub else None,
                      skipped_files=source.skipped, state=state)


def _inspect_remote(repo_id: str, *, mode, merged_dtype, rules, revision, token,
                    fold_vision: bool = False) -> Inspection | Source:
    from .core.dtypes import DTYPES
    from .core.reader import read_config
    from .planning.remode import plan_checkpoint
    from .rules.schema import load_rules_file
    api = _api(token)
    info = _info_or_cache(api, repo_id, revision, token, files_metadata=True)
    if isinstance(info, Source):  # unreachable: the cached snapshot
        return info
    commit = info.sha
    sizes = {s.rfilename: s.size for s in (info.siblings or [])}
    if "config.json" not in sizes:
        raise StreamfoldError(f"{repo_id}: no config.json in the repo; a Hugging Face checkpoint needs one")
    with _guard(repo_id, revision, "downloading config.json"):
        cfg = read_config(Path(api.hf_hub_download(repo_id, "config.json", revision=commit, token=token)).parent)
    with _guard(repo_id, revision, "reading safetensors headers"):
        meta = api.get_safetensors_metadata(repo_id, revision=commit, token=token)
    tensors: dict[str, TensorInfo] = {}
    for fname, fmeta in meta.files_metadata.items():
        for name, t in fmeta.tensors.items():
            if t.dtype not in DTYPES:
                raise StreamfoldError(f"{repo_id}: {fname}: tensor {name!r} has unknown dtype {t.dtype!r}")
            if name in tensors:
                raise StreamfoldError(f"{repo_id}: {fname}: tensor {name!r} also in {tensors[name].path.name}")
            begin, end = t.data_offsets
            tensors[name] = TensorInfo(name, t.dtype, tuple(t.shape), Path(fname), begin, end)
    for name, fname in meta.weight_map.items():
        if name not in tensors or tensors[name].path.name != fname:
            raise StreamfoldError(f"{repo_id}: {fname} lacks tensor {name!r} that {INDEX_NAME} places there; "
                                  "the index and shards disagree")
    extra = load_rules_file(rules) if isinstance(rules, (str, os.PathLike)) else rules
    try:
        plan = plan_checkpoint(cfg, tensors, None, mode=mode, merged_dtype=merged_dtype, rules=extra, src=repo_id,
                               fold_vision=fold_vision)
        state = plan.flashnorm
    except AlreadyFlashNorm as e:
        plan, state = None, e.state
    shards = list(meta.files_metadata)
    take, skipped = select_files(sorted(sizes), shards)
    known = [sizes.get(p) for p in take]
    return Inspection(plan=plan, source=Source(path=Path(), display=repo_id, repo_id=repo_id, revision=revision,
                                               commit=commit),
                      src=repo_id, how="remote", shards=len(shards), tensors=len(tensors),
                      bytes_in=sum(t.nbytes for t in tensors.values()), bytes_out=_out_bytes(plan, tensors),
                      download_files=take,
                      download_bytes=sum(known) if all(k is not None for k in known) else None,
                      skipped_files=skipped, state=state)
