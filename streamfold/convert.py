"""convert(): plan -> run the tasks (local threads or Ray) into a staging folder -> finish -> publish."""
from __future__ import annotations

import contextlib
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .run.conversion import ConversionPlan, finish, load_plan, plan
from .run.engine import Engine
from .core.errors import StreamfoldError
from .core.files import FLASHNORM_VERSION, flashnorm_config  # noqa: F401 - re-exported
from .run.journal import Journal
from .run.staging import Staging, check_destination
from .planning.planner import Kind
from .planning.tasks import Op
from .core.units import human_bytes

if TYPE_CHECKING:
    from .hub.remote import HubRef
    from .check.verify import VerifyReport

EXECUTORS = ("local", "ray")
__all__ = ["ConversionReport", "convert", "load_plan", "human_bytes", "EXECUTORS"]


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
    peak_disk: int | None = None  # stream=True: most local disk in use at once (source + output shards)
    resumed_shards: int = 0  # shards re-used from an interrupted run of the same conversion
    executor: str = "local"  # "ray": one Ray task per output shard (peak_disk is then the largest task's)
    layout: str | None = None  # the tensor-name layout, when not save_pretrained's (Plan.layout)
    composed: str | None = None  # a composed wrapper: how its language model was planned (Composed.describe)
    # --dequantize: per dequantized output tensor, [elements exact (the stored value is q*s*g), rounded once]
    dequant_counts: dict[str, list[int]] | None = None

    @property
    def dequant_totals(self) -> tuple[int, int] | None:
        """``(exact, rounded)`` dequantized elements over every tensor (None: nothing was dequantized)."""
        if self.dequant_counts is None:
            return None
        return (sum(v[0] for v in self.dequant_counts.values()), sum(v[1] for v in self.dequant_counts.values()))
    fold_vision: dict | None = None  # --fold-vision: the tower's norms folded and kept (Plan.vision_summary)

    def to_dict(self) -> dict:
        d = asdict(self)
        if self.dequant_counts is not None:
            d["dequant_exact"], d["dequant_rounded"] = self.dequant_totals
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
        if self.composed:
            lines.append(f"  {self.composed}")
        if self.fold_vision:
            lines.append(f"  vision tower folded too (--fold-vision): {self.fold_vision['folded']} tower norms folded, "
                         f"{self.fold_vision['kept']} kept")
        if self.layout:
            lines.append(f"  tensor names: {self.layout} (written back the same way)")
        for g in self.groups:
            if g["status"] == "keep":
                lines.append(f"  kept {g['norm']} x{g['count']}: {g['reason']}")
            else:
                lines.append(f"  folded {g['norm']} x{g['count']} -> {', '.join(g['consumers'])}")
        if self.skipped_files:
            lines.append(f"  not copied (other weight formats): {', '.join(self.skipped_files)}")
        lines.append(f"  {human_bytes(self.bytes_in)} in, {human_bytes(self.bytes_out)} out, "
                     f"{self.seconds:.2f} s ({rate}{self.workers} worker{'s' if self.workers != 1 else ''})")
        if self.dequant_counts is not None:
            e, r = self.dequant_totals
            lines.append(f"  dequantized: {len(self.dequant_counts)} tensors, {e + r} elements: {e} exact, "
                         f"{r} rounded once")
        if self.resumed_shards:
            lines.append(f"  resumed: {self.resumed_shards} shard(s) re-used from the interrupted run")
        if self.peak_disk is not None:
            lines.append(f"  streamed shard by shard: peak local disk {human_bytes(self.peak_disk)}"
                         + (" (per Ray task, on its worker)" if self.executor == "ray" else ""))
        if self.hub_url:
            lines.append(f"  pushed to {self.hub_url}")
        return "\n".join(lines)


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, mode: str | None = None,
            merged_dtype: str | None = None, overwrite: bool = False, workers: int | None = None,
            memory_budget: int | None = None, rules: str | os.PathLike | dict | None = None,
            progress: Callable[[int, int], Callable[[int], None]] | None = None,
            revision: str | None = None, token: str | bool | None = None, base_model: str | None = None,
            push_to_hub: str | None = None, private: bool = False,
            commit_message: str | None = None, manifest: bool = False,
            verify: bool = False, executor: str = "local", ray_address: str | None = None,
            stream: bool = False, resume: bool = True,
            log: Callable[[str], None] | None = None, dequantize: bool | str | None = None,
            fold_vision: bool = False) -> ConversionReport:
    """Convert checkpoint ``src`` into a FlashNorm checkpoint at ``dst``.

    ``mode``: ``"compat"`` (folded norms set to identity, the default) or ``"strict"`` (removed).
    ``merged_dtype``: ``"source"`` (default) or ``"float32"`` for folded weights.
    ``dequantize`` (a quantized ``src``, FP8 block so far): True widens the quantized consumers of folded
    norms and their fused siblings to bf16 (float32 with ``merged_dtype="float32"``), each element the
    exact ``q·s·g`` rounded once, and updates ``quantization_config``; ``"all"`` widens every one.
    ``fold_vision``: fold the vision tower too, with the family's derived tower rules (``vision_folds``;
    refused for a family without them); ``config.json`` gets ``"flashnorm_vision": true``.

    An already-FlashNorm ``src`` (config.json flags, or every foldable norm the identity / absent) is
    not folded again: without ``mode`` (or with its own mode) :class:`AlreadyFlashNorm` is raised and
    nothing is written; the other ``mode`` converts it (compat -> strict drops the identity norms,
    strict -> compat restores them; no weight changes, ``report.mode_change`` says which);
    ``merged_dtype="float32"`` is refused (the rounding cannot be undone). ``workers`` threads and a
    ``memory_budget`` in bytes bound speed and memory. ``rules``: a rules file or dict of families for
    architectures streamfold does not know. ``progress(total_bytes)`` may return a callback that is
    given byte counts as work completes. Raises :class:`StreamfoldError` on bad input, leaving
    ``dst`` untouched.

    ``src`` may be a Hub repo id (``org/name``, at ``revision``): only the files the output needs are
    downloaded, through huggingface_hub's cache (``HF_HOME``, ``HF_HUB_OFFLINE``, ``HF_TOKEN`` or
    ``token``). ``dst`` gets a model card (``README.md``; ``base_model`` overrides its base model).
    ``push_to_hub="org/name"`` then uploads ``dst`` in one commit (creating the repo, ``private`` if
    new); ``report.hub_url`` is its URL.

    ``manifest=True`` writes ``SHA256SUMS`` (``sha256sum -c`` format) covering every output
    file. ``verify=True`` runs :func:`streamfold.verify` on the result (before any push) and stores it
    in ``report.verification``; when it finds problems nothing is pushed.

    ``executor="ray"`` runs one Ray task per output shard (``ray_address``: a running cluster; None
    starts or joins a local one); each writes its shard into the staging folder beside ``dst``, which
    every worker must see (shared storage). From a Hub repo id the driver downloads no weights (it
    plans from remote headers) and each task downloads only its own source shards, into its worker's
    temporary directory, deleted when its shard is written (``verify``: each task checks its shard).

    ``stream=True`` (a Hub repo id ``src`` and ``push_to_hub``): fetch one source shard at a time,
    convert it, pre-upload the output shard, delete both, and commit everything at the end; ``dst``
    keeps only the small files. ``report.peak_disk`` is the most local disk used at once. With
    ``executor="ray"`` each task does that on its worker and returns the upload; the driver makes the
    one commit (``report.peak_disk``: the largest task's).

    The output is built beside ``dst`` and published in one step (:mod:`streamfold.run.staging`): an existing
    ``dst`` (replaced only with ``overwrite``) stays complete until then. ``log`` receives one-line notes
    (default: the ``streamfold`` logger), such as a killed run's partial output being removed or resumed:
    the staging folder keeps a journal of completed shards (:mod:`streamfold.run.journal`), and when a
    conversion is killed the same call re-uses the shards that check out (``resume=False`` discards them).
    """
    t0 = time.perf_counter()
    from .hub.client import _offline, is_repo_id  # huggingface_hub (imported lazily): repo ids, pushes
    from .hub.push import preflight
    if executor not in EXECUTORS:
        raise StreamfoldError(f"executor must be one of {', '.join(EXECUTORS)}, not {executor!r}")
    preflight(push_to_hub=push_to_hub, base_model=base_model, token=token)
    local = not is_repo_id(os.fspath(src)) or Path(src).exists()
    check_destination(src if local else None, dst, overwrite)  # before any download
    if stream:
        if fold_vision:
            raise StreamfoldError("--fold-vision with --stream is not supported yet; convert to a local folder")
        return _stream(src, Path(dst), t0, locals())
    dst = Path(dst)
    if executor == "ray":
        from .run.ray_executor import require_ray
        require_ray()  # before any work: one line naming the extra when Ray is missing
    with contextlib.ExitStack() as cleanup:
        remote = executor == "ray" and not local and not _offline()  # each Ray task fetches its own shards
        cplan, hub = _plan(src, dst, cleanup, remote=remote, overwrite=overwrite, revision=revision, token=token,
                           quiet=progress is None, mode=mode, merged_dtype=merged_dtype, rules=rules,
                           workers=workers, memory_budget=memory_budget,
                           **({"dequantize": dequantize} if dequantize else {}),
                           **({"fold_vision": True} if fold_vision else {}))
        return _convert(cplan, hub, dst, t0, locals())


