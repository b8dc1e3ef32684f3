"""Engine and kernel: exact rounding, chunking, layouts, and output independent of workers/budget."""
import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import streamfold
from streamfold.core.fold import Scratch, scale_chunk
from streamfold.core.reader import Checkpoint
from streamfold.core.writer import ShardLayout

BF16 = ml_dtypes.bfloat16


def write_safetensors(path: Path, tensors: dict) -> None:
    """Write with streamfold's own layout code (an independent check is reading it back below)."""
    from streamfold.core.dtypes import DTYPES
    rev = {v: k for k, v in DTYPES.items()}
    layout = ShardLayout([(k, rev[v.dtype], v.shape) for k, v in tensors.items()], {"format": "pt"})
    with open(path, "wb") as f:
        f.write(layout.header)
        for v in tensors.values():
            f.write(np.ascontiguousarray(v).reshape(-1).view(np.uint8).tobytes())


def test_written_files_load_in_safetensors():
    from safetensors import safe_open
    import tempfile
    d = Path(tempfile.mkdtemp())
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    write_safetensors(d / "x.safetensors", {"a": a, "b": np.ones(5, np.int64)})
    with safe_open(d / "x.safetensors", framework="np") as f:
        assert np.array_equal(f.get_tensor("a"), a) and f.metadata() == {"format": "pt"}


@pytest.mark.parametrize("src_dtype,out_dtype", [("BF16", "BF16"), ("BF16", "F32"), ("F16", "F16"),
                                                 ("F16", "F32"), ("F32", "F32")])
def test_kernel_matches_one_rounding(src_dtype, out_dtype):
    rng = np.random.default_rng(0)
    np_src = {"BF16": BF16, "F16": np.float16, "F32": np.float32}[src_dtype]
    np_out = {"BF16": BF16, "F16": np.float16, "F32": np.float32}[out_dtype]
    x = (rng.standard_normal((37, 300)) * 3).astype(np.float32).astype(np_src)
    x[0, :4] = [np.inf, -np.inf, np.nan, 0.0]
    x[1, :3] = [np.finfo(np.float32).max if src_dtype == "F32" else 3e38 if src_dtype == "BF16" else 6e4, 1e-40, -0.0]
    g = (rng.uniform(0.5, 2, 300) * rng.choice([-1, 1], 300)).astype(np.float32).astype(np_src).astype(np.float32)
    g[5] = 1 + 2 ** -7  # ties and near-ties in bf16
    out = np.empty(x.shape, np_out)
    scale_chunk(x, g.reshape(1, -1), src_dtype, out_dtype, out, Scratch())
    with np.errstate(over="ignore", invalid="ignore"):
        want = (x.astype(np.float32) * g).astype(np_out)
    nan = np.isnan(want.astype(np.float32))
    assert np.array_equal(np.isnan(out.astype(np.float32)), nan)
    assert np.array_equal(out.view(np.uint8).reshape(37, -1)[~nan.any(1)], want.view(np.uint8).reshape(37, -1)[~nan.any(1)])


def test_bf16_rounding_ties_go_to_even():
    # 1 + 2^-8 lies exactly between two bf16 neighbours: even mantissa (1.0) wins; 1 + 3*2^-8 -> up
    x = np.array([[1.0, 1.0, 1.0]], dtype=BF16)
    g = np.array([[1 + 2 ** -8, 1 + 3 * 2 ** -8, 1 + 2 ** -8 + 2 ** -20]], dtype=np.float32)
    out = np.empty((1, 3), BF16)
    scale_chunk(x, g, "BF16", "BF16", out, Scratch())
    assert out.astype(np.float32).tolist() == [[1.0, 1 + 2 ** -6, 1 + 2 ** -7]]


RULES = {"toy": {
    "model_types": ["toymoe"],
    "offset": 1,
    "folds": [
        {"norm": "layers.{n}.norm", "into": [
            "layers.{n}.router",
            {"weight": "layers.{n}.experts.up", "axis": 1},
            "layers.{n}.experts.{e}.w1"]},
    ],
    "keep": [{"norm": "layers.{n}.post_norm", "why": "output goes to the residual"}],
}}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    rng = np.random.default_rng(1)
    H = 48

    def bf(*s):
        return rng.standard_normal(s).astype(np.float32).astype(BF16)
    shard1, shard2 = {}, {}
    for n in range(2):
        shard1[f"layers.{n}.norm.weight"] = (rng.uniform(-0.6, 1.0, H)).astype(np.float32).astype(BF16)
        shard1[f"layers.{n}.post_norm.weight"] = bf(H)
        shard2[f"layers.{n}.router.weight"] = bf(4, H)
        shard2[f"layers.{n}.router.bias"] = bf(4)
        shard2[f"layers.{n}.experts.up"] = bf(4, H, 70)  # [E, in, out]: input axis 1
        for e in range(3):
            shard2[f"layers.{n}.experts.{e}.w1.weight"] = bf(333, H)
        shard2[f"layers.{n}.down.weight"] = bf(H, 96)
    write_safetensors(d / "a.safetensors", shard1)
    write_safetensors(d / "b.safetensors", shard2)
    wm = {k: "a.safetensors" for k in shard1} | {k: "b.safetensors" for k in shard2}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    (d / "config.json").write_text(json.dumps({"model_type": "toymoe"}))
    (d / "tokenizer.json").write_text("{}")
    return d, shard1, shard2


