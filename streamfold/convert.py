"""convert(): read -> plan -> fold -> write, into a staging folder published in one step (staging.py)."""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .engine import Engine
from .errors import StreamfoldError
from .files import other_files
from .manifest import write_manifest
from .plan import Plan
from .reader import INDEX_NAME, Checkpoint, read_config
from .remode import FLASHNORM_VERSION, plan_checkpoint
from .rules import load_rules_file
from .staging import Staging, check_destination

if TYPE_CHECKING:
    from .verify import VerifyReport



@dataclass
class ConversionReport:
    """What a conversion did: the plan summary, tensor counts, sizes and timings."""

    src: str
    dst: str
    mode: str
    merged_dtype: str
    family: str
    model_type: str
    norms_folded: int
    norms_kept: int
    tensors_folded: int
    tensors_identity: int
    tensors_dropped: int
    tensors_copied: int
    biases_updated: int
    bytes_in: int
    bytes_out: int
    seconds: float
    workers: int
    groups: list[dict] = field(default_factory=list)
    skipped_files: list[str] = field(default_factory=list)
    copied_files: list[str] = field(default_factory=list)
    source_commit: str | None = None  # Hub sources: the commit converted
    mode_change: str | None = None  # an already-FlashNorm source converted to the other mode: "compat -> strict"
    tensors_restored: int = 0  # strict -> compat: identity norm tensors created
    hub_url: str | None = None  # set when the output was pushed (push_to_hub)
    manifest: bool = False  # SHA256SUMS written
    manifest_seconds: float = 0.0
    verification: "VerifyReport | None" = None  # convert(verify=True): the tensor-level verification

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.verification is not None:
            d["verification"] = self.verification.to_dict()
        return d

    def summary(self) -> str:
        rate = f"{human_bytes(int(self.bytes_in / self.seconds))}/s, " if self.seconds > 0 else ""
        if self.mode_change:  # an already-FlashNorm source: no weight changed
            return "\n".join([
                f"streamfold: {self.src} -> {self.dst} ({self.model_type}, already FlashNorm, mode "
                f"{self.mode_change})",
                f"  identity norm tensors dropped: {self.tensors_dropped}, restored: {self.tensors_restored}; "
                f"tensors copied unchanged: {self.tensors_copied}",
                f"  {human_bytes(self.bytes_in)} in, {human_bytes(self.bytes_out)} out, {self.seconds:.2f} s"]
                + ([f"  pushed to {self.hub_url}"] if self.hub_url else []))
        lines = [f"streamfold: {self.src} -> {self.dst} ({self.model_type}, {self.mode}, merged dtype "
                 f"{self.merged_dtype})",
                 f"  norms folded: {self.norms_folded}, kept: {self.norms_kept}; tensors folded: "
                 f"{self.tensors_folded}, set to identity: {self.tensors_identity}, dropped: "
                 f"{self.tensors_dropped}, copied: {self.tensors_copied}"
                 + (f", biases updated: {self.biases_updated}" if self.biases_updated else "")]
        for g in self.groups:
            if g["status"] == "keep":
                lines.append(f"  kept {g['norm']} x{g['count']}: {g['reason']}")
            else:
                lines.append(f"  folded {g['norm']} x{g['count']} -> {', '.join(g['consumers'])}")
        if self.skipped_files:
            lines.append(f"  not copied (other weight formats): {', '.join(self.skipped_files)}")
        lines.append(f"  {human_bytes(self.bytes_in)} in, {human_bytes(self.bytes_out)} out, "
                     f"{self.seconds:.2f} s ({rate}{self.workers} worker{'s' if self.workers != 1 else ''})")
        if self.hub_url:
            lines.append(f"  pushed to {self.hub_url}")
        return "\n".join(lines)


