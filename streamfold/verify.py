"""verify(): prove a converted checkpoint is its source with the norms folded, without torch.

The source is re-planned (the same planner convert uses, in the mode and merged dtype the output
declares) and every output tensor is compared with what the plan says it must be:

- unchanged tensors (including norms that cannot fold) are byte-identical to the source, compared
  chunk by chunk (a direct byte comparison: stronger than comparing hashes, and cheaper);
- folded weights are, element by element and bit for bit, the exact product ``source x multiplier``
  rounded once to nearest-even to their stored dtype (any NaN matches any NaN), recomputed
  independently of the kernel (:mod:`streamfold.oracle`: float64 product, ml_dtypes/numpy rounding);
  wrong elements are reported with their distance from the exact product in ulps;
- folded norms are the identity (compat) or absent (strict); LayerNorm biases folded into consumer
  biases equal ``b + W @ beta`` to within one rounding (half an ulp of the stored value plus a
  1e-12 x ``|b| + |W| @ |beta|`` allowance for the float64 summation: not bit-exact);
- ``config.json`` carries the FlashNorm flags and is otherwise the source's; every tensor sits in the
  shard the source has it in with the planned dtype and shape; the index matches the shard headers;
  the other files are the source's; no other weight format of the unfolded model was left behind;
- ``SHA256SUMS`` (written by convert) matches every file and lists all of them, when present.

Output shards are read exactly once, sequentially per file (each chunk feeds both the manifest hash
and the tensor check), source tensors once, all through bounded reused buffers (never memory-mapped),
so peak memory is the conversion's buffer budget whatever the model size.

What this proves, and what it does not: the source is re-planned with the same planner and rules
convert used, so a pass means "DST is exactly this plan executed on SRC" (every byte accounted for).
It does not prove the plan is right for the model (that a norm really feeds only those linears, that
the rules match the architecture): that is what ``forward=True`` (an independent numpy forward pass of
both checkpoints, for the decoders :mod:`streamfold.forward` supports) and the transformers test suite
(``tests/test_architectures.py``: logits of the converted model in stock transformers) check.

``forward=True`` also runs :mod:`streamfold.forward` (float32 numpy) on both checkpoints and compares
the logits.
"""
from __future__ import annotations

import filecmp
import json
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .dtypes import DTYPES, widen_bf16
from .files import FLASHNORM_VERSION, other_files
from .errors import AlreadyFlashNorm, StreamfoldError
from .fold import Scratch
from .oracle import FoldTally, check_scaled, uint_of
from .manifest import MANIFEST_NAME, OrderedHasher, hash_file, list_files, parse_manifest
from .patterns import natural_key
from .plan import MERGED_ALIASES, MODES, Action, Kind, Plan, make_plan
from .reader import INDEX_NAME, SINGLE_NAME, Checkpoint, SafetensorsFile, TensorInfo, pread_into, read_config
from .remode import plan_checkpoint
from .rules import load_rules_file
from .tasks import DEFAULT_BUDGET, default_workers

EXIT_FAILED = 3  # CLI exit status when verification finds problems
# --forward: every position's logits must have at least this cosine to the source's. Folds rounded to
# bf16/fp16 perturb every folded weight by up to half an ulp, so only a gross error is a failure (measured
# on correct bf16 conversions: 0.99988 on SmolLM2-135M, 0.99917 on a random-weight 8B; a tensor left
# unfolded in a tiny model: 0.83). Unrounded (float32) folds must agree to float32 noise.
MIN_COSINE_ROUNDED = 0.99
MIN_COSINE_EXACT = 0.9999


@dataclass
class Problem:
    """One failed check: ``subject`` (a tensor or file name) and what is wrong with it."""

    check: str  # config | layout | index | tensor | files | manifest | forward
    subject: str
    message: str

    def __str__(self) -> str:
        return f"{self.subject}: {self.message}"