def _plan(src, dst: Path, cleanup: contextlib.ExitStack, *, remote: bool, overwrite: bool, revision, token, quiet,
          **options) -> tuple[ConversionPlan, "HubRef | None"]:
    """The plan, from the resolved source folder, or (``remote``) from a Hub repo's remote headers, in a
    work folder beside ``dst`` that ``cleanup`` removes (``finish`` copies the small files from it)."""
    if remote:
        import shutil
        import tempfile
        from .run.hub_plan import plan_remote
        dst.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".{dst.name}.remote-", dir=dst.parent))
        cleanup.callback(shutil.rmtree, work, ignore_errors=True)
        return plan_remote(os.fspath(src), work / "src", revision=revision, token=token, **options)
    from .hub.source import resolve_source
    source = resolve_source(src, revision=revision, token=token, quiet=quiet)
    if not source.path.is_dir():
        raise StreamfoldError(f"{source.path}: not a folder (give a local checkpoint folder or a Hub repo id)")
    try:
        os.listdir(source.path)
    except OSError as e:
        raise StreamfoldError(f"{source.path}: cannot read the folder ({e.strerror or e})") from None
    check_destination(source.path, dst, overwrite)
    return plan(source.path, source=source, label=source.display, **options), None


def _convert(cplan: ConversionPlan, hub, dst: Path, t0: float, opts: dict) -> ConversionReport:
    """Run the plan's tasks into ``dst``'s staging folder, finish, publish, then verify and push."""
    from .core.version import __version__
    from .hub.push import push_folder
    source, mode, log, manifest = cplan.source, cplan.plan.mode, opts["log"], opts["manifest"]
    workers, memory_budget, push_to_hub, private = (opts["workers"], opts["memory_budget"], opts["push_to_hub"],
                                                    opts["private"])
    journal = Journal(cplan.fingerprint(), log=log,
                      counted={t.shard for t in cplan.tasks if any(c.op == Op.DEQUANT for c in t.chunks)})
    with Staging(dst, overwrite=opts["overwrite"], src=source.path, log=log,
                 adopt=journal.adopt if opts["resume"] else None) as st:
        journal.start(st.path)
        resumed = len(journal.done)
        todo = [t for t in cplan.tasks if t.shard not in journal.done]
        try:
            digests = run_tasks(cplan, st.path, executor=opts["executor"], ray_address=opts["ray_address"],
                                workers=workers, memory_budget=memory_budget, hash_outputs=manifest,
                                progress=opts["progress"], tasks=todo, on_done=journal.record, hub=hub,
                                verify=opts["verify"])
        except OSError as e:
            raise StreamfoldError(f"{e.filename or dst}: write failed ({e.strerror or e})") from None
        digests = {**journal.digests(), **digests}  # re-used shards without a digest are hashed by finish
        journal.seal()
        counts = journal.dequant_counts()  # every shard's, re-used ones included
        t_manifest = finish(cplan, st.path, digests=digests, manifest=manifest, base_model=opts["base_model"],
                            push_to_hub=push_to_hub, private=private, workers=workers, dst=st.dst,
                            dequant_counts=counts)
        st.publish()
    report = _report(cplan, dst, t0, Engine(workers).workers, manifest, t_manifest)
    report.resumed_shards, report.executor, report.dequant_counts = resumed, opts["executor"], counts
    if opts["verify"] and hub is None:  # from the Hub each Ray task checked its shard against its sources
        from .check.verify import verify as run_verify
        deq = cplan.plan.dequant.mode if cplan.plan.dequant is not None else None
        report.verification = run_verify(source.path, dst, mode=mode, merged_dtype=cplan.plan.merged_dtype,
                                         rules=opts["rules"], workers=workers, memory_budget=memory_budget,
                                         dequantize=deq, fold_vision=cplan.plan.vision)
        if not report.verification.ok:
            return report  # not pushed: the caller sees report.verification.problems
    if push_to_hub:
        report.hub_url = push_folder(
            dst, push_to_hub, private=private, token=opts["token"], quiet=opts["progress"] is None,
            commit_message=opts["commit_message"]
            or f"FlashNorm ({mode}) conversion of {source.label} with streamfold {__version__}").url
    return report