def human_bytes(n: int) -> str:
    """``1234567`` -> ``"1.23 MB"`` (decimal units, as download sizes are quoted)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def flashnorm_config(cfg: dict, mode: str) -> dict:
    out = dict(cfg)
    out.update({"flashnorm": True, "flashnorm_mode": mode, "flashnorm_version": FLASHNORM_VERSION})
    return out


def load_plan(src: str | os.PathLike, *, mode: str | None = None, merged_dtype: str | None = None,
              rules: str | os.PathLike | dict | None = None,
              label: str | None = None) -> tuple[Checkpoint, dict, Plan]:
    """Open and validate a local checkpoint and plan its conversion (headers and norms only).

    An already-FlashNorm ``src`` raises :class:`AlreadyFlashNorm` (closing it) or plans a mode change;
    see :func:`streamfold.remode.plan_checkpoint` (``label`` names ``src`` in its messages)."""
    src = Path(src)
    ckpt = Checkpoint(src)
    cfg = read_config(src)
    extra = load_rules_file(rules) if isinstance(rules, (str, os.PathLike)) else rules

    def read(name: str):
        return ckpt.read(name)
    try:
        plan = plan_checkpoint(cfg, ckpt.tensors, read, mode=mode, merged_dtype=merged_dtype, rules=extra,
                               shard_of=ckpt.shard_of, src=label or str(src))
    except BaseException:
        ckpt.close()
        raise
    return ckpt, cfg, plan


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, mode: str | None = None,
            merged_dtype: str | None = None, overwrite: bool = False, workers: int | None = None,
            memory_budget: int | None = None, rules: str | os.PathLike | dict | None = None,
            progress: Callable[[int, int], Callable[[int], None]] | None = None,
            revision: str | None = None, token: str | bool | None = None, base_model: str | None = None,
            push_to_hub: str | None = None, private: bool = False,
            commit_message: str | None = None, manifest: bool = False, verify: bool = False,
            log: Callable[[str], None] | None = None) -> ConversionReport:
    """Convert checkpoint ``src`` into a FlashNorm checkpoint at ``dst``.

    ``mode``: ``"compat"`` (folded norms set to identity, the default) or ``"strict"`` (removed).
    ``merged_dtype``: ``"source"`` (default) or ``"float32"`` for folded weights.

    An already-FlashNorm ``src`` (config.json flags, or every foldable norm the identity / absent) is
    not folded again: without ``mode`` (or with its own mode) :class:`AlreadyFlashNorm` is raised and
    nothing is written; the other ``mode`` converts it (compat -> strict drops the identity norms,
    strict -> compat restores them; no weight changes, ``report.mode_change`` says which);
    ``merged_dtype="float32"`` is refused (the rounding cannot be undone). ``workers`` threads and a
    ``memory_budget`` in bytes bound speed and memory. ``rules``: a rules file or dict of families for
    architectures streamfold does not know. ``progress(total_bytes)`` may return a callback that is
    given byte counts as work completes. Raises :class:`StreamfoldError` on bad input, leaving
    ``dst`` untouched.

    The output is built beside ``dst`` and published in one step (:mod:`streamfold.staging`): an existing
    ``dst`` (replaced only with ``overwrite``) stays complete until then. ``log`` receives one-line notes,
    such as a killed run's partial output being removed (default: the ``streamfold`` logger).

    ``src`` may be a Hub repo id (``org/name``, at ``revision``): only the files the output needs are
    downloaded, through huggingface_hub's cache (``HF_HOME``, ``HF_HUB_OFFLINE``, ``HF_TOKEN`` or
    ``token``). ``dst`` gets a model card (``README.md``; ``base_model`` overrides its base model).
    ``push_to_hub="org/name"`` then uploads ``dst`` in one commit (creating the repo, ``private`` if
    new); ``report.hub_url`` is its URL.

    ``manifest=True`` writes ``SHA256SUMS`` (``sha256sum -c`` format) covering every output
    file. ``verify=True`` runs :func:`streamfold.verify` on the result (before any push) and stores it
    in ``report.verification``; when it finds problems nothing is pushed.
    """
    t0 = time.perf_counter()
    from . import __version__
    from .card import write_card
    from .remode_card import write_remode_card
    from .hub import is_repo_id, preflight, push_folder, resolve_source  # huggingface_hub: repo ids, pushes
    preflight(push_to_hub=push_to_hub, base_model=base_model, token=token)
    local = not is_repo_id(os.fspath(src)) or Path(src).exists()
    check_destination(src if local else None, dst, overwrite)  # before any download
    source = resolve_source(src, revision=revision, token=token, quiet=progress is None)
    src = source.path
    if not src.is_dir():
        raise StreamfoldError(f"{src}: not a folder (give a local checkpoint folder or a Hub repo id)")
    try:
        os.listdir(src)
    except OSError as e:
        raise StreamfoldError(f"{src}: cannot read the folder ({e.strerror or e})") from None
    check_destination(src, dst, overwrite)
    ckpt, cfg, plan = load_plan(src, mode=mode, merged_dtype=merged_dtype, rules=rules, label=source.display)
    mode, merged_dtype = plan.mode, plan.merged_dtype
    engine = Engine(ckpt, plan, workers=workers, memory_budget=memory_budget)
    files, skipped = other_files(src, set(ckpt.shards))
    if source.files is not None:  # a Hub snapshot: only the files selected for download
        files, skipped = [f for f in files if f.as_posix() in source.files], source.skipped
    try:
        with Staging(dst, overwrite=overwrite, src=src, log=log) as st:
            tmp = st.path
            tick = progress(ckpt.total_bytes) if progress else None
            try:
                shard_digests = engine.run(tmp, tick, hash_outputs=manifest)
            except OSError as e:
                raise StreamfoldError(f"{e.filename or dst}: write failed ({e.strerror or e})") from None
            if ckpt.sharded:
                index = {"metadata": {"total_size": engine.output_bytes},
                         "weight_map": {n: s for s, f in ckpt.shards.items() for n in f.tensors
                                        if plan.actions[n].kind != "drop"}}
                index["weight_map"].update({t.name: t.shard for t in plan.added})
                (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
            (tmp / "config.json").write_text(json.dumps(flashnorm_config(cfg, mode), indent=2) + "\n",
                                             encoding="utf-8")
            for rel in files:  # contents only: modes come from the umask, as with cp
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src / rel, tmp / rel)
            card = write_card if plan.flashnorm is None else write_remode_card  # remode: a card of its own
            card(tmp, plan=plan, tensors=ckpt.tensors, cfg=cfg, source=source, dst=dst, version=__version__,
                 bytes_in=ckpt.total_bytes, bytes_out=engine.output_bytes, push_to_hub=push_to_hub,
                 base_model=base_model, rules=rules, private=private)
            t_manifest = time.perf_counter()
            if manifest:  # shards were hashed while they were written; the small files now
                write_manifest(tmp, digests=shard_digests, workers=engine.workers)
            t_manifest = time.perf_counter() - t_manifest
            st.publish()
    finally:
        ckpt.close()
    report = ConversionReport(
        src=source.display, dst=str(dst), mode=mode, merged_dtype=plan.merged_dtype, family=plan.family,
        model_type=plan.model_type, norms_folded=len(plan.folded), norms_kept=len(plan.kept),
        tensors_folded=plan.count("scale"), tensors_identity=plan.count("fill"),
        tensors_dropped=plan.count("drop"), tensors_copied=plan.count("copy"),
        biases_updated=plan.count("bias"), bytes_in=ckpt.total_bytes, bytes_out=engine.output_bytes,
        seconds=time.perf_counter() - t0, workers=engine.workers, groups=plan.groups(),
        skipped_files=skipped, copied_files=[r.as_posix() for r in files], source_commit=source.commit,
        manifest=manifest, manifest_seconds=round(t_manifest, 3),
        mode_change=f"{plan.flashnorm.mode} -> {mode}" if plan.flashnorm is not None else None,
        tensors_restored=len(plan.added))
    if verify:
        from .verify import verify as run_verify
        report.verification = run_verify(src, dst, mode=mode, merged_dtype=plan.merged_dtype, rules=rules,
                                         workers=workers, memory_budget=memory_budget)
        if not report.verification.ok:
            return report  # not pushed: the caller sees report.verification.problems
    if push_to_hub:
        report.hub_url = push_folder(
            dst, push_to_hub, private=private, token=token, quiet=progress is None, commit_message=commit_message
            or f"FlashNorm ({mode}) conversion of {source.label} with streamfold {__version__}").url
    return report

