"""The one element check: output tensors against the chunk records of the task that wrote them.

The same records the engine executed (:mod:`streamfold.planning.tasks`), checked independently of how it
executed them: copied ranges are byte-identical to the source; every folded element has exactly the
bits of the exact product rounded once (:func:`streamfold.check.oracle.check_scaled`: a float64 product and
ml_dtypes/numpy rounding, not fold.py's kernels); identity fills are exact; folded biases have
exactly the bits of ``b + W @ beta``, the exact sum rounded once (:func:`streamfold.check.oracle.expected_bias`:
math.fsum where the float64 sum's error interval straddles a rounding boundary).

Chunk records are cut into :class:`Piece` s of at most ``piece_bytes`` output bytes, each restricted
to one tensor (a copy record spans a run of tensors), so memory stays bounded whatever chunking the
task was planned with, and every problem names its tensor. A tensor is checked wherever the output
actually holds it (:class:`Target`), so a shard whose header differs from the task's (a tensor
missing or added) still has its other tensors checked. Used by ``verify`` (every shard, with the
manifest hash fed from the same reads: :mod:`streamfold.check.checkrun`) and by the streaming Hub path
(``--stream --verify``: :func:`check_task`, each shard before it is uploaded).
"""
from __future__ import annotations

import bisect
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .checkrun import Job, Reader, feed, run_jobs
from ..core.dtypes import DTYPES, widen_bf16
from ..core.errors import StreamfoldError
from ..core.fold import Scratch
from ..core.manifest import OrderedHasher
from .oracle import FoldTally, check_scaled, expected_bias, uint_of
from .quant_oracle import check_dequant_band, compare_bits, mxfp4_expected
from .quant_oracle_int import INT_FMTS, check_int_band
from ..planning.tasks import Chunk, Op, Task
from .report import Problem, fmt_index, fmt_ulps

PIECE = 8 << 20  # check_task's default piece size


@dataclass(frozen=True)
class Target:
    """Where a tensor is in the output: the file and the absolute offset of its data."""

    path: Path
    begin: int


@dataclass(frozen=True)
class Piece:
    """Part of one chunk record, inside one tensor: ``size`` output bytes at ``rel`` within it."""

    chunk: Chunk
    rel: int
    size: int
    src_off: int = 0  # absolute offset in the chunk's source file (copy, fold)
    rows: tuple[int, int] = (0, 0)  # fold: the rows of this piece


@dataclass
class TensorCheck:
    """One tensor of a task's header: its pieces and the tally they accumulate."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    op: Op = Op.COPY  # tensors no non-copy record names are copies
    pieces: list[Piece] = field(default_factory=list)
    vec: np.ndarray | None = None  # fold: the float32 multiplier; bias: the float64 shift
    label: str = ""  # what the message says it must be (verify passes names the task does not carry)
    tally: FoldTally = field(default_factory=FoldTally)
    unreadable: str | None = None
    checked: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def problem(self) -> Problem | None:
        """The tensor's verdict after all its pieces ran (None: correct)."""
        if self.unreadable is not None:
            return Problem("tensor", self.name, f"cannot read the output ({self.unreadable})")
        t = self.tally
        if not t.bad:
            return None
        idx, got, want = t.first
        c = self.pieces[0].chunk
        if self.op == Op.COPY:
            msg = (f"differs from the source ({self.label or 'should be unchanged'}): {t.bad} of {self.nbytes} "
                   f"bytes differ, first at byte {idx}")
        elif self.op == Op.FOLD:
            hint = "; every wrong element equals the source (left unfolded?)" if t.bad_equal_source == t.bad else ""
            msg = (f"is not source x {c.norm} rounded once: {t.bad} of {self.numel} elements wrong (worst "
                   f"{fmt_ulps(t.worst_ulp)}), first at {fmt_index(idx, self.shape)}: {got:.6g}, expected "
                   f"{want:.6g}{hint}")
        elif self.op == Op.DEQUANT:
            what = f"q·s x {c.norm}" if c.norm else "q·s"
            msg = (f"is not the dequantized {what} rounded once: {t.bad} of {self.numel} elements wrong, first at "
                   f"{fmt_index(idx, self.shape)}: {got:.6g}, expected {want:.6g}")
        elif self.op == Op.FILL:
            msg = (f"folded norm is not the identity ({c.value:g}): {t.bad} of {self.numel} elements differ, "
                   f"first at {fmt_index(idx, self.shape)}: {got:.6g}")
        else:
            msg = (f"is not the source bias + {self.label or f'W @ the shift of {c.norm}'} rounded once: "
                   f"{t.bad} of {self.numel} elements wrong, first at {fmt_index(idx, self.shape)}: {got:.6g}, "
                   f"expected {want:.6g}")
        return Problem("tensor", self.name, msg)


