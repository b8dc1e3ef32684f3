"""verify checks the task chunk records (streamfold/taskcheck.py): the one element check, for ``verify``
and for ``--stream --verify``.

Outputs here are written task by task from each task's JSON (the path a Ray worker or another machine
takes), with other chunk sizes than verify plans with, then damaged in one element of one record kind.
"""
from __future__ import annotations

import json
import struct

import ml_dtypes
import numpy as np
import pytest

import streamfold
from streamfold.check import checkrun
from streamfold.core import fold
from streamfold.check import forward_check
from streamfold.check import verify
from streamfold.check import oracle
from streamfold.check import taskcheck
from streamfold.check import meta as verify_meta
from streamfold.check import report as verify_report
from streamfold.planning.planner import Kind
from streamfold.planning.tasks import Chunk, Op, Task
from tests.factory import build_checkpoint
from tests.test_verify import overwrite, read_tensor, span

BF16 = ml_dtypes.bfloat16


@pytest.fixture(scope="module")
def neox(tmp_path_factory):
    """GPT-NeoX: LayerNorms with biases (fill records), bias folds (bias records) into another shard."""
    return build_checkpoint("gpt_neox", tmp_path_factory.mktemp("neox") / "src")


def _by_kind(cplan, kind: Kind) -> str:
    return next(n for n, a in cplan.plan.actions.items() if a.kind == kind)


@pytest.fixture
def from_json(neox, tmp_path):
    """An output written by running each task from its JSON alone (small chunks), then finished."""
    cplan = streamfold.plan(neox, workers=2, memory_budget=1 << 17)
    out = tmp_path / "out"
    out.mkdir()
    for t in cplan.tasks:
        streamfold.run_task(Task.from_json(t.to_json()), out, src=neox, workers=1)
    streamfold.finish(cplan, out)
    return neox, out, cplan


def test_verify_names_tensor_and_index_in_bias_and_fill_records(from_json):
    src, out, cplan = from_json
    r = streamfold.verify(src, out)
    assert r.ok, r.summary()
    assert r.counts["biases"] == 4 and r.counts["identity"] == 8 and r.counts["folded"] == 4
    bias, fill = _by_kind(cplan, Kind.BIAS), _by_kind(cplan, Kind.FILL)
    b = read_tensor(out, bias).copy()
    b[37] = BF16(float(b[37]) * 1.5 + 1.0)  # far outside one rounding
    overwrite(out, bias, b)
    g = read_tensor(out, fill).copy()
    g[11] = BF16(2.0)
    overwrite(out, fill, g)
    r = streamfold.verify(src, out, workers=2, memory_budget=1 << 14)
    tensor = {p.subject: p.message for p in r.problems if p.check == "tensor"}
    assert set(tensor) == {bias, fill}, r.summary()
    assert "is not the source bias + " in tensor[bias] and f"1 of {b.size} elements wrong, first at [37]" in tensor[bias]
    assert "not the identity" in tensor[fill] and f"1 of {g.size} elements differ, first at [11]: 2" in tensor[fill]


def test_check_task_problems_name_check_subject_and_index(from_json):
    """The stream path's checker returns Problems (check, subject, message) with element indexes."""
    src, out, cplan = from_json
    sources = {s: src / s for s in {s for t in cplan.tasks for s in t.sources}}
    for t in cplan.tasks:
        assert taskcheck.check_task(t, out / t.shard, sources) == []
    name = _by_kind(cplan, Kind.SCALE)
    task = next(t for t in cplan.tasks if any(n == name for n, _, _ in t.tensors))
    w = read_tensor(out, name).copy()
    w.view(np.uint16)[5, 9] ^= 1  # one ulp off
    overwrite(out, name, w)
    problems = taskcheck.check_task(task, out / task.shard, sources, piece_bytes=256)
    assert [(p.check, p.subject) for p in problems] == [("tensor", name)]
    m = problems[0].message  # the distance is from the exact product: under 1.5 ulp for a one-ulp nudge
    assert f"1 of {w.size} elements wrong (worst 0." in m or f"1 of {w.size} elements wrong (worst 1." in m
    assert "ulp), first at [5, 9]: " in m
    assert str(problems[0]).startswith(f"{name}: is not source x ")


def test_verify_checks_the_header_bytes(neox, tmp_path):
    """The same tensors with a header spelled differently: not the planned bytes, so reported (the
    data is still checked, at the offsets the header gives)."""
    out = tmp_path / "out"
    streamfold.convert(neox, out)
    shard = span(out, _by_kind(streamfold.plan(neox), Kind.SCALE)).path.name
    raw = (out / shard).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.dumps(json.loads(raw[8:8 + n]), indent=1).encode()  # same entries, other spelling
    (out / shard).write_bytes(struct.pack("<Q", len(header)) + header + raw[8 + n:])
    r = streamfold.verify(neox, out)
    assert [(p.check, p.subject) for p in r.problems] == [("layout", shard)], r.summary()
    assert "not byte for byte the planned one (same tensors, offsets and metadata" in r.problems[0].message
    assert r.counts["folded"] == 4  # every tensor still checked


def test_pieces_tile_every_tensor_whatever_the_chunking(neox):
    """Records planned with big chunks, checked in small pieces: each tensor covered exactly once,
    copy runs split at tensor boundaries, no piece over the bound."""
    cplan = streamfold.plan(neox, workers=1, memory_budget=1 << 30)
    for task in cplan.tasks:
        lay = task.layout()
        checks = taskcheck.tensor_checks(task, 512)
        assert set(checks) == {n for n, _, _ in task.tensors}
        for name, tc in checks.items():
            assert sum(p.size for p in tc.pieces) == lay.tensors[name].end - lay.tensors[name].begin
            assert all(p.size <= 512 or p.chunk.op in (Op.FILL, Op.BIAS) for p in tc.pieces)
            assert tc.op == {Kind.COPY: Op.COPY, Kind.SCALE: Op.FOLD, Kind.FILL: Op.FILL,
                             Kind.BIAS: Op.BIAS}[cplan.plan.actions[name].kind]


def test_element_check_is_independent_of_the_kernels(from_json, monkeypatch):
    """No verify module holds one of fold.py's kernels (only its Scratch buffers), and verify passes
    with the kernels broken."""
    for mod in (taskcheck, checkrun, verify, verify_meta, verify_report, forward_check, oracle):
        held = [k for k, v in vars(mod).items() if callable(v) and getattr(v, "__module__", "") == "streamfold.core.fold"]
        assert held in ([], ["Scratch"]), (mod.__name__, held)

    def broken(*a, **k):
        raise AssertionError("verify called a fold kernel")
    for k in ("scale_chunk", "fold_bias_rows"):
        monkeypatch.setattr(fold, k, broken)
    src, out, _ = from_json
    assert streamfold.verify(src, out).ok


def test_copy_run_with_an_empty_tensor_at_the_same_offset():
    """A zero-size tensor shares its offset with the next one: the copy record still checks the next."""
    t = Task(shard="s", tensors=[("z", "BF16", (0,)), ("b", "BF16", (4,))], metadata=None, sources={}, chunks=[])
    begin = t.layout().tensors["z"].begin
    t.chunks.append(Chunk(Op.COPY, "z", begin, 8, src="s", src_off=100, src_bytes=8))
    checks = taskcheck.tensor_checks(t, 4)
    assert checks["z"].pieces == []
    assert [(p.rel, p.size, p.src_off) for p in checks["b"].pieces] == [(0, 4, 100), (4, 4, 104)]
