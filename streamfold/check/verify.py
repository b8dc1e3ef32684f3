"""verify(): prove a converted checkpoint is its source with the norms folded, without torch.

The source is re-planned (the same planner convert uses, in the mode and merged dtype the output
declares) and cut into the same task records convert executes (:func:`streamfold.planning.tasks.build_tasks`);
every output shard is then checked against its task's chunk records (:mod:`streamfold.check.taskcheck`,
the one element check):

- unchanged tensors (including norms that cannot fold) are byte-identical to the source, compared
  piece by piece (a direct byte comparison: stronger than comparing hashes, and cheaper);
- folded weights are, element by element and bit for bit, the exact product ``source x multiplier``
  rounded once to nearest-even to their stored dtype (any NaN matches any NaN), recomputed
  independently of the kernel (:mod:`streamfold.check.oracle`: float64 product, ml_dtypes/numpy rounding);
  wrong elements are reported with their index and distance from the exact product in ulps;
- folded norms are the identity (compat) or absent (strict); LayerNorm biases folded into consumer
  biases have exactly the bits of ``b + W @ beta``, the exact sum rounded once
  (:func:`streamfold.check.oracle.expected_bias`);
- ``config.json`` carries the FlashNorm flags and is otherwise the source's; every tensor sits in the
  shard the source has it in with the planned dtype and shape; each shard header is byte for byte the
  task's; the index matches the shard headers; the other files are the source's; no other weight
  format of the unfolded model was left behind (:mod:`streamfold.check.meta`);
- ``SHA256SUMS`` (written by convert) matches every file and lists all of them, when present.

Output shards are read once, sequentially per file (each piece feeds both the manifest hash and the
tensor check; the headers, a few KB, twice), source tensors once, all through bounded reused buffers
(never memory-mapped), so peak memory is set by the buffer budget whatever the model size
(:mod:`streamfold.check.checkrun`).

What this proves, and what it does not: the source is re-planned with the same planner and rules
convert used, so a pass means "DST is exactly this plan executed on SRC" (every byte accounted for),
whichever engine wrote it (local threads, Ray, tasks run from JSON). It does not prove the plan is
right for the model (that a norm really feeds only those linears, that the rules match the
architecture): that is what ``forward=True`` (an independent numpy forward pass of both checkpoints,
for the decoders :mod:`streamfold.check.forward` supports; :mod:`streamfold.check.forward_check`) and the
transformers test suite (``tests/test_architectures.py``: logits of the converted model in stock
transformers) check.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable

from . import meta
from .checkrun import Reader, run_jobs
from ..core.errors import AlreadyFlashNorm, StreamfoldError
from .forward_check import MIN_COSINE_EXACT, MIN_COSINE_ROUNDED, add_forward, run_forward
from ..core.manifest import MANIFEST_NAME
from .oracle import check_scaled
from ..quant.formats import quant_config
from ..planning.dequant import output_of
from ..planning.planner import MERGED_ALIASES, MODES, Kind, Plan, make_plan
from ..core.reader import Checkpoint, TensorInfo, read_config
from ..planning.remode import plan_checkpoint
from ..rules.schema import load_rules_file
from .taskcheck import Checker, Target, TensorCheck, tensor_checks
from ..planning.tasks import DEFAULT_BUDGET, build_tasks, chunk_bytes_for, default_workers
from .report import EXIT_FAILED, Problem, VerifyReport, sort_problems

__all__ = ["verify", "VerifyReport", "Problem", "EXIT_FAILED", "check_scaled", "run_forward",
           "MIN_COSINE_ROUNDED", "MIN_COSINE_EXACT"]
# what a checked tensor counts as, by its planned action
_COUNT = {Kind.COPY: "unchanged", Kind.SCALE: "folded", Kind.FILL: "identity", Kind.BIAS: "biases",
          Kind.DEQUANT: "dequantized"}


def verify(src: str | os.PathLike, dst: str | os.PathLike, *, mode: str | None = None,
           merged_dtype: str | None = None, rules: str | os.PathLike | dict | None = None,
           workers: int | None = None, memory_budget: int | None = None, forward: bool = False,
           forward_tokens: list[int] | int | None = None,
           progress: Callable[[int], Callable[[int], None]] | None = None, dequantize=None,
           fold_vision: bool | None = None) -> VerifyReport:
    """Check that ``dst`` is a correct FlashNorm conversion of ``src``; returns a :class:`VerifyReport`
    (``report.ok``, ``report.problems``). Reads only headers up front, then streams both checkpoints
    once through bounded buffers.

    ``mode`` / ``merged_dtype`` default to what ``dst`` declares (``config.json`` ``flashnorm_mode``;
    float32 if folded tensors are stored float32). ``forward`` additionally compares float32 logits of
    both checkpoints on ``forward_tokens`` (a list of ids, or a count of fixed pseudo-random ids; 16 by
    default). ``dequantize`` (None: read from ``dst``'s config.json: its quantization_config lists more
    modules as unquantized than the source's, or is gone) expects a ``--dequantize`` conversion.
    ``fold_vision`` (None: ``dst``'s config.json ``flashnorm_vision``) expects the tower folded too.
    Raises :class:`StreamfoldError` for bad input (an unreadable source, a missing ``dst``);
    problems with ``dst`` itself are reported, not raised.
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise StreamfoldError(f"{src}: not a folder (give the source checkpoint folder)")
    if not dst.is_dir():
        raise StreamfoldError(f"{dst}: not a folder (give the converted checkpoint folder)")
    for folder in (src, dst):
        try:
            os.listdir(folder)
        except OSError as e:
            raise StreamfoldError(f"{folder}: cannot read the folder ({e.strerror or e})") from None
    if mode is not None and mode not in MODES:
        raise StreamfoldError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    extra = load_rules_file(rules) if isinstance(rules, (str, os.PathLike)) else rules
    workers = max(1, workers or default_workers())
    report = _verify_tensors(src, dst, extra, mode, merged_dtype, workers, memory_budget or DEFAULT_BUDGET,
                             progress, dequantize, fold_vision)
    if forward:
        add_forward(report, src, dst, forward_tokens, memory_budget)
    return report


def _plan(src_ckpt: Checkpoint, src_cfg: dict, src: Path, mode: str, merged: str, rules, deq=None,
          vision: bool = False) -> Plan:
    try:  # an already-FlashNorm source converted to the other mode: the plan of that change
        return plan_checkpoint(src_cfg, src_ckpt.tensors, src_ckpt.read, mode=mode, merged_dtype=merged, rules=rules,
                               shard_of=src_ckpt.shard_of, src=str(src), dequantize=deq, fold_vision=vision)
    except AlreadyFlashNorm:  # same mode: the output must be the source's fold (of identity norms)
        return make_plan(src_cfg, src_ckpt.tensors, src_ckpt.read, mode=mode, merged_dtype=merged, rules=rules,
                         dequantize=deq, fold_vision=vision)


def _dequant_of(src_cfg: dict, dst: Path, want) -> str | None:
    """The ``dequantize`` mode a conversion used: as asked, else read from the two configs."""
    if want:
        return "consumers" if want is True else want
    try:
        dst_cfg = read_config(dst)
    except StreamfoldError:
        return None
    q_src = quant_config(src_cfg)
    if q_src is None:
        return None
    q_dst = quant_config(dst_cfg)
    if q_dst is None:
        return "all"
    return "consumers" if q_dst != q_src else None


def _derive_plan(src_ckpt: Checkpoint, src_cfg: dict, src: Path, dst_cfg: dict | None,
                 dst_tensors: dict[str, TensorInfo], want_mode: str | None, want_merged: str | None, rules,
                 problems: list[Problem], notes: list[str], deq=None, vision: bool = False) -> tuple[Plan, str, str]:
    """What should have happened: the source's plan in the mode and merged dtype asked for, or else
    the ones the output declares (or, when it does not say, shows)."""
    plan = _plan(src_ckpt, src_cfg, src, "compat", "source", rules, deq, vision)
    mode = want_mode or (dst_cfg or {}).get("flashnorm_mode")
    if mode not in MODES:
        folded_norms = [n.weight for n in plan.folded]
        mode = "strict" if folded_norms and not any(w in dst_tensors for w in folded_norms) else "compat"
        notes.append(f"mode {mode} inferred from the tensors present (config.json does not say)")
    elif dst_cfg is not None and want_mode and dst_cfg.get("flashnorm_mode") not in (None, mode):
        problems.append(Problem("config", "config.json", f"\"flashnorm_mode\" is {dst_cfg.get('flashnorm_mode')!r}, "
                                                         f"but {mode!r} was asked for"))
    merged = want_merged
    if merged is None:
        merged = "source"
        for src_name, a in plan.actions.items():
            name = output_of(src_name, a, src_ckpt.tensors[src_name].shape)[0]
            if (a.kind == Kind.DEQUANT or a.kind == Kind.SCALE and src_ckpt.tensors[src_name].dtype in ("BF16", "F16")) \
                    and name in dst_tensors and dst_tensors[name].dtype == "F32":
                merged = "float32"
                break
    else:  # spelled as convert takes it (fp32, bf16, ...); bf16 = source, for a bf16 source only
        want = MERGED_ALIASES.get(str(merged).lower())
        if want is None:
            raise StreamfoldError(f"merged dtype must be one of {', '.join(MERGED_ALIASES)}, not {merged!r}")
        if want == "bf16":
            _plan(src_ckpt, src_cfg, src, mode, want, rules, deq, vision)  # raises for a source whose folded weights are not bf16
        merged = "source" if want == "bf16" else want
    if (mode, merged) != ("compat", "source"):
        plan = _plan(src_ckpt, src_cfg, src, mode, merged, rules, deq, vision)
    return plan, mode, merged


def _labels(plan: Plan) -> dict[str, str]:
    """Names the chunk records do not carry, for the messages: kept norms, the terms of bias folds."""
    labels = {x: "a norm that cannot fold" for n in plan.kept for x in (n.weight, n.bias) if x}
    for name, a in plan.actions.items():
        if a.kind == Kind.BIAS:
            labels[name] = f"{a.source} @ {a.norm.bias}"
    return labels


def _check_dequant_counts(dst: Path, checks: list[TensorCheck], problems: list[Problem], counts: dict) -> None:
    """The card's dequantized-element counts (exact vs rounded) against verify's own: the oracle's exact
    mask, tensor by tensor (:func:`streamfold.check.quant_oracle.round_exact`), not the converter's count."""
    from ..core.files import CARD_NAME
    from ..quant.counts import counts_line, parse_counts_line
    if not checks:  # nothing dequantized (or nothing readable): no counts to state
        return
    exact = sum(tc.tally.exact for tc in checks)
    rounded = sum(tc.numel for tc in checks) - exact
    counts["dequant_exact"], counts["dequant_rounded"] = exact, rounded
    try:
        text = (dst / CARD_NAME).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        problems.append(Problem("files", CARD_NAME, f"cannot read the model card ({e}); it states the "
                                f"dequantized-element counts"))
        return
    stated = parse_counts_line(text)
    if stated != (exact, rounded):
        said = "states no dequantized-element counts" if stated is None else \
            f"states {stated[0]} exact and {stated[1]} rounded dequantized elements"
        problems.append(Problem("files", CARD_NAME, f"{said}; recounted: {counts_line(exact, rounded)[2:]}"))


def _verify_tensors(src: Path, dst: Path, rules, want_mode, want_merged, workers: int, budget: int,
                    progress, want_dequant=None, want_vision: bool | None = None) -> VerifyReport:
    t0 = time.perf_counter()
    problems: list[Problem] = []
    notes: list[str] = []
    counts = dict.fromkeys(("unchanged", "kept_norms", "folded", "identity", "absent", "biases", "dequantized",
                            "scales_dropped", "files"), 0)
    src_ckpt = Checkpoint(src)
    reader = Reader()
    try:
        src_cfg = read_config(src)
        deq = _dequant_of(src_cfg, dst, want_dequant)
        files, where, dst_tensors = meta.open_shards(dst, src_ckpt, problems)
        cfg_problems: list[Problem] = []
        dst_cfg = meta.check_config(dst, src_cfg, cfg_problems)  # read first; compared below with the plan's
        vision = want_vision if want_vision is not None else (dst_cfg or {}).get("flashnorm_vision") is True
        plan, mode, merged = _derive_plan(src_ckpt, src_cfg, src, dst_cfg, dst_tensors, want_mode, want_merged,
                                          rules, problems, notes, deq, vision)
        if plan.dequant is not None:  # the source config with the widened modules listed as unquantized
            cfg_problems = []
            meta.check_config(dst, plan.dequant.apply_config(src_cfg), cfg_problems)
        problems.extend(cfg_problems)
        checkable = meta.check_layout(plan, src_ckpt, files, where, dst_tensors, problems, counts)
        meta.check_index(dst, src_ckpt, files, where, problems)
        tasks = build_tasks(src_ckpt, plan, chunk_bytes_for(workers, budget))
        meta.check_headers(tasks, files, reader, problems)
        entries, hashers = meta.manifest_hashers(dst, files, problems)

        # tensor data: every output shard read once, in file order, each piece checked and hashed
        piece = max(1 << 12, budget // (workers * 4))  # two buffers per thread: half the budget
        labels = _labels(plan)
        checks: dict[str, TensorCheck] = {}
        for task in tasks:
            checks.update(tensor_checks(task, piece, labels))
        checker = Checker({s: f.path for s, f in src_ckpt.shards.items()}, reader, piece)
        groups = []
        for shard, f in files.items():
            path = dst / shard
            spans = [(0, path.stat().st_size, None, None)] if f is None else [(0, f.header_size, None, None)]
            for name, t in (f.tensors.items() if f is not None else ()):  # file order
                ok = name in checkable and where[name] == shard
                spans.append((t.begin, t.end, checks[name] if ok else None, Target(t.path, t.begin)))
            groups.append(checker.file_jobs(path, spans, hashers.get(shard)))
        run_jobs(groups, workers, progress)

        kinds = ({output_of(n, a, src_ckpt.tensors[n].shape)[0]: a.kind for n, a in plan.actions.items()}
                 | {t.name: Kind.FILL for t in plan.added})
        for name, tc in checks.items():
            if not tc.checked:
                continue
            p = tc.problem()
            if p is not None:
                problems.append(p)
                continue
            counts[_COUNT[kinds[name]]] += 1
            if kinds[name] == Kind.COPY and name in labels and not name.endswith(".bias"):  # norms, not tensors
                counts["kept_norms"] += 1
        if plan.dequant is not None:
            _check_dequant_counts(dst, [tc for n, tc in checks.items() if kinds.get(n) == Kind.DEQUANT and tc.checked],
                                  problems, counts)
        counts["files"] = meta.check_other_files(src, dst, src_ckpt, problems)
        manifest_state, hashed = "absent", 0
        if entries is not None:
            manifest_state, hashed = meta.check_manifest(dst, entries, hashers, problems)
        else:
            notes.append(f"no {MANIFEST_NAME} in the output (not checked)")
    finally:
        src_ckpt.close()
        reader.close()
    sort_problems(problems)
    return VerifyReport(
        src=str(src), dst=str(dst), mode=mode, merged_dtype=merged, family=plan.family,
        model_type=plan.model_type, problems=problems, notes=notes, counts=counts,
        bytes_read=reader.bytes_read + hashed, seconds=time.perf_counter() - t0, workers=workers,
        folds_rounded=any(a.kind in (Kind.SCALE, Kind.DEQUANT) and a.out_dtype in ("BF16", "F16")
                          for a in plan.actions.values()),
        manifest=manifest_state)