def tensor_checks(task: Task, piece_bytes: int, labels: dict[str, str] | None = None) -> dict[str, TensorCheck]:
    """Every tensor of ``task``'s header with the pieces that check it, in output order.

    Raises AssertionError if the records do not tile every tensor exactly (then some bytes would go
    unchecked)."""
    lay = task.layout()
    checks = {n: TensorCheck(n, dt, tuple(sh), lay.tensors[n].end - lay.tensors[n].begin,
                             label=(labels or {}).get(n, ""))
              for n, dt, sh in task.tensors}
    starts = sorted((lay.tensors[n].begin, lay.tensors[n].end, n) for n in checks)  # empty ones first
    begins = [b for b, _, _ in starts]
    for c in task.chunks:
        if c.op == Op.COPY:  # a run of tensors: one piece list per tensor it covers
            i = max(0, bisect.bisect_right(begins, c.dst) - 1)
            while i < len(starts) and starts[i][0] < c.dst + c.size:
                t = lay.tensors[starts[i][2]]
                lo, hi = max(c.dst, t.begin), min(c.dst + c.size, t.end)
                for o in range(lo, hi, piece_bytes):
                    n = min(piece_bytes, hi - o)
                    checks[t.name].pieces.append(Piece(c, o - t.begin, n, c.src_off + o - c.dst))
                i += 1
            continue
        tc = checks[c.tensor]
        tc.op = c.op
        base = lay.tensors[c.tensor].begin
        if c.op == Op.DEQUANT:  # one piece per record (records are bounded bands already)
            tc.vec = task.norms[c.norm]["scale"].astype(np.float32) if c.norm else None
            tc.pieces.append(Piece(c, c.dst - base, c.size, c.src_off, c.rows))
        elif c.op == Op.FOLD:
            tc.vec = task.norms[c.norm]["scale"].astype(np.float32)
            isz, osz = DTYPES[c.src_dtype].itemsize, DTYPES[c.out_dtype].itemsize
            step = max(1, piece_bytes // max(1, c.cols * max(isz, osz)))
            r0, r1 = c.rows
            for a in range(r0, r1, step):
                b = min(r1, a + step)
                tc.pieces.append(Piece(c, c.dst - base + (a - r0) * c.cols * osz, (b - a) * c.cols * osz,
                                       c.src_off + (a - r0) * c.cols * isz, (a, b)))
        else:  # fill, bias: one small tensor (a norm, a bias), in one piece
            if c.op == Op.BIAS:
                tc.vec = task.norms[c.norm]["shift"].astype(np.float64)
            tc.pieces.append(Piece(c, c.dst - base, c.size, c.src_off))
    for tc in checks.values():
        tc.pieces.sort(key=lambda p: p.rel)
        pos = 0
        for p in tc.pieces:
            if p.rel != pos:
                raise AssertionError(f"{task.shard}: chunk records of {tc.name} leave a gap or overlap at {pos}")
            pos += p.size
        if pos != tc.nbytes:
            raise AssertionError(f"{task.shard}: chunk records cover {pos} of {tc.nbytes} bytes of {tc.name}")
    return checks


class Checker:
    """Runs the pieces of many tensors against the output and tallies them (thread safe)."""

    def __init__(self, sources: dict[str, Path], reader: Reader, piece_bytes: int) -> None:
        self.sources = sources
        self.reader = reader
        self.piece_bytes = piece_bytes
        self.lock = threading.Lock()

    def file_jobs(self, path: Path, spans: list[tuple[int, int, TensorCheck | None, Target | None]],
                  hasher: OrderedHasher | None) -> list[Job]:
        """Jobs reading the output file ``path`` once, in order: ``spans`` are ``(begin, end, check,
        target)`` ranges (the header, then tensors in file order; ``check`` None: only hashed)."""
        jobs: list[Job] = []
        for begin, end, tc, target in spans:
            if tc is None:
                if hasher is not None:
                    for o in range(begin, end, self.piece_bytes):
                        jobs.append(self._hash_job(path, o, min(self.piece_bytes, end - o), hasher))
                continue
            tc.checked = True
            jobs.extend(Job(p.size, lambda s, p=p, tc=tc, t=target: self._run(p, tc, t, s, hasher)) for p in tc.pieces)
        return jobs

    def _hash_job(self, path: Path, offset: int, n: int, hasher: OrderedHasher) -> Job:
        def run(s: Scratch) -> None:
            buf = s.get("dst", n)
            try:
                self.reader.read(path, offset, buf)
            except (OSError, StreamfoldError) as e:  # a hash waits for every piece: never skip the feed
                feed(hasher, offset, buf, f"cannot read {path.name}: {e}")
                return
            feed(hasher, offset, buf)
        return Job(n, run)

    def _run(self, p: Piece, tc: TensorCheck, target: Target, s: Scratch, hasher: OrderedHasher | None) -> None:
        d = s.get("dst", p.size)
        off = target.begin + p.rel
        try:
            self.reader.read(target.path, off, d)
        except (OSError, StreamfoldError) as e:  # a hash waits for every piece: never skip the feed
            feed(hasher, off, d, f"cannot read {target.path.name}: {e}")
            with self.lock:
                tc.unreadable = tc.unreadable or str(e)
            return
        feed(hasher, off, d)
        part = _CHECKS[p.chunk.op](self, p, tc, d, s)
        if part.bad or part.exact:
            with self.lock:
                tc.tally.merge(part)

    # -- the element checks, one per record kind --------------------------------------------------------
    def _copy(self, p: Piece, tc: TensorCheck, d: np.ndarray, s: Scratch) -> FoldTally:
        sb = s.get("src", p.size)
        self.reader.read(self.sources[p.chunk.src], p.src_off, sb)
        t = FoldTally()
        if not _bytes_equal(d, sb):
            where = np.flatnonzero(d != sb)
            t.bad, t.first = int(where.size), (p.rel + int(where[0]), None, None)
        return t

    def _fold(self, p: Piece, tc: TensorCheck, d: np.ndarray, s: Scratch) -> FoldTally:
        c, (r0, r1) = p.chunk, p.rows
        n = r1 - r0
        sb = s.get("src", n * c.cols * DTYPES[c.src_dtype].itemsize)
        self.reader.read(self.sources[c.src], p.src_off, sb)
        m = tc.vec[np.arange(r0, r1) % c.width].reshape(n, 1) if c.per_row else tc.vec.reshape(1, -1)
        return check_scaled(sb.view(DTYPES[c.src_dtype]).reshape(n, c.cols),
                            d.view(DTYPES[c.out_dtype]).reshape(n, c.cols), m, c.src_dtype, c.out_dtype,
                            base_index=r0 * c.cols)

    def _fill(self, p: Piece, tc: TensorCheck, d: np.ndarray, s: Scratch) -> FoldTally:
        c = p.chunk
        want = np.full(tc.numel, c.value, dtype=DTYPES[c.out_dtype])
        got = d.view(DTYPES[c.out_dtype])
        u = uint_of(c.out_dtype)
        wrong = np.flatnonzero(got.view(u) != want.view(u))
        t = FoldTally()
        if wrong.size:
            i = int(wrong[0])
            t.bad, t.first = int(wrong.size), (i, float(got[i]), c.value)
        return t

    def _bias(self, p: Piece, tc: TensorCheck, d: np.ndarray, s: Scratch) -> FoldTally:
        """Bit for bit ``b + W @ beta``, the exact sum rounded once (``oracle.expected_bias``; W the
        unscaled source consumer weight, read in ``step``-row blocks)."""
        c, beta = p.chunk, tc.vec
        wfile, wbegin, wdtype, wshape = c.weight
        b = s.get("src", tc.numel * DTYPES[c.src_dtype].itemsize)
        self.reader.read(self.sources[c.src], c.src_off, b)
        b64 = _f64(b, c.src_dtype)
        want = np.empty(tc.numel, DTYPES[c.out_dtype])
        wpath, isz = self.sources[wfile], DTYPES[wdtype].itemsize
        if c.axis == len(wshape) - 1:  # W as [rows, cols]: one bias element per row
            cols = wshape[-1]
            rows = math.prod(wshape[:-1])
            step = max(1, min(c.step or rows, self.piece_bytes // max(1, cols * isz)))
            for i in range(0, rows, step):
                k = min(step, rows - i)
                blk = s.get("w", k * cols * isz)
                self.reader.read(wpath, wbegin + i * cols * isz, blk)
                want[i:i + k] = expected_bias(b64[i:i + k], _f64(blk, wdtype).reshape(k, cols), beta, c.out_dtype)
        else:  # fused/transposed consumers behind a biased LayerNorm: none known; read whole
            raw = np.empty(math.prod(wshape) * isz, np.uint8)
            self.reader.read(wpath, wbegin, raw)
            w = np.moveaxis(_f64(raw, wdtype).reshape(wshape), c.axis, -1).reshape(-1, wshape[c.axis])
            want[:] = expected_bias(b64, w, beta, c.out_dtype)
        got = d.view(DTYPES[c.out_dtype])
        u = uint_of(c.out_dtype)
        differ = got.view(u) != want.view(u)
        with np.errstate(invalid="ignore"):
            differ &= ~(np.isnan(got.astype(np.float64)) & np.isnan(want.astype(np.float64)))
        wrong = np.flatnonzero(differ)
        t = FoldTally()
        if wrong.size:
            i = int(wrong[0])
            t.bad, t.first = int(wrong.size), (i, float(got[i]), float(want[i]))
        return t


ORACLE_ELEMS = 1 << 17  # elements the integer oracle holds at once (~250 bytes of int64 temporaries each)


def _dequant(self: Checker, p: Piece, tc: TensorCheck, d: np.ndarray, s: Scratch) -> FoldTally:
    """Bit for bit the exact ``q·s·g`` rounded once, from the integer oracle (streamfold.check.quant_oracle),
    in sub-bands of about :data:`ORACLE_ELEMS` elements: memory stays flat whatever the band's size; the
    tally's ``exact`` counts the elements that needed no rounding (verify compares them with the card)."""
    c, (r0, r1) = p.chunk, p.rows
    osz = DTYPES[c.out_dtype].itemsize
    if c.fmt in INT_FMTS:  # integer-packed: streamfold.check.quant_oracle_int
        def rd(f: str, off: int, nbytes: int) -> np.ndarray:
            buf = np.empty(nbytes, np.uint8)
            self.reader.read(self.sources[f], off, buf)
            return buf
        return check_int_band(c, rd, tc.vec, d, base_index=r0 * c.cols)
    sfile, soff, sdtype, sshape = c.scale
    sraw = np.empty(math.prod(sshape) * DTYPES[sdtype].itemsize, np.uint8)
    self.reader.read(self.sources[sfile], soff, sraw)
    t = FoldTally()
    if c.fmt == "mxfp4":  # one expert's blocks and scales, rows r0..r1 of its transposed [in, out]
        blocks = s.get("src", math.prod(c.shape))
        self.reader.read(self.sources[c.src], c.src_off, blocks)
        step = max(32, ORACLE_ELEMS // max(c.cols, 1) // 32 * 32)
        for a in range(r0, r1, step):
            b = min(r1, a + step)
            want, exact = mxfp4_expected(blocks.reshape(c.shape), sraw, a, b, tc.vec, c.out_dtype)
            got = d[(a - r0) * c.cols * osz:(b - r0) * c.cols * osz]
            part = compare_bits(want, c.out_dtype, got, base_index=p.rel // osz + (a - r0) * c.cols)
            part.exact = int(np.count_nonzero(exact))
            t.merge(part)
        return t
    codes = s.get("src", (r1 - r0) * c.cols).reshape(r1 - r0, c.cols)
    self.reader.read(self.sources[c.src], p.src_off, codes.reshape(-1))
    br = c.block[0]
    grid = sraw.reshape(sshape[0], -1)  # the scale rows' bytes, one row per tile row from r0 // br
    step = max(1, ORACLE_ELEMS // max(c.cols, 1))
    for a in range(r0, r1, step):  # base_index from p.rel: rows count within one expert of a 3-D tensor
        b = min(r1, a + step)
        t.merge(check_dequant_band(codes[a - r0:b - r0], grid[a // br - r0 // br:].reshape(-1), sdtype,
                                   tuple(c.block), a, tc.vec, c.out_dtype,
                                   d[(a - r0) * c.cols * osz:(b - r0) * c.cols * osz],
                                   base_index=p.rel // osz + (a - r0) * c.cols))
    return t


_CHECKS = {Op.COPY: Checker._copy, Op.FOLD: Checker._fold, Op.FILL: Checker._fill, Op.BIAS: Checker._bias,
           Op.DEQUANT: _dequant}


def _f64(raw: np.ndarray, dtype: str) -> np.ndarray:
    return (widen_bf16(raw) if dtype == "BF16" else raw.view(DTYPES[dtype])).astype(np.float64)


def _bytes_equal(a: np.ndarray, b: np.ndarray) -> bool:
    if a.nbytes % 8 == 0:
        return bool(np.array_equal(a.view(np.uint64), b.view(np.uint64)))
    return bool(np.array_equal(a, b))


def check_task(task: Task, out_path: Path, sources: dict[str, Path], *, workers: int = 1,
               piece_bytes: int = PIECE) -> list[Problem]:
    """Problems found in ``out_path`` (the shard ``task`` wrote); empty when it is correct."""
    lay = task.layout()
    size = out_path.stat().st_size
    if size != lay.file_bytes:
        return [Problem("layout", task.shard, f"{size} bytes, the task lays out {lay.file_bytes}")]
    reader = Reader()
    try:
        head = np.empty(len(lay.header), np.uint8)
        reader.read(out_path, 0, head)
        if head.tobytes() != lay.header:
            return [Problem("layout", task.shard, "header differs from the task's")]
        checks = tensor_checks(task, piece_bytes)
        spans = [(lay.tensors[n].begin, lay.tensors[n].end, checks[n], Target(out_path, lay.tensors[n].begin))
                 for n, _, _ in task.tensors]
        run_jobs([Checker(sources, reader, piece_bytes).file_jobs(out_path, spans, None)], workers)
    finally:
        reader.close()
    return [p for tc in checks.values() if (p := tc.problem()) is not None]