def _stream(src, dst: Path, t0: float, opts: dict) -> ConversionReport:
    from .hub.client import is_repo_id
    from .run.stream import stream_convert
    if not opts["push_to_hub"]:
        raise StreamfoldError("--stream converts Hub to Hub: give --push-to-hub ORG/NAME")
    if Path(src).exists() or not is_repo_id(str(src)):
        raise StreamfoldError(f"{src}: --stream reads a Hub repo id (org/name), not a local folder")
    out = stream_convert(str(src), dst, push_to_hub=opts["push_to_hub"], revision=opts["revision"],
                         token=opts["token"], mode=opts["mode"], merged_dtype=opts["merged_dtype"],
                         rules=opts["rules"], workers=opts["workers"], memory_budget=opts["memory_budget"],
                         manifest=opts["manifest"], verify=opts["verify"], base_model=opts["base_model"],
                         private=opts["private"], commit_message=opts["commit_message"], progress=opts["progress"],
                         executor=opts["executor"], ray_address=opts["ray_address"], dequantize=opts["dequantize"])
    report = _report(out["plan"], dst, t0, Engine(opts["workers"]).workers, opts["manifest"], 0.0)
    report.hub_url, report.peak_disk, report.executor = out["url"], out["peak_disk"], opts["executor"]
    report.dequant_counts = out["dequant"]
    return report


