"""The three steps of a conversion as public API: ``plan`` -> ``run_task`` per task -> ``finish``.

``plan`` reads headers and norm vectors and returns a :class:`ConversionPlan` whose ``tasks`` are
independent JSON-serialisable values, one per output shard; ``run_task`` writes one shard from one
task (in this process, another, or on another machine that sees the same source bytes);
``finish`` writes everything else into the output folder: the index, ``config.json`` with the
FlashNorm flags, the model card, the source's other files and, optionally, ``SHA256SUMS``.
:func:`streamfold.convert` is these three plus a staging folder, resume and publishing.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..card.render import write_card
from .engine import PARTIAL_SUFFIX, Engine
from ..core.errors import StreamfoldError
from ..core.files import CARD_NAME, flashnorm_config, other_files
from ..hub.client import Source
from ..hub.source import resolve_source
from ..core.manifest import write_manifest
from ..planning.dequant import output_of
from ..planning.planner import Kind, Plan
from ..core.reader import INDEX_NAME, Checkpoint, TensorInfo, read_config
from ..planning.remode import plan_checkpoint
from ..rules.schema import load_rules_file
from ..planning.tasks import SCHEMA, Task, build_tasks, chunk_bytes_for


def load_plan(src: str | os.PathLike, *, mode: str | None = None, merged_dtype: str | None = None,
              rules: str | os.PathLike | dict | None = None, label: str | None = None,
              read=None, dequantize=None, fold_vision: bool = False) -> tuple[Checkpoint, dict, Plan]:
    """Open and validate a local checkpoint and plan its conversion (headers and norms only).

    An already-FlashNorm ``src`` raises :class:`AlreadyFlashNorm` (closing it) or plans a mode change;
    see :func:`streamfold.planning.remode.plan_checkpoint` (``label`` names ``src`` in its messages).
    ``read(tensor_info)`` overrides how the (tiny) norm vectors are read, e.g. by HTTP range requests
    when the local shards are header-only stubs."""
    src = Path(src)
    ckpt = Checkpoint(src)
    cfg = read_config(src)
    extra = load_rules_file(rules) if isinstance(rules, (str, os.PathLike)) else rules
    custom = read

    def read(name: str):
        return ckpt.read(name) if custom is None else custom(ckpt.tensors[name])
    try:
        plan = plan_checkpoint(cfg, ckpt.tensors, read, mode=mode, merged_dtype=merged_dtype, rules=extra,
                               shard_of=ckpt.shard_of, src=label or str(src), dequantize=dequantize,
                               fold_vision=fold_vision)
    except BaseException:
        ckpt.close()
        raise
    return ckpt, cfg, plan


@dataclass
class ConversionPlan:
    """A planned conversion: the norm plan, one :class:`~streamfold.planning.tasks.Task` per output shard,
    and what :func:`finish` needs (config, other files, the source's provenance)."""

    source: Source
    cfg: dict
    plan: Plan
    tensors: dict[str, TensorInfo]
    sharded: bool
    tasks: list[Task]
    files: list[str]  # other files copied into the output (relative POSIX paths)
    skipped: list[str]  # source files not carried over (other weight formats)
    options: dict = field(default_factory=dict)  # mode, merged_dtype, rules (as given)

    @property
    def src(self) -> Path:
        return self.source.path

    @property
    def bytes_in(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def output_bytes(self) -> int:
        """Tensor data bytes of the output (the index's ``total_size``)."""
        return sum(t.layout().data_bytes for t in self.tasks)

    def weight_map(self) -> dict[str, str]:
        return {name: t.shard for t in self.tasks for name, _, _ in t.tensors}

    def fingerprint(self) -> dict:
        """What the output depends on: every source file's size, header hash and mtime (a Hub source:
        the commit instead), the norm vectors, the options and the task schema (not the chunking: the
        bytes do not depend on it)."""
        import hashlib
        norms = hashlib.sha256()
        for t in self.tasks:
            for k in sorted(t.norms):
                for part in sorted(t.norms[k]):
                    norms.update(f"{t.shard}/{k}/{part}".encode() + t.norms[k][part].tobytes())
        rules = self.options.get("rules")
        if isinstance(rules, (str, os.PathLike)):
            rules = load_rules_file(rules)
        sources = {}
        commit = self.source.commit  # a Hub source: the commit pins the bytes (local stubs' mtimes say nothing)
        for t in self.tasks:
            for s, f in sorted(t.sources.items()):
                sources[s] = {"size": f.size, "header_sha256": f.header_sha256,
                              "mtime_ns": None if commit else os.stat(self.src / s).st_mtime_ns}
        return {"schema": SCHEMA, "sources": sources, "commit": commit,
                "options": {"mode": self.plan.mode, "merged_dtype": self.plan.merged_dtype,
                            "dequantize": self.plan.dequant.mode if self.plan.dequant is not None else None,
                            "fold_vision": self.plan.vision,
                            "rules": json.dumps(rules, sort_keys=True, default=str) if rules else None},
                "norms_sha256": norms.hexdigest()}


def plan(src: str | os.PathLike, *, mode: str | None = None, merged_dtype: str | None = None,
         rules: str | os.PathLike | dict | None = None, workers: int | None = None,
         memory_budget: int | None = None, revision: str | None = None, token: str | bool | None = None,
         quiet: bool = True, source: Source | None = None, read=None, label: str | None = None,
         dequantize=None, fold_vision: bool = False) -> ConversionPlan:
    """Plan the conversion of ``src`` (a folder, or a Hub repo id: downloaded first) into tasks.

    ``workers`` and ``memory_budget`` set the chunk size the tasks are cut into (the output bytes do
    not depend on it)."""
    source = source or resolve_source(src, revision=revision, token=token, quiet=quiet)
    if not source.path.is_dir():
        raise StreamfoldError(f"{source.path}: not a folder (give a local checkpoint folder or a Hub repo id)")
    ckpt, cfg, p = load_plan(source.path, mode=mode, merged_dtype=merged_dtype, rules=rules, read=read,
                             label=label or source.display, dequantize=dequantize, fold_vision=fold_vision)
    try:
        tasks = build_tasks(ckpt, p, chunk_bytes_for(workers, memory_budget))
        files, skipped = other_files(source.path, set(ckpt.shards))
        rels = [f.as_posix() for f in files]
        if source.files is not None:  # a Hub snapshot: only the files selected for download
            rels, skipped = [r for r in rels if r in source.files], source.skipped
        rels = [r for r in rels if r != CARD_NAME]  # the model card replaces the source's
        return ConversionPlan(source=source, cfg=cfg, plan=p, tensors=dict(ckpt.tensors), sharded=ckpt.sharded,
                              tasks=tasks, files=rels, skipped=skipped,
                              options={"mode": mode, "merged_dtype": merged_dtype, "rules": rules,
                                       "dequantize": dequantize, "fold_vision": fold_vision})
    finally:
        ckpt.close()


@dataclass
class ShardResult:
    """A written output shard: its name, size, (when hashed) sha256 and, when it dequantized tensors,
    ``dequant``: ``{tensor: [exact, rounded]}`` element counts (:mod:`streamfold.run.dequant_count`)."""

    shard: str
    size: int
    sha256: str | None
    dequant: dict[str, list[int]] | None = None


def run_task(task: Task, out_dir: str | os.PathLike, *, src: str | os.PathLike | dict[str, Path],
             workers: int | None = None, memory_budget: int | None = None, hash_output: bool = False,
             progress=None) -> ShardResult:
    """Write ``task``'s shard into ``out_dir``, reading the source files from the folder ``src`` (or a
    map of file name -> path). The shard appears under its own name only when complete."""
    out = {}

    def done(shard: str, size: int, digest: str | None) -> None:
        out["r"] = ShardResult(shard, size, digest)
    sources = {k: Path(v) for k, v in src.items()} if isinstance(src, dict) else Path(src)
    engine = Engine(workers, memory_budget)
    engine.run([task], sources, Path(out_dir), progress=progress, hash_outputs=hash_output, on_done=done)
    out["r"].dequant = engine.counts.of(task.shard)
    return out["r"]


def finish(cplan: ConversionPlan, out_dir: str | os.PathLike, *, digests: dict[str, str] | None = None,
           manifest: bool = False, base_model: str | None = None, push_to_hub: str | None = None,
           private: bool = False, workers: int | None = None, shards_present: bool = True,
           dst: str | os.PathLike | None = None, dequant_counts: dict[str, list[int]] | None = None,
           results=None) -> float:
    """Complete ``out_dir`` after every task ran: index, config flags, card, other files, manifest.

    Checks that every shard is there at its planned size (``shards_present=False`` skips that, for
    the streaming Hub path where shards are uploaded and deleted as they are done). Returns the
    seconds spent on the manifest. ``dst``: the folder the output will be published as (the model
    card names it; default ``out_dir``). A ``--dequantize`` plan's card states how many dequantized
    elements are exact and how many were rounded: pass ``results`` (the :class:`ShardResult` of every
    task) or ``dequant_counts`` (``{tensor: [exact, rounded]}``, their ``.dequant`` merged)."""
    from ..core.version import __version__
    from ..quant.counts import merge_counts
    if dequant_counts is None and results is not None:
        dequant_counts = merge_counts(r.dequant for r in results)
    if dequant_counts is None and any(a.kind == Kind.DEQUANT for a in cplan.plan.actions.values()):
        raise StreamfoldError("finish: the plan dequantizes weights (--dequantize): pass results= (the ShardResult "
                              "of every run_task) so the model card can state the exact and rounded element counts")
    out_dir = Path(out_dir)
    for p in out_dir.glob(f".*{PARTIAL_SUFFIX}"):  # left by a killed attempt
        p.unlink(missing_ok=True)
    if shards_present:
        for t in cplan.tasks:
            p = out_dir / t.shard
            size = p.stat().st_size if p.is_file() else None
            if size != t.file_bytes:
                raise StreamfoldError(f"{p}: output shard {'missing' if size is None else f'has {size} bytes'}"
                                      f"{'' if size is None else f', expected {t.file_bytes}'}; run its task")
    if cplan.sharded:
        wm = cplan.weight_map()
        index = {"metadata": {"total_size": cplan.output_bytes},
                 "weight_map": {o: wm[o] for n, t in cplan.tensors.items() if (a := cplan.plan.actions[n]).kind != Kind.DROP
                                for o in (output_of(n, a, t.shape)[0],)}}  # MXFP4 experts: their dequantized name
        index["weight_map"].update({t.name: t.shard for t in cplan.plan.added})  # restored identity norms
        (out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    cfg_out = flashnorm_config(cplan.cfg, cplan.plan.mode, cplan.plan.vision)
    if cplan.plan.dequant is not None:  # widened modules listed as unquantized (or no quantization left)
        cfg_out = cplan.plan.dequant.apply_config(cfg_out)
    (out_dir / "config.json").write_text(json.dumps(cfg_out, indent=2) + "\n", encoding="utf-8")
    for rel in cplan.files:
        (out_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(cplan.src / rel, out_dir / rel)  # contents only: modes from the umask, as with cp
    from ..card.remode import write_remode_card
    card = write_card if cplan.plan.flashnorm is None else write_remode_card  # a mode change: a card of its own
    card(out_dir, plan=cplan.plan, tensors=cplan.tensors, cfg=cplan.cfg, source=cplan.source, dst=dst or out_dir,
               version=__version__, bytes_in=cplan.bytes_in, bytes_out=cplan.output_bytes,
               push_to_hub=push_to_hub, base_model=base_model, rules=cplan.options.get("rules"), private=private,
               **({"dequant_counts": dequant_counts} if cplan.plan.flashnorm is None else {}))
    t0 = time.perf_counter()
    if manifest:  # shards hashed while they were written (digests); the small files now
        write_manifest(out_dir, digests=digests, workers=Engine(workers).workers)
    return time.perf_counter() - t0
