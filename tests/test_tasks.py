"""The plan as data: tasks round-trip through JSON, and running them one by one, each in its own process,
writes exactly what convert() writes."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import streamfold
from streamfold.planning.tasks import Chunk, Op, Task

from .factory import build_checkpoint
from .test_engine import RULES, toy  # noqa: F401 - the toy MoE fixture (per-row folds on a middle axis)
from tests.representatives import matrix

REPO = Path(__file__).resolve().parents[1]
RUN_ONE = ("import sys; from pathlib import Path; import streamfold; from streamfold.planning.tasks import Task; "
           "t = Task.from_json(Path(sys.argv[1]).read_text()); "
           "r = streamfold.run_task(t, sys.argv[2], src=sys.argv[3], workers=int(sys.argv[4])); print(r.size)")


@pytest.fixture(scope="module")
def neox(tmp_path_factory):
    """GPT-NeoX: LayerNorms with biases that fold into consumer biases in another shard."""
    return build_checkpoint("gpt_neox", tmp_path_factory.mktemp("neox") / "src")


def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _env():
    import os
    return dict(os.environ, PYTHONPATH=str(REPO))


def test_task_json_round_trip_is_exact(neox):
    p = streamfold.plan(neox, memory_budget=1 << 16)
    assert len(p.tasks) == 3
    ops = {c.op for t in p.tasks for c in t.chunks}
    assert ops == {Op.COPY, Op.FOLD, Op.FILL, Op.BIAS}
    for t in p.tasks:
        text = t.to_json()
        back = Task.from_json(text)
        assert back.to_json() == text
        assert back.layout().header == t.layout().header
        assert back.chunks == t.chunks and back.sources == t.sources and back.tensors == t.tensors
        assert back.norms.keys() == t.norms.keys()
        for k, parts in t.norms.items():
            for part, arr in parts.items():  # exact bit patterns, same dtype and shape
                got = back.norms[k][part]
                assert got.dtype == arr.dtype and got.shape == arr.shape
                assert got.tobytes() == np.ascontiguousarray(arr).tobytes()
        json.loads(text)  # plain JSON


def test_bias_task_names_the_weight_shard(neox):
    p = streamfold.plan(neox)
    bias = [(t, c) for t in p.tasks for c in t.chunks if c.op == Op.BIAS]
    assert bias
    for t, c in bias:
        wfile, _, _, _ = c.weight
        assert wfile in t.sources and c.src in t.sources and "shift" in t.norms[c.norm]
    assert any(c.weight[0] != t.shard for t, c in bias)  # W lives in another shard: the task reads both


def test_chunk_records_follow_the_budget(tmp_path):
    from .test_engine import BF16, write_safetensors
    rng = np.random.default_rng(3)
    H = 64
    t = {"layers.0.norm.weight": rng.uniform(0.5, 1.5, H).astype(BF16),
         "layers.0.router.weight": rng.standard_normal((1000, H)).astype(BF16),  # 128000 bytes
         "layers.0.experts.up": rng.standard_normal((2, H, 600)).astype(BF16),  # [E, in, out], axis 1
         "layers.0.experts.0.w1.weight": rng.standard_normal((3, H)).astype(BF16)}
    write_safetensors(tmp_path / "model.safetensors", t)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "toymoe"}))
    small = streamfold.plan(tmp_path, rules=RULES, workers=2, memory_budget=70_000)
    big = streamfold.plan(tmp_path, rules=RULES, workers=2, memory_budget=1 << 30)

    def folds(p, name):
        return [c for t in p.tasks for c in t.chunks if c.op == Op.FOLD and c.tensor == name]
    # the smallest chunk is 64 KiB of source: 65536 // (64 * 2) = 512 rows of the router
    assert [c.rows for c in folds(small, "layers.0.router.weight")] == [(0, 512), (512, 1000)]
    assert [c.rows for c in folds(big, "layers.0.router.weight")] == [(0, 1000)]
    up = folds(small, "layers.0.experts.up")  # one scale per row of 600: 65536 // 1200 = 54 rows a chunk
    assert [c.rows[1] - c.rows[0] for c in up] == [54, 54, 20]
    assert all(c.per_row and c.cols == 600 and c.width == H for c in up)
    assert small.tasks[0].count(Op.FILL) == 1 and small.tasks[0].count(Op.COPY) == 0


@pytest.mark.parametrize("mode,merged", matrix([("compat", "source"), ("strict", "float32")], {("strict", "float32")}))
def test_tasks_in_separate_processes_match_convert(neox, tmp_path, mode, merged):
    ref = tmp_path / "ref" / "out"  # the card names DST's folder: the same name as below
    streamfold.convert(neox, ref, mode=mode, merged_dtype=merged, manifest=True)
    p = streamfold.plan(neox, mode=mode, merged_dtype=merged, workers=2, memory_budget=1 << 17)
    out = tmp_path / "out"
    out.mkdir()
    digests = {}
    for i, t in enumerate(p.tasks):  # each task from its JSON alone, in a fresh interpreter
        js = tmp_path / f"task{i}.json"
        js.write_text(t.to_json())
        r = subprocess.run([sys.executable, "-c", RUN_ONE, str(js), str(out), str(neox), str(1 + i % 2)],
                           capture_output=True, text=True, env=_env(), timeout=300)
        assert r.returncode == 0, r.stderr
        assert int(r.stdout) == (out / t.shard).stat().st_size == t.file_bytes
    for t in p.tasks:
        import hashlib
        digests[t.shard] = hashlib.sha256((out / t.shard).read_bytes()).hexdigest()
    streamfold.finish(p, out, digests=digests, manifest=True)
    assert _files(out) == _files(ref)


def test_run_task_refuses_a_changed_source(toy, tmp_path):  # noqa: F811
    d = toy[0]
    src = tmp_path / "src"
    import shutil
    shutil.copytree(d, src)
    p = streamfold.plan(src, rules=RULES)
    task = next(t for t in p.tasks if t.shard == "a.safetensors")
    raw = bytearray((src / "a.safetensors").read_bytes())
    raw[20] ^= 1  # inside the JSON header
    (src / "a.safetensors").write_bytes(bytes(raw))
    with pytest.raises(streamfold.StreamfoldError, match="a.safetensors: source header changed"):
        streamfold.run_task(task, tmp_path, src=src)
    assert not list(tmp_path.glob("*.partial")) and not (tmp_path / "a.safetensors").exists()


def test_finish_refuses_missing_shards(toy, tmp_path):  # noqa: F811
    p = streamfold.plan(toy[0], rules=RULES)
    streamfold.run_task(p.tasks[0], tmp_path, src=p.src)
    with pytest.raises(streamfold.StreamfoldError, match="b.safetensors: output shard missing"):
        streamfold.finish(p, tmp_path)


def test_chunk_from_dict_rejects_unknown_op():
    with pytest.raises(ValueError):
        Chunk.from_dict({"op": "smear", "tensor": "x", "dst": 0, "size": 1})