def run_tasks(cplan: ConversionPlan, out_dir: Path, *, executor: str = "local", ray_address: str | None = None,
              workers: int | None = None, memory_budget: int | None = None, hash_outputs: bool = False,
              progress: Callable[[int], Callable[[int], None]] | None = None, tasks=None,
              on_done=None, hub=None, verify: bool = False) -> dict[str, str]:
    """Run ``tasks`` (default: all of the plan's) into ``out_dir``; returns shard sha256s when hashed.

    ``hub`` (Ray only): a :class:`~streamfold.hub.remote.HubRef`; each task fetches its own source
    shards from it (and, with ``verify``, checks its shard against them). ``on_done(shard, size, sha256,
    dequant)`` is called as each shard completes (``dequant``: its dequantized-element counts or None)."""
    tasks = cplan.tasks if tasks is None else tasks
    if executor == "ray":
        from .run.ray_executor import run_on_ray
        results = run_on_ray(tasks, cplan.src if hub is None else None, out_dir, address=ray_address,
                             workers=workers, memory_budget=memory_budget, hash_outputs=hash_outputs,
                             on_done=on_done, hub=hub, verify=verify and hub is not None)
        return {s: r["sha256"] for s, r in results.items() if r["sha256"]}
    tick = progress(sum(t.src_bytes for t in tasks)) if progress else None
    engine = Engine(workers, memory_budget)
    done = None if on_done is None else (lambda s, n, d: on_done(s, n, d, engine.counts.of(s)))
    return engine.run(tasks, cplan.src, out_dir, tick, hash_outputs=hash_outputs, on_done=done)


def _report(cplan: ConversionPlan, dst: Path, t0: float, workers: int, manifest: bool,
            t_manifest: float) -> ConversionReport:
    p = cplan.plan
    return ConversionReport(
        src=cplan.source.display, dst=str(dst), mode=p.mode, merged_dtype=p.merged_dtype, family=p.family,
        model_type=p.model_type, norms_folded=len(p.folded), norms_kept=len(p.kept),
        tensors_folded=p.count(Kind.SCALE), tensors_identity=p.count(Kind.FILL),
        tensors_dropped=p.count(Kind.DROP), tensors_copied=p.count(Kind.COPY),
        biases_updated=p.count(Kind.BIAS), bytes_in=cplan.bytes_in, bytes_out=cplan.output_bytes,
        seconds=time.perf_counter() - t0, workers=workers, groups=p.groups(),
        skipped_files=cplan.skipped, copied_files=list(cplan.files), source_commit=cplan.source.commit,
        manifest=manifest, manifest_seconds=round(t_manifest, 3),
        mode_change=f"{p.flashnorm.mode} -> {p.mode}" if p.flashnorm is not None else None,
        tensors_restored=len(p.added), layout=p.layout,
        composed=p.composed.describe() if p.composed is not None else None, fold_vision=p.vision_summary())