@dataclass
class VerifyReport:
    """Everything verify checked and every problem it found; ``ok`` when there are none."""

    src: str
    dst: str
    mode: str | None
    merged_dtype: str | None
    family: str
    model_type: str
    problems: list[Problem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    bytes_read: int = 0
    seconds: float = 0.0
    workers: int = 1
    manifest: str = "absent"  # ok | failed | absent
    folds_rounded: bool = True  # folded weights stored in bf16/fp16 (else float32/64: no rounding)
    forward: dict | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        d = asdict(self)
        d["ok"] = self.ok
        return d

    def summary(self, max_lines: int = 200) -> str:
        c = self.counts
        lines = [f"streamfold verify: {self.src} -> {self.dst} ({self.model_type}, mode {self.mode or '?'}, "
                 f"merged dtype {self.merged_dtype or '?'})"]
        shown = self.problems[:max_lines]
        for p in shown:
            lines.append(f"  FAIL  {p}")
        if len(self.problems) > len(shown):
            lines.append(f"  ... and {len(self.problems) - len(shown)} more problems (use --json for all)")
        lines.append(f"  checked: {c.get('unchanged', 0)} tensors byte-identical (of them "
                     f"{c.get('kept_norms', 0)} norms that cannot fold), {c.get('folded', 0)} folded "
                     f"(every element bit-identical to the exact product rounded once), "
                     f"{c.get('identity', 0)} norms identity, {c.get('absent', 0)} absent, "
                     f"{c.get('biases', 0)} biases, {c.get('files', 0)} other files; "
                     f"manifest {self.manifest}")
        for n in self.notes:
            lines.append(f"  note: {n}")
        if self.forward is not None and "skipped" not in self.forward:
            f = self.forward
            lines.append(f"  forward ({f['tokens']} tokens, float32 numpy): max |logit error| "
                         f"{f['max_abs_error']:.3g} (relative {f['max_rel_error']:.3g}), min cosine "
                         f"{f['min_cosine']:.6f}, argmax agreement {f['argmax_agreement'] * 100:.1f}%")
        verdict = "PASS" if self.ok else f"FAIL ({len(self.problems)} problem{'s' if len(self.problems) != 1 else ''})"
        from .units import human_bytes
        lines.append(f"{verdict}  ({human_bytes(self.bytes_read)} read in {self.seconds:.2f} s, "
                     f"{self.workers} worker{'s' if self.workers != 1 else ''})")
        return "\n".join(lines)


def _fmt_index(flat: int, shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(str(int(i)) for i in np.unravel_index(flat, shape)) + "]" if shape else "[]"


# --------------------------------------------------------------------------------------------------------
# The verifier
# --------------------------------------------------------------------------------------------------------
@dataclass
class _Job:
    nbytes: int
    run: Callable[[Scratch], None]


class _Verifier:
    def __init__(self, src: Path, dst: Path, rules, mode, merged_dtype, workers, memory_budget) -> None:
        self.src, self.dst = src, dst
        self.rules = load_rules_file(rules) if isinstance(rules, (str, os.PathLike)) else rules
        self.want_mode, self.want_merged = mode, merged_dtype
        self.workers = max(1, workers or default_workers())
        budget = memory_budget or DEFAULT_BUDGET
        self.chunk_bytes = max(1 << 12, budget // (self.workers * 4))
        self.problems: list[Problem] = []
        self.notes: list[str] = []
        self.lock = threading.Lock()
        self.bytes_read = 0
        self.counts = {"unchanged": 0, "kept_norms": 0, "folded": 0, "identity": 0, "absent": 0, "biases": 0,
                       "files": 0}
        self.kept: set[str] = set()
        self.fds: dict[str, int] = {}

    # -- bookkeeping --------------------------------------------------------------------------------------
    def fail(self, check: str, subject: str, message: str) -> None:
        with self.lock:
            self.problems.append(Problem(check, subject, message))

    def _fd(self, path: Path) -> int:
        key = str(path)
        with self.lock:
            fd = self.fds.get(key)
            if fd is None:
                fd = self.fds[key] = os.open(path, os.O_RDONLY)
            return fd

    def _read(self, path: Path, offset: int, buf: np.ndarray) -> None:
        pread_into(self._fd(path), buf, offset, path)
        with self.lock:
            self.bytes_read += buf.nbytes

    # -- metadata -----------------------------------------------------------------------------------------
    def _dst_config(self, src_cfg: dict) -> dict | None:
        path = self.dst / "config.json"
        try:
            cfg = read_config(self.dst)
        except StreamfoldError as e:
            self.fail("config", "config.json", str(e).replace(f"{path}: ", ""))
            return None
        if cfg.get("flashnorm") is not True:
            self.fail("config", "config.json", f"\"flashnorm\" is {cfg.get('flashnorm')!r}, expected true")
        if cfg.get("flashnorm_version") != FLASHNORM_VERSION:
            self.fail("config", "config.json", f"\"flashnorm_version\" is {cfg.get('flashnorm_version')!r}, "
                                               f"expected {FLASHNORM_VERSION}")
        if cfg.get("flashnorm_mode") not in MODES:
            self.fail("config", "config.json", f"\"flashnorm_mode\" is {cfg.get('flashnorm_mode')!r}, expected "
                                               f"one of {', '.join(MODES)}")
        for key in sorted(set(src_cfg) | set(cfg)):
            if key.startswith("flashnorm"):  # the flags convert adds
                continue
            if key not in cfg:
                self.fail("config", "config.json", f"key {key!r} of the source config is missing")
            elif key not in src_cfg:
                self.fail("config", "config.json", f"key {key!r} is not in the source config")
            elif cfg[key] != src_cfg[key]:
                self.fail("config", "config.json", f"key {key!r} is {json.dumps(cfg[key])[:80]}, the source has "
                                                   f"{json.dumps(src_cfg[key])[:80]}")
        return cfg

    def _open_dst_shards(self, src_ckpt: Checkpoint) -> dict[str, SafetensorsFile | None]:
        files: dict[str, SafetensorsFile | None] = {}
        for shard in src_ckpt.shards:
            path = self.dst / shard
            if not path.is_file():
                self.fail("layout", shard, "shard file is missing")
                continue
            try:
                files[shard] = SafetensorsFile(path)
            except StreamfoldError as e:
                self.fail("layout", shard, str(e).replace(f"{path}: ", "") or "unreadable")
                files[shard] = None
        for p in sorted(self.dst.glob("*.safetensors")):
            if p.name not in src_ckpt.shards:
                self.fail("layout", p.name, "unexpected weight file (the source has no such shard)")
        return files

    def _check_index(self, src_ckpt: Checkpoint, dst_files: dict, where: dict[str, str]) -> None:
        path = self.dst / INDEX_NAME
        if not src_ckpt.sharded:
            if path.exists():
                self.fail("index", INDEX_NAME, f"present, but the source is a single {SINGLE_NAME}")
            return
        try:
            index = json.loads(path.read_text(encoding="utf-8"))
            wm = index["weight_map"]
            if not isinstance(wm, dict):
                raise TypeError
        except FileNotFoundError:
            self.fail("index", INDEX_NAME, "missing (the source is sharded)")
            return
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
            self.fail("index", INDEX_NAME, "not a valid index (needs a \"weight_map\")")
            return
        unreadable = {s for s in src_ckpt.shards if dst_files.get(s) is None}  # already reported
        for name, shard in sorted(wm.items()):
            if shard in unreadable and name not in where:
                continue
            if name not in where:
                self.fail("index", name, f"{INDEX_NAME} places it in {shard}, but no shard holds it (stale index)")
            elif where[name] != shard:
                self.fail("index", name, f"{INDEX_NAME} places it in {shard}, but it is in {where[name]} "
                                         "(stale index)")
        for name in sorted(set(where) - set(wm)):
            self.fail("index", name, f"in {where[name]} but not listed in {INDEX_NAME} (stale index)")
        total = (index.get("metadata") or {}).get("total_size")
        actual = sum(f.tensors[n].nbytes for f in dst_files.values() if f is not None for n in f.tensors)
        if total is not None and all(f is not None for f in dst_files.values()) and total != actual:
            self.fail("index", INDEX_NAME, f"metadata total_size is {total}, the shards hold {actual} bytes")

    # -- the run ------------------------------------------------------------------------------------------
    def run(self, progress) -> VerifyReport:
        t0 = time.perf_counter()
        src_ckpt = self.src_ckpt = Checkpoint(self.src)
        try:
            return self._run(src_ckpt, progress, t0)
        finally:
            src_ckpt.close()
            for fd in self.fds.values():
                os.close(fd)
            self.fds.clear()

    def _plan(self, src_ckpt: Checkpoint, src_cfg: dict, mode: str, merged: str) -> Plan:
        def read(name: str):
            t = src_ckpt.tensors[name]
            buf = np.empty(t.nbytes, dtype=np.uint8)
            pread_into(self._fd(t.path), buf, t.begin, t.path)
            return buf.view(DTYPES[t.dtype]).reshape(t.shape)
        try:  # an already-FlashNorm source converted to the other mode: the plan of that change
            return plan_checkpoint(src_cfg, src_ckpt.tensors, read, mode=mode, merged_dtype=merged, rules=self.rules,
                                   shard_of=src_ckpt.shard_of, src=str(self.src))
        except AlreadyFlashNorm:  # same mode: the output must be the source's fold (of identity norms)
            return make_plan(src_cfg, src_ckpt.tensors, read, mode=mode, merged_dtype=merged, rules=self.rules)

    def _run(self, src_ckpt: Checkpoint, progress, t0: float) -> VerifyReport:
        src_cfg = read_config(self.src)
        dst_cfg = self._dst_config(src_cfg)
        dst_files = self._open_dst_shards(src_ckpt)
        where: dict[str, str] = {}
        dst_tensors: dict[str, TensorInfo] = {}
        for shard, f in dst_files.items():
            if f is None:
                continue
            for name, t in f.tensors.items():
                if name in where:
                    self.fail("layout", name, f"in both {where[name]} and {shard}")
                    continue
                where[name], dst_tensors[name] = shard, t

        # what should have happened: the source's plan in the mode / merged dtype the output declares
        plan = self._plan(src_ckpt, src_cfg, "compat", "source")
        mode = self.want_mode or (dst_cfg or {}).get("flashnorm_mode")
        if mode not in MODES:
            folded_norms = [n.weight for n in plan.folded]
            mode = "strict" if folded_norms and not any(w in dst_tensors for w in folded_norms) else "compat"
            self.notes.append(f"mode {mode} inferred from the tensors present (config.json does not say)")
        elif dst_cfg is not None and self.want_mode and dst_cfg.get("flashnorm_mode") not in (None, mode):
            self.fail("config", "config.json", f"\"flashnorm_mode\" is {dst_cfg.get('flashnorm_mode')!r}, "
                                               f"but {mode!r} was asked for")
        merged = self.want_merged
        if merged is None:
            merged = "source"
            for name, a in plan.actions.items():
                if a.kind == Kind.SCALE and src_ckpt.tensors[name].dtype in ("BF16", "F16") \
                        and name in dst_tensors and dst_tensors[name].dtype == "F32":
                    merged = "float32"
                    break
        else:  # spelled as convert takes it (fp32, bf16, ...); bf16 = source, for a bf16 source only
            want = MERGED_ALIASES.get(str(merged).lower())
            if want is None:
                raise StreamfoldError(f"merged dtype must be one of {', '.join(MERGED_ALIASES)}, not {merged!r}")
            if want == "bf16":
                self._plan(src_ckpt, src_cfg, mode, want)  # raises for a source whose folded weights are not bf16
            merged = "source" if want == "bf16" else want
        if (mode, merged) != ("compat", "source"):
            plan = self._plan(src_ckpt, src_cfg, mode, merged)
        self.kept = {x for n in plan.kept for x in (n.weight, n.bias) if x}

        # layout: every planned tensor present where the source has it, with the planned dtype and shape
        checkable: dict[str, Action] = {}
        lost: dict[str, list[str]] = {}
        for name, a in plan.actions.items():
            st = src_ckpt.tensors[name]
            if a.kind == Kind.DROP:
                if name in dst_tensors:
                    self.fail("tensor", name, "folded norm must be absent in strict mode, but is present")
                else:
                    self.counts["absent"] += 1
                continue
            if name not in dst_tensors:
                shard = src_ckpt.shard_of[name]
                if dst_files.get(shard) is None:  # the shard is missing or unreadable: reported once, below
                    lost.setdefault(shard, []).append(name)
                else:
                    self.fail("tensor", name, f"missing (expected in {shard}, {_what(a)})")
                continue
            dt = dst_tensors[name]
            if where[name] != src_ckpt.shard_of[name]:
                self.fail("layout", name, f"in {where[name]}, the source has it in {src_ckpt.shard_of[name]}")
            if dt.dtype != a.out_dtype or dt.shape != st.shape:
                self.fail("tensor", name, f"is {dt.dtype} {list(dt.shape)}, expected {a.out_dtype} "
                                          f"{list(st.shape)} ({_what(a)})")
                continue
            checkable[name] = a
        for shard, names in lost.items():
            self.fail("tensor", shard, f"{len(names)} tensors missing with this shard: "
                                       f"{', '.join(names[:3])}{', ...' if len(names) > 3 else ''}")
        added = {t.name: t for t in plan.added}  # identity norms a mode change restores
        for name in sorted(set(dst_tensors) - set(plan.actions) - set(added)):
            self.fail("tensor", name, "not in the source checkpoint")
        for name, t in added.items():
            a, dt = Action(Kind.FILL, t.dtype, value=t.value), dst_tensors.get(name)
            if dt is None or where[name] != t.shard or dt.dtype != t.dtype or dt.shape != t.shape:
                got = "missing" if dt is None else f"{dt.dtype} {list(dt.shape)} in {where[name]}"
                self.fail("tensor", name, f"restored identity norm is {got}, expected {t.dtype} {list(t.shape)} "
                                          f"in {t.shard}")
            else:
                checkable[name] = a
        for shard, f in dst_files.items():
            if f is not None and f.metadata != src_ckpt.shards[shard].metadata:
                self.fail("layout", shard, f"header __metadata__ {f.metadata} differs from the source's "
                                           f"{src_ckpt.shards[shard].metadata}")
        self._check_index(src_ckpt, dst_files, where)

        # manifest: listed before reading, so the shard reads can feed the hashes
        manifest_path = self.dst / MANIFEST_NAME
        entries = None
        hashers: dict[str, OrderedHasher] = {}
        if manifest_path.is_file():
            entries, bad_lines = parse_manifest(manifest_path)
            for msg in bad_lines:
                self.fail("manifest", MANIFEST_NAME, msg.replace(f"{MANIFEST_NAME}", "").strip(": "))
            for shard in dst_files:
                if shard in entries:
                    hashers[shard] = OrderedHasher((self.dst / shard).stat().st_size)

        # tensor data, one pass over each output shard
        jobs: list[list[_Job]] = []
        for shard, f in dst_files.items():
            jobs.append(self._shard_jobs(shard, f, src_ckpt, checkable, hashers.get(shard)))
        ordered = [j for group in _round_robin(jobs) for j in group]
        tick = progress(sum(j.nbytes for j in ordered)) if progress else None
        self._execute(ordered, tick)

        self._check_other_files(src_ckpt)
        manifest_state = "absent"
        if entries is not None:
            manifest_state = self._check_manifest(entries, hashers)
        else:
            self.notes.append(f"no {MANIFEST_NAME} in the output (not checked)")
        order = ("config", "layout", "index", "tensor", "files", "manifest", "forward")
        self.problems.sort(key=lambda p: (order.index(p.check) if p.check in order else len(order),
                                          natural_key(p.subject)))
        report = VerifyReport(
            src=str(self.src), dst=str(self.dst), mode=mode, merged_dtype=merged, family=plan.family,
            model_type=plan.model_type, problems=self.problems, notes=self.notes, counts=self.counts,
            bytes_read=self.bytes_read,
            folds_rounded=any(a.kind == Kind.SCALE and a.out_dtype in ("BF16", "F16") for a in plan.actions.values()),
            workers=self.workers, manifest=manifest_state)
        report.seconds = time.perf_counter() - t0
        return report

    # -- jobs ---------------------------------------------------------------------------------------------
    def _shard_jobs(self, shard: str, f: SafetensorsFile | None, src_ckpt: Checkpoint,
                    checkable: dict[str, Action], hasher: OrderedHasher | None) -> list[_Job]:
        path = self.dst / shard
        jobs: list[_Job] = []
        if f is None:  # unreadable header: only the manifest hash can be computed
            if hasher is not None:
                size = path.stat().st_size
                for off in range(0, size, self.chunk_bytes):
                    jobs.append(self._hash_job(path, off, min(self.chunk_bytes, size - off), hasher))
            return jobs
        jobs.append(self._hash_job(path, 0, f.header_size, hasher))
        for t in f.tensors.values():  # file order
            a = checkable.get(t.name)
            if a is None:
                for off in range(0, t.nbytes, self.chunk_bytes):
                    jobs.append(self._hash_job(path, t.begin + off, min(self.chunk_bytes, t.nbytes - off), hasher))
                continue
            st = src_ckpt.tensors.get(t.name)  # None for a restored norm (a fill)
            if a.kind == Kind.COPY:
                jobs.extend(self._copy_jobs(t, st, hasher))
            elif a.kind == Kind.SCALE:
                jobs.extend(self._scale_jobs(t, st, a, hasher))
            elif a.kind == Kind.FILL:
                jobs.append(self._small_job(t, st, a, hasher, self._check_fill))
            elif a.kind == Kind.BIAS:
                jobs.append(self._small_job(t, st, a, hasher, self._check_bias))
            else:
                raise AssertionError(a.kind)
        return jobs

    def _feed(self, hasher: OrderedHasher | None, offset: int, buf, fail: str | None = None) -> None:
        if hasher is not None:
            hasher.feed(offset, buf if fail is None else len(buf), fail)

    def _read_dst(self, t_path: Path, offset: int, buf: np.ndarray, hasher, subject: str) -> bool:
        """Read output bytes and pass them to the shard's hash; False (reported) if unreadable."""
        try:
            self._read(t_path, offset, buf)
        except OSError as e:
            self._feed(hasher, offset, buf, f"cannot read {t_path.name}: {e}")
            self.fail("tensor", subject, f"cannot read the output ({e})")
            return False
        self._feed(hasher, offset, buf)
        return True

    def _hash_job(self, path: Path, offset: int, n: int, hasher: OrderedHasher | None) -> _Job:
        def run(s: Scratch) -> None:
            if hasher is None:
                return
            buf = s.get("dst", n)
            self._read_dst(path, offset, buf, hasher, path.name)
        return _Job(n, run)

    def _copy_jobs(self, t: TensorInfo, st: TensorInfo, hasher) -> list[_Job]:
        state = {"diff": 0, "first": None}
        pending = {"n": max(1, -(-t.nbytes // self.chunk_bytes))}

        def finish() -> None:
            if state["diff"]:
                what = "a norm that cannot fold" if t.name in self.kept else "should be unchanged"
                self.fail("tensor", t.name, f"differs from the source ({what}): {state['diff']} of "
                                            f"{t.nbytes} bytes differ, first at byte {state['first']}")
            else:
                with self.lock:
                    self.counts["unchanged"] += 1
                    if t.name in self.kept and not t.name.endswith(".bias"):  # count norms, not tensors
                        self.counts["kept_norms"] += 1

        jobs = []
        for off in range(0, max(t.nbytes, 1), self.chunk_bytes):
            n = min(self.chunk_bytes, t.nbytes - off)

            def run(s: Scratch, off=off, n=n) -> None:
                d = s.get("dst", n)
                ok = self._read_dst(t.path, t.begin + off, d, hasher, t.name)
                if ok:
                    sb = s.get("src", n)
                    self._read(st.path, st.begin + off, sb)
                    if not _bytes_equal(d, sb):
                        where = np.flatnonzero(d != sb)
                        with self.lock:
                            state["diff"] += int(where.size)
                            first = off + int(where[0])
                            state["first"] = first if state["first"] is None else min(state["first"], first)
                self._countdown(pending, finish if ok else None)
            jobs.append(_Job(n, run))
        return jobs

    def _countdown(self, pending: dict, finish) -> None:
        with self.lock:
            pending["n"] -= 1
            last = pending["n"] == 0
            if finish is None:
                pending["failed"] = True
            failed = pending.get("failed", False)
        if last and not failed:
            finish()

    def _scale_jobs(self, t: TensorInfo, st: TensorInfo, a: Action, hasher) -> list[_Job]:
        shape, axis = st.shape, a.axis
        width = shape[axis]
        scale = a.norm.scale.astype(np.float32)
        if axis == len(shape) - 1:
            cols, col_mult = width, scale.reshape(1, width)
        else:
            cols, col_mult = math.prod(shape[axis + 1:]), None
        rows = st.numel // max(cols, 1)
        isz, osz = DTYPES[st.dtype].itemsize, DTYPES[t.dtype].itemsize
        step = max(1, self.chunk_bytes // max(1, cols * max(isz, osz)))
        tally = FoldTally()
        pending = {"n": max(1, -(-rows // step))}

        def finish() -> None:
            if tally.bad:
                idx, got, want = tally.first
                hint = ""
                if tally.bad_equal_source == tally.bad:
                    hint = "; every wrong element equals the source (left unfolded?)"
                self.fail("tensor", t.name,
                          f"is not source x {a.norm.weight} rounded once: {tally.bad} of {st.numel} elements "
                          f"wrong (worst {_ulps(tally.worst_ulp)}), first at {_fmt_index(idx, shape)}: "
                          f"{got:.6g}, expected {want:.6g}{hint}")
            else:
                with self.lock:
                    self.counts["folded"] += 1

        jobs = []
        for r0 in range(0, max(rows, 1), step):
            r1 = min(rows, r0 + step)

            def run(s: Scratch, r0=r0, r1=r1) -> None:
                n = r1 - r0
                d = s.get("dst", n * cols * osz)
                ok = self._read_dst(t.path, t.begin + r0 * cols * osz, d, hasher, t.name)
                if ok and n:
                    sb = s.get("src", n * cols * isz)
                    self._read(st.path, st.begin + r0 * cols * isz, sb)
                    m = col_mult if col_mult is not None else scale[np.arange(r0, r1) % width].reshape(n, 1)
                    part = check_scaled(sb.view(DTYPES[st.dtype]).reshape(n, cols),
                                        d.view(DTYPES[t.dtype]).reshape(n, cols), m, st.dtype, t.dtype, s,
                                        base_index=r0 * cols)
                    with self.lock:
                        tally.merge(part)
                self._countdown(pending, finish if ok else None)
            jobs.append(_Job((r1 - r0) * cols * osz, run))
        return jobs

    def _small_job(self, t: TensorInfo, st: TensorInfo, a: Action, hasher, check) -> _Job:
        def run(s: Scratch) -> None:
            d = s.get("dst", t.nbytes)
            if self._read_dst(t.path, t.begin, d, hasher, t.name):
                check(t, st, a, d.view(DTYPES[t.dtype]).reshape(t.shape))
        return _Job(t.nbytes, run)

    def _check_fill(self, t: TensorInfo, st: TensorInfo, a: Action, got: np.ndarray) -> None:
        want = np.full(t.shape, a.value, dtype=DTYPES[t.dtype])
        u = uint_of(t.dtype)
        wrong = np.flatnonzero(got.reshape(-1).view(u) != want.reshape(-1).view(u))
        if wrong.size:
            i = int(wrong[0])
            self.fail("tensor", t.name, f"folded norm is not the identity ({a.value:g}): {wrong.size} of {t.numel} "
                                        f"elements differ, first at {_fmt_index(i, t.shape)}: "
                                        f"{float(got.reshape(-1)[i]):.6g}")
        else:
            with self.lock:
                self.counts["identity"] += 1

    def _check_bias(self, t: TensorInfo, st: TensorInfo, a: Action, got: np.ndarray) -> None:
        """``b + W @ beta`` (W the unscaled source consumer weight), in float64, to within one rounding
        (plus a float64 summation-order allowance)."""
        wt = self.src_ckpt.tensors[a.source]
        raw = np.empty(wt.nbytes, dtype=np.uint8)  # a consumer of a LayerNorm with bias: small layers
        self._read(wt.path, wt.begin, raw)
        w = _as_f64(raw, wt.dtype).reshape(wt.shape)
        beta = a.norm.shift.astype(np.float64)
        acc = np.tensordot(w, beta, axes=([a.axis], [0]))
        mag = np.tensordot(np.abs(w), np.abs(beta), axes=([a.axis], [0]))
        b = np.empty(st.nbytes, dtype=np.uint8)
        self._read(st.path, st.begin, b)
        ref = _as_f64(b, st.dtype).reshape(st.shape) + acc
        g = got.astype(np.float64)
        rounded = np.abs(ref.astype(DTYPES[t.dtype]))
        ulp = np.abs(np.nextafter(rounded, np.inf) - rounded).astype(np.float64) if t.dtype != "BF16" else \
            np.abs(np.spacing(rounded.astype(np.float32))).astype(np.float64) * 65536.0
        tol = 0.5 * ulp + mag * 1e-12
        wrong = np.flatnonzero(~(np.abs(g - ref) <= tol).reshape(-1))
        if wrong.size:
            i = int(wrong[0])
            self.fail("tensor", t.name, f"is not the source bias + {a.source} @ {a.norm.bias} within one rounding: "
                                        f"{wrong.size} of {t.numel} elements wrong, first at "
                                        f"{_fmt_index(i, t.shape)}: {g.reshape(-1)[i]:.6g}, expected "
                                        f"{ref.reshape(-1)[i]:.6g}")
        else:
            with self.lock:
                self.counts["biases"] += 1

    def _execute(self, jobs: list[_Job], tick) -> None:
        local = threading.local()
        errors: list[BaseException] = []

        def go(job: _Job) -> None:
            s = getattr(local, "scratch", None)
            if s is None:
                s = local.scratch = Scratch()
            try:
                job.run(s)
            except BaseException as e:  # noqa: BLE001 - re-raised after every job ran (hash chains need all)
                with self.lock:
                    errors.append(e)
            if tick is not None:
                with self.lock:
                    tick(job.nbytes)

        if self.workers == 1:
            for j in jobs:
                go(j)
        else:
            with ThreadPoolExecutor(self.workers, thread_name_prefix="streamfold-verify") as pool:
                list(pool.map(go, jobs))
        if errors:
            raise errors[0]

    # -- files --------------------------------------------------------------------------------------------
    def _check_other_files(self, src_ckpt: Checkpoint) -> None:
        files, skipped = other_files(self.src, set(src_ckpt.shards))  # the card is convert's own
        for rel in files:
            d = self.dst / rel
            if not d.is_file():
                self.fail("files", rel.as_posix(), "missing (the source has it)")
            elif not filecmp.cmp(self.src / rel, d, shallow=False):
                self.fail("files", rel.as_posix(), "differs from the source's copy")
            else:
                self.counts["files"] += 1
        for rel in skipped:
            if (self.dst / rel).exists():
                self.fail("files", rel, "another weight format of the unfolded source model is in the output "
                                        "(it would load unfolded); remove it")

    def _check_manifest(self, entries: dict[str, str], hashers: dict[str, OrderedHasher]) -> str:
        before = len(self.problems)
        present = set(list_files(self.dst))
        for rel in sorted(set(entries) | present):
            if rel not in entries:
                self.fail("manifest", rel, f"not listed in {MANIFEST_NAME}")
                continue
            if rel not in present:
                self.fail("manifest", rel, f"listed in {MANIFEST_NAME} but missing")
                continue
            if rel in hashers:
                h = hashers[rel]
                got = h.hexdigest()
                if got is None:
                    self.fail("manifest", rel, f"could not be hashed ({h.broken or 'incomplete read'})")
                    continue
            else:
                size = (self.dst / rel).stat().st_size
                got = hash_file(self.dst / rel)
                with self.lock:
                    self.bytes_read += size
            if got != entries[rel]:
                self.fail("manifest", rel, f"sha256 {got[:16]}... does not match {MANIFEST_NAME} "
                                           f"({entries[rel][:16]}...)")
        return "ok" if len(self.problems) == before else "failed"


def _as_f64(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return widen_bf16(raw).astype(np.float64)
    return raw.view(DTYPES[dtype]).astype(np.float64)


def _bytes_equal(a: np.ndarray, b: np.ndarray) -> bool:
    if a.nbytes % 8 == 0:
        return bool(np.array_equal(a.view(np.uint64), b.view(np.uint64)))
    return bool(np.array_equal(a, b))


def _ulps(x: float) -> str:
    return "not finite" if not math.isfinite(x) else f"{x:.3g} ulp"


def _what(a: Action) -> str:
    return {Kind.COPY: "unchanged", Kind.SCALE: f"folded with {a.norm.weight if a.norm else '?'}",
            Kind.FILL: "folded norm set to identity", Kind.BIAS: "bias with the norm's shift folded in",
            Kind.DROP: "removed"}[a.kind]


def _round_robin(groups: list[list[_Job]]) -> list[list[_Job]]:
    """Interleave the shards' job lists (each keeps its order), so several files are read at once."""
    out: list[list[_Job]] = []
    its = [iter(g) for g in groups if g]
    while its:
        nxt = []
        for it in its:
            j = next(it, None)
            if j is not None:
                out.append([j])
                nxt.append(it)
        its = nxt
    return out


# --------------------------------------------------------------------------------------------------------
def verify(src: str | os.PathLike, dst: str | os.PathLike, *, mode: str | None = None,
           merged_dtype: str | None = None, rules: str | os.PathLike | dict | None = None,
           workers: int | None = None, memory_budget: int | None = None, forward: bool = False,
           forward_tokens: list[int] | int | None = None,
           progress: Callable[[int], Callable[[int], None]] | None = None) -> VerifyReport:
    """Check that ``dst`` is a correct FlashNorm conversion of ``src``; returns a :class:`VerifyReport`
    (``report.ok``, ``report.problems``). Reads only headers up front, then streams both checkpoints
    once through bounded buffers.

    ``mode`` / ``merged_dtype`` default to what ``dst`` declares (``config.json`` ``flashnorm_mode``;
    float32 if folded tensors are stored float32). ``forward`` additionally compares float32 logits of
    both checkpoints on ``forward_tokens`` (a list of ids, or a count of fixed pseudo-random ids; 16 by
    default). Raises :class:`StreamfoldError` for bad input (an unreadable source, a missing ``dst``);
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
    report = _Verifier(src, dst, rules, mode, merged_dtype, workers, memory_budget).run(progress)
    if forward:
        t0 = time.perf_counter()
        from .forward import ForwardUnsupported
        try:
            report.forward = f = run_forward(src, dst, forward_tokens, memory_budget)
        except ForwardUnsupported as e:  # not a verdict on dst: say so, and leave the verdict to the rest
            report.forward = {"skipped": str(e)}
            report.notes.append(f"forward pass not run: {e}")
            return report
        except StreamfoldError as e:
            report.problems.append(Problem("forward", "logits", f"could not run: {e}"))
            return report
        if not f["all_finite"]:
            report.problems.append(Problem("forward", "logits", "not finite"))
        else:
            bound = MIN_COSINE_ROUNDED if report.folds_rounded else MIN_COSINE_EXACT
            f["min_cosine_required"] = bound
            if f["min_cosine"] < bound:
                report.problems.append(Problem("forward", "logits", f"cosine to the source's logits is "
                                                                    f"{f['min_cosine']:.6f} at worst, below {bound}"))
        report.seconds += time.perf_counter() - t0
        report.bytes_read += f.pop("bytes_read", 0)
    return report


def run_forward(src, dst, tokens=None, memory_budget: int | None = None) -> dict:
    """Float32 numpy logits of both checkpoints on the same tokens, and how far apart they are."""
    from .forward import Decoder, compare_logits, default_tokens
    block = max(1 << 20, (memory_budget or DEFAULT_BUDGET) // 3)
    t0 = time.perf_counter()
    with Decoder(src, block) as a:  # one at a time: one set of weight buffers
        if tokens is None or isinstance(tokens, int):
            vocab = a.w.info("model.embed_tokens.weight").shape[0]
            ids = default_tokens(vocab, 16 if tokens is None else int(tokens))
        else:
            ids = np.asarray(tokens, dtype=np.int64)
        ref = a.logits(ids)
        nbytes = a.w.bytes_read
    with Decoder(dst, block) as b:
        got = b.logits(ids)
        nbytes += b.w.bytes_read
    out = compare_logits(ref, got)
    out["seconds"] = round(time.perf_counter() - t0, 3)
    out["bytes_read"] = nbytes
    out["token_ids"] = [int(i) for i in ids]
    return out