def test_custom_rules_fold_exactly(toy, tmp_path):
    d, s1, s2 = toy
    rules = tmp_path / "toy.json"
    rules.write_text(json.dumps({"families": RULES}))
    rep = streamfold.convert(d, tmp_path / "out", rules=rules, memory_budget=200_000, workers=3)
    assert rep.norms_folded == 2 and rep.norms_kept == 2
    out = Checkpoint(tmp_path / "out")
    for n in range(2):
        g = 1 + s1[f"layers.{n}.norm.weight"].astype(np.float32)
        np.testing.assert_array_equal(out.array(f"layers.{n}.norm.weight").astype(np.float32), 0)
        np.testing.assert_array_equal(out.array(f"layers.{n}.post_norm.weight"), s1[f"layers.{n}.post_norm.weight"])
        np.testing.assert_array_equal(out.array(f"layers.{n}.router.bias"), s2[f"layers.{n}.router.bias"])
        for name in (f"layers.{n}.router.weight", *(f"layers.{n}.experts.{e}.w1.weight" for e in range(3))):
            want = (s2[name].astype(np.float64) * g.astype(np.float64)).astype(BF16)  # exact, rounded once
            np.testing.assert_array_equal(out.array(name).view(np.uint16), want.view(np.uint16))
        up = s2[f"layers.{n}.experts.up"].astype(np.float64) * g.astype(np.float64)[None, :, None]
        np.testing.assert_array_equal(out.array(f"layers.{n}.experts.up").view(np.uint16),
                                      up.astype(BF16).view(np.uint16))
        np.testing.assert_array_equal(out.array(f"layers.{n}.down.weight"), s2[f"layers.{n}.down.weight"])
    assert (tmp_path / "out" / "tokenizer.json").read_text() == "{}"
    idx = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert idx["metadata"]["total_size"] == sum(t.nbytes for t in out)


@pytest.mark.parametrize("mode,merged", [("compat", "source"), ("strict", "float32")])
def test_output_independent_of_workers_and_budget(toy, tmp_path, mode, merged):
    d = toy[0]
    outs = []
    for i, (w, b) in enumerate([(1, 1 << 30), (2, 70_000), (5, 1 << 16)]):
        o = tmp_path / f"o{i}" / "out"  # the same name: the card names DST's folder
        streamfold.convert(d, o, rules=RULES, workers=w, memory_budget=b, mode=mode, merged_dtype=merged)
        outs.append({p.name: p.read_bytes() for p in sorted(o.iterdir())})
    assert outs[0] == outs[1] == outs[2]


def test_rules_file_errors_are_one_line(tmp_path, toy):
    bad = tmp_path / "bad.toml"
    bad.write_text('model_types = ["toymoe"]\nfolds = [{norm = "layers.{n}.norm", into = ["layers.{k}.x"]}]\n')
    with pytest.raises(streamfold.StreamfoldError, match=r"unknown placeholder \{k\}"):
        streamfold.convert(toy[0], tmp_path / "o", rules=bad)
    bad.write_text('model_types = ["toymoe"]\nfolds = [{norm = "layers.{n}.norm", into = ["layers.{n}.nope"]}]\n')
    with pytest.raises(streamfold.StreamfoldError, match="layers.0.nope"):
        streamfold.convert(toy[0], tmp_path / "o", rules=bad)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("workers", [1, 3])
def test_manifest_hashed_while_writing_matches_files(toy, tmp_path, workers):
    import hashlib
    out = tmp_path / "o"
    streamfold.convert(toy[0], out, rules=RULES, workers=workers, memory_budget=70_000, manifest=True)
    lines = (out / "SHA256SUMS").read_text().splitlines()
    listed = {rel: digest for digest, rel in (line.split("  ", 1) for line in lines)}
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file() and p.name != "SHA256SUMS")
    assert sorted(listed) == files
    for rel in files:
        assert listed[rel] == hashlib.sha256((out / rel).read_bytes()).hexdigest(), rel
