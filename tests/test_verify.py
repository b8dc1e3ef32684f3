"""streamfold verify: passes on correct conversions, fails naming the tensor on each planted fault.

Checkpoints come from tests/factory.py (random norms far from 1, norms in a shard of their own).
Faults are planted in a correct conversion's output by rewriting bytes in place (the shard headers
stay valid) or by rewriting a shard with safetensors (for a missing or an extra tensor).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import streamfold
from streamfold.core.errors import StreamfoldError
from streamfold.check.forward import SUPPORTED as FORWARD_TYPES
from streamfold.core.manifest import MANIFEST_NAME, parse_manifest
from streamfold.core.reader import INDEX_NAME, Checkpoint
from streamfold.rules.schema import family_for
from streamfold.check.verify import EXIT_FAILED, check_scaled
from streamfold.core.fold import Scratch
from tests.factory import ARCHS, build_checkpoint
from tests.representatives import matrix

BF16 = ml_dtypes.bfloat16
ROOT = Path(__file__).resolve().parents[1]


def _supported(name: str) -> bool:
    """A family streamfold knows, with at least one norm to fold (stablelm_parallel, nemotron_nobias have none)."""
    try:
        family_for(ARCHS[name].model_type)
    except StreamfoldError:
        return False
    return any(r.fold for r in ARCHS[name].norms)


SUPPORTED_ARCHS = [n for n in ARCHS if _supported(n)]


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Built factory checkpoints, cached per module: ``ckpts(name, dtype) -> Path``."""
    root = tmp_path_factory.mktemp("verify_src")
    cache: dict = {}

    def get(name: str, dtype: str = "bfloat16") -> Path:
        key = (name, dtype)
        if key not in cache:
            cache[key] = build_checkpoint(name, root / f"{name}-{dtype}", dtype=dtype)
        return cache[key]
    return get


def convert(src: Path, dst: Path, **kw) -> Path:
    kw.setdefault("manifest", True)  # so verify's manifest check is exercised too
    streamfold.convert(src, dst, **kw)
    return dst


# -- helpers to plant faults -----------------------------------------------------------------------------
def span(ckpt: Path, name: str):
    c = Checkpoint(ckpt)
    t = c.tensors[name]
    c.close()
    return t


def read_tensor(ckpt: Path, name: str) -> np.ndarray:
    t = span(ckpt, name)
    with open(t.path, "rb") as f:
        f.seek(t.begin)
        raw = np.frombuffer(f.read(t.nbytes), dtype=np.uint8)
    from streamfold.core.dtypes import DTYPES
    return raw.view(DTYPES[t.dtype]).reshape(t.shape)


def overwrite(ckpt: Path, name: str, values: np.ndarray) -> None:
    t = span(ckpt, name)
    data = np.ascontiguousarray(values).reshape(-1).view(np.uint8).tobytes()
    assert len(data) == t.nbytes
    with open(t.path, "r+b") as f:
        f.seek(t.begin)
        f.write(data)


def flip_byte(ckpt: Path, name: str, at: int | None = None) -> None:
    t = span(ckpt, name)
    pos = t.begin + (t.nbytes // 2 if at is None else at)
    with open(t.path, "r+b") as f:
        f.seek(pos)
        b = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([b ^ 0x10]))


def rewrite_shard(ckpt: Path, shard: str, drop: str | None = None, add: tuple[str, object] | None = None,
                  fix_index: bool = True) -> None:
    """Rewrite one shard with safetensors (torch), dropping or adding a tensor; keep the index in sync."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    path = ckpt / shard
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != drop}
    if add is not None:
        tensors[add[0]] = add[1]
    save_file(tensors, str(path), metadata=meta)
    if fix_index:
        idx = json.loads((ckpt / INDEX_NAME).read_text())
        if drop:
            idx["weight_map"].pop(drop)
        if add:
            idx["weight_map"][add[0]] = shard
        from streamfold.core.reader import SafetensorsFile
        idx["metadata"]["total_size"] = sum(t.nbytes for s in set(idx["weight_map"].values())
                                            for t in SafetensorsFile(ckpt / s).tensors.values())
        (ckpt / INDEX_NAME).write_text(json.dumps(idx))


def problems_for(report, subject: str) -> list:
    return [p for p in report.problems if p.subject == subject]


def assert_fails_naming(report, subject: str, *fragments: str) -> None:
    assert not report.ok
    hits = problems_for(report, subject)
    assert hits, f"no problem names {subject!r}: {[str(p) for p in report.problems]}"
    text = " | ".join(p.message for p in hits)
    for frag in fragments:
        assert frag in text, f"{frag!r} not in {text!r}"


# -- correct conversions pass -----------------------------------------------------------------------------
# fast: every mode on llama, one other mode on each of three other shapes; --full: every architecture x mode
_VERIFY_FAST = {("llama", "compat", "source"), ("llama", "strict", "source"), ("llama", "compat", "float32"),
                ("gpt_neox", "compat", "source"), ("deepseek_v3", "strict", "source"), ("gpt_oss", "compat", "float32")}


@pytest.mark.parametrize("name,mode,merged", matrix(
    [(n, m, d) for n in SUPPORTED_ARCHS for m, d in [("compat", "source"), ("strict", "source"), ("compat", "float32")]],
    _VERIFY_FAST))
def test_correct_conversion_passes(ckpts, tmp_path, name, mode, merged):
    if mode == "strict" and not ARCHS[name].strict_exact:
        pytest.skip("strict mode is refused for this family (tested in tests/test_architectures.py)")
    src = ckpts(name)
    dst = convert(src, tmp_path / "out", mode=mode, merged_dtype=merged)
    forward = ARCHS[name].model_type in FORWARD_TYPES
    r = streamfold.verify(src, dst, forward=forward)
    assert r.ok, r.summary()
    assert (r.mode, r.merged_dtype) == (mode, merged)
    assert r.manifest == "ok"
    plan = streamfold.load_plan(src, mode=mode, merged_dtype=merged)[2]
    assert r.counts["folded"] == plan.count("scale") > 0
    assert r.counts["unchanged"] == plan.count("copy")
    assert r.counts["identity"] == plan.count("fill") and r.counts["absent"] == plan.count("drop")
    assert r.counts["kept_norms"] == sum(1 for n in plan.kept)
    if forward:
        f = r.forward
        assert f["min_cosine"] > 0.9999 and f["all_finite"]
        if merged == "float32":  # folding without rounding: the logits agree to float32 noise
            assert f["max_rel_error"] < 1e-5


def test_float32_source_passes_exactly(ckpts, tmp_path):
    src = ckpts("llama", "float32")
    dst = convert(src, tmp_path / "out", mode="strict")
    r = streamfold.verify(src, dst, forward=True)
    assert r.ok, r.summary()
    assert r.forward["max_rel_error"] < 1e-5


def test_small_chunks_many_workers(ckpts, tmp_path):
    """Tensors split over many chunks and threads: same verdict, every byte hashed in order."""
    src = ckpts("qwen3")
    dst = convert(src, tmp_path / "out")
    r = streamfold.verify(src, dst, workers=3, memory_budget=32 << 10)
    assert r.ok and r.manifest == "ok", r.summary()
    flip_byte(dst, "model.layers.1.mlp.down_proj.weight", at=5000)
    r = streamfold.verify(src, dst, workers=3, memory_budget=32 << 10)
    assert_fails_naming(r, "model.layers.1.mlp.down_proj.weight", "1 of", "first at byte 5000")
    assert r.manifest == "failed"


# -- planted faults ---------------------------------------------------------------------------------------
@pytest.fixture
def converted(ckpts, tmp_path):
    def make(name="llama", **kw):
        src = ckpts(name)
        return src, convert(src, tmp_path / f"out-{name}-{kw.get('mode', 'compat')}", **kw)
    return make


def test_fault_folded_tensor_left_unfolded(converted):
    src, dst = converted()
    name = "model.layers.0.self_attn.k_proj.weight"
    overwrite(dst, name, read_tensor(src, name))
    r = streamfold.verify(src, dst)
    assert_fails_naming(r, name, "not source x model.layers.0.input_layernorm.weight", "left unfolded")
    assert [p.subject for p in r.problems if p.check == "tensor"] == [name]


def test_fault_folded_with_wrong_norm(converted):
    src, dst = converted()
    name = "model.layers.1.self_attn.q_proj.weight"
    wrong = read_tensor(src, "model.layers.1.post_attention_layernorm.weight").astype(np.float32)
    w = read_tensor(src, name).astype(np.float32)
    overwrite(dst, name, (w * wrong[None, :]).astype(BF16))
    r = streamfold.verify(src, dst)
    assert_fails_naming(r, name, "not source x model.layers.1.input_layernorm.weight", "elements wrong")
    assert [p.subject for p in r.problems if p.check == "tensor"] == [name]


def test_fault_lm_head_folded_with_wrong_norm_float32(ckpts, tmp_path):
    src = ckpts("llama")
    dst = convert(src, tmp_path / "out", merged_dtype="float32")
    w = read_tensor(src, "lm_head.weight").astype(np.float32)
    g = read_tensor(src, "model.layers.1.input_layernorm.weight").astype(np.float32)
    overwrite(dst, "lm_head.weight", w * g[None, :])
    r = streamfold.verify(src, dst)
    assert_fails_naming(r, "lm_head.weight", "not source x model.norm.weight")


def test_fault_norm_left_non_identity(converted):
    src, dst = converted()
    name = "model.layers.1.post_attention_layernorm.weight"
    overwrite(dst, name, read_tensor(src, name))
    r = streamfold.verify(src, dst)
    assert_fails_naming(r, name, "not the identity")


def test_fault_norm_present_in_strict(converted):
    src, dst = converted(mode="strict")
    import torch
    name = "model.norm.weight"
    rewrite_shard(dst, "model-00001-of-00003.safetensors", add=(name, torch.ones(64, dtype=torch.bfloat16)))
    r = streamfold.verify(src, dst)
    assert_fails_naming(r, name, "must be absent in strict mode")


def test_fault_flipped_byte_in_untouched_tensor(converted):
    src, dst = converted()
    name = "model.embed_tokens.weight"
    flip_byte(dst, name)
    r = streamfold.verify(src, dst)
    assert_fails_naming(r, name, "differs from the source (should be unchanged)", "1 of")
    shard = span(dst, name).path.name
    assert_fails_naming(r, shard, "does not match SHA256SUMS")


def test_fault_flipped_byte_in_unfoldable_norm(converted):
    src, dst = converted("qwen3")
    name = "model.layers.0.self_attn.k_norm.weight"
    flip_byte(dst, name, at=1)
    r = streamfold.verify(src, dst)
    assert_fails_naming(r, name, "a norm that cannot fold")


def test_fault_flipped_byte_in_folded_tensor(converted):
    src, dst = converted()
    name = "model.layers.0.mlp.up_proj.weight"
    flip_byte(dst, name, at=101)
    r = streamfold.verify(src, dst)
    assert_fails_naming(r, name, "1 of 8192 elements wrong")


def test_fault_missing_tensor(converted):
    src, dst = converted()
    name = "model.layers.1.mlp.down_proj.weight"
    shard = span(dst, name).path.name
    rewrite_shard(dst, shard, drop=name)
    r = streamfold.verify(src, dst)
    assert_fails_naming(r, name, f"missing (expected in {shard}")
    assert [p.subject for p in r.problems if p.check in ("tensor", "index")] == [name]


def test_fault_stale_index_from_source(converted):
    """Strict output with the source's index: the index still lists the removed norms."""
    src, dst = converted(mode="strict")
    shutil.copy(src / INDEX_NAME, dst / INDEX_NAME)
    r = streamfold.verify(src, dst)
    assert_fails_naming(r, "model.layers.0.input_layernorm.weight", "no shard holds it (stale index)")
    assert_fails_naming(r, INDEX_NAME, "total_size")


def test_fault_stale_index_wrong_shard(converted):
    src, dst = converted()
    idx = json.loads((dst / INDEX_NAME).read_text())
    name = "model.layers.0.self_attn.v_proj.weight"
    right = idx["weight_map"][name]
    idx["weight_map"][name] = next(s for s in set(idx["weight_map"].values()) if s != right)
    (dst / INDEX_NAME).write_text(json.dumps(idx))
    r = streamfold.verify(src, dst)
    assert_fails_naming(r, name, f"but it is in {right} (stale index)")


def test_fault_config_flags(converted):
    src, dst = converted()
    cfg = json.loads((dst / "config.json").read_text())
    del cfg["flashnorm"]
    cfg["rms_norm_eps"] = 1e-3
    (dst / "config.json").write_text(json.dumps(cfg))
    r = streamfold.verify(src, dst)
    assert_fails_naming(r, "config.json", "\"flashnorm\" is None", "'rms_norm_eps'")


def test_fault_dtype_changed(ckpts, tmp_path):
    """A float32-merged output declared as source dtype: every folded tensor has the wrong dtype."""
    src = ckpts("llama")
    dst = convert(src, tmp_path / "out", merged_dtype="float32")
    r = streamfold.verify(src, dst, merged_dtype="source")
    assert_fails_naming(r, "model.layers.0.self_attn.q_proj.weight", "is F32", "expected BF16")


def test_manifest_catches_changed_and_unlisted_files(converted):
    src, dst = converted()
    entries, bad = parse_manifest(dst / MANIFEST_NAME)
    assert not bad and set(entries) >= {"config.json", INDEX_NAME, "README.md",
                                        "model-00001-of-00003.safetensors"}
    (dst / "generation_config.json").write_text("{}\n")
    (dst / "notes.txt").write_text("hello\n")
    r = streamfold.verify(src, dst)
    assert_fails_naming(r, "generation_config.json", "does not match SHA256SUMS")
    assert_fails_naming(r, "generation_config.json", "differs from the source")
    assert_fails_naming(r, "notes.txt", "not listed in SHA256SUMS")
    assert r.manifest == "failed"


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="no sha256sum")
def test_manifest_is_sha256sum_format(converted):
    src, dst = converted()
    out = subprocess.run(["sha256sum", "-c", MANIFEST_NAME], cwd=dst, capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.count(": OK") == len(parse_manifest(dst / MANIFEST_NAME)[0])


def test_no_manifest(ckpts, tmp_path):
    src = ckpts("llama")
    dst = convert(src, tmp_path / "out", manifest=False)
    assert not (dst / MANIFEST_NAME).exists()
    r = streamfold.verify(src, dst)
    assert r.ok and r.manifest == "absent" and any("SHA256SUMS" in n for n in r.notes)


def test_leftover_unfolded_weights_file(converted):
    src, dst = converted()
    (src / "pytorch_model.bin").write_bytes(b"x")
    try:
        (dst / "pytorch_model.bin").write_bytes(b"x")
        r = streamfold.verify(src, dst)
        assert_fails_naming(r, "pytorch_model.bin", "would load unfolded")
    finally:
        (src / "pytorch_model.bin").unlink()


def test_axis0_consumer_via_rules(ckpts, tmp_path):
    """A consumer scaled along axis 0 (row multipliers) verifies, and a wrong row is caught."""
    rules = {"llama_axis0": {"model_types": ["llama"], "folds": [
        {"norm": "model.layers.{n}.post_attention_layernorm",
         "into": [{"weight": "model.layers.{n}.mlp.down_proj.weight", "axis": 0}]}]}}
    src = ckpts("llama")
    dst = convert(src, tmp_path / "out", rules=rules)
    r = streamfold.verify(src, dst, rules=rules, memory_budget=16 << 10, workers=2)
    assert r.ok, r.summary()
    name = "model.layers.1.mlp.down_proj.weight"
    w = read_tensor(dst, name).copy()
    w[7] = read_tensor(src, name)[7]
    overwrite(dst, name, w)
    r = streamfold.verify(src, dst, rules=rules)
    assert_fails_naming(r, name, "first at [7, ")


# -- the element check itself ------------------------------------------------------------------------------
def test_check_scaled_bounds_and_special_values():
    rng = np.random.default_rng(0)
    src = rng.standard_normal((8, 64)).astype(BF16)
    src[0, :4] = [np.inf, -np.inf, np.nan, 0.0]
    g = rng.uniform(0.5, 2.0, 64).astype(BF16).astype(np.float32)
    good = (src.astype(np.float32) * g[None, :]).astype(BF16)
    t = check_scaled(src, good, g[None, :], "BF16", "BF16", Scratch())
    assert t.bad == 0
    bad = good.copy()
    bits = bad.view(np.uint16)
    bits[3, 10] += 1  # one ulp off
    bits[5, 20] = 0x7F80  # +inf where the product is finite
    t = check_scaled(src, bad, g[None, :], "BF16", "BF16", Scratch())
    assert t.bad == 2 and t.first[0] == 3 * 64 + 10 and t.worst_ulp == np.inf
    f32 = src.astype(np.float32) * g[None, :]
    assert check_scaled(src, f32, g[None, :], "BF16", "F32", Scratch()).bad == 0
    f32[2, 2] = np.nextafter(f32[2, 2], np.float32(np.inf))
    t = check_scaled(src, f32, g[None, :], "BF16", "F32", Scratch())
    assert t.bad == 1 and abs(t.worst_ulp - 1.0) < 1e-6


def test_check_scaled_float16():
    rng = np.random.default_rng(1)
    src = rng.standard_normal((4, 32)).astype(np.float16)
    g = rng.uniform(0.5, 2.0, 32).astype(np.float32)
    out = (src.astype(np.float64) * g[None, :]).astype(np.float16)  # exact product, rounded once
    assert check_scaled(src, out, g[None, :], "F16", "F16", Scratch()).bad == 0
    out[1, 1] = np.nextafter(out[1, 1], np.float16(np.inf))
    assert check_scaled(src, out, g[None, :], "F16", "F16", Scratch()).bad == 1


# -- CLI ---------------------------------------------------------------------------------------------------
def cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streamfold", *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT)


def test_cli_verify_exit_codes_and_json(converted, tmp_path):
    src, dst = converted()
    ok = cli("verify", src, dst, "--json")
    assert ok.returncode == 0, ok.stderr
    data = json.loads(ok.stdout)
    assert data["ok"] is True and data["problems"] == [] and data["counts"]["folded"] == 11
    text = cli("verify", src, dst)
    assert text.returncode == 0 and "PASS" in text.stdout
    name = "model.layers.0.self_attn.v_proj.weight"
    overwrite(dst, name, read_tensor(src, name))
    bad = cli("verify", src, dst)
    assert bad.returncode == EXIT_FAILED == 3
    fail_lines = [ln for ln in bad.stdout.splitlines() if ln.strip().startswith("FAIL ")]
    assert any(name in ln for ln in fail_lines) and "FAIL (" in bad.stdout.splitlines()[-1]
    quiet = cli("verify", src, dst, "-q")
    assert quiet.returncode == 3 and quiet.stdout == "" and name in quiet.stderr
    data = json.loads(cli("verify", src, dst, "--json").stdout)
    assert data["ok"] is False and any(p["subject"] == name for p in data["problems"])
    missing = cli("verify", src, tmp_path / "nope")
    assert missing.returncode == 2 and "not a folder" in missing.stderr


def test_cli_verify_forward(converted):
    src, dst = converted("qwen3", mode="strict")
    out = cli("verify", src, dst, "--forward", "--tokens", "5,17,42,99,3,250")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "forward (6 tokens" in out.stdout and "argmax agreement" in out.stdout


def test_cli_convert_verify(ckpts, tmp_path):
    src = ckpts("phi3")
    out = cli(src, tmp_path / "out", "--verify", "--json", "--mode", "strict", "--manifest")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["verification"]["ok"] is True and data["manifest"] is True
    out = cli(src, tmp_path / "out2", "--verify")
    assert out.returncode == 0 and "PASS" in out.stdout and not (tmp_path / "out2" / MANIFEST_NAME).exists()


def test_convert_verify_library(ckpts, tmp_path):
    src = ckpts("llama_tied")
    rep = streamfold.convert(src, tmp_path / "out", verify=True)
    assert rep.verification is not None and rep.verification.ok
    assert rep.to_dict()["verification"]["ok"] is True


def test_missing_and_corrupt_shards(converted):
    src, dst = converted()
    (dst / "model-00003-of-00003.safetensors").unlink()
    with open(dst / "model-00002-of-00003.safetensors", "r+b") as f:
        f.seek(20)
        f.write(b"\x00\x00\x00")  # inside the JSON header
    r = streamfold.verify(src, dst)
    assert_fails_naming(r, "model-00003-of-00003.safetensors", "shard file is missing")
    assert_fails_naming(r, "model-00003-of-00003.safetensors", "tensors missing with this shard")
    assert_fails_naming(r, "model-00002-of-00003.safetensors", "corrupt header")
    assert_fails_naming(r, "model-00002-of-00003.safetensors", "does not match SHA256SUMS")
    assert not [p for p in r.problems if p.check == "index"]  # not repeated per tensor


def test_forward_unavailable_is_a_note(converted, monkeypatch):
    """An architecture the numpy forward pass does not implement: said so, not counted as a failure."""
    src, dst = converted()
    monkeypatch.setattr("streamfold.check.forward.SUPPORTED", ())
    r = streamfold.verify(src, dst, forward=True)
    assert r.ok and "forward pass supports" in r.forward["skipped"]
    assert any(n.startswith("forward pass not run") for n in r.notes)
    assert "forward pass not run" in r.summary()


def test_forward_that_cannot_run_fails(converted):
    """The forward pass needs a tensor the output lacks: a failure (besides the tensor check's)."""
    src, dst = converted()
    name = "model.layers.1.mlp.down_proj.weight"
    rewrite_shard(dst, span(dst, name).path.name, drop=name)
    r = streamfold.verify(src, dst, forward=True)
    assert_fails_naming(r, "logits", "could not run", name)
    assert_fails_naming(r, name, "missing")


def test_layernorm_bias_fold_via_rules(ckpts, tmp_path):
    """LayerNorm with a bias: consumer biases become b + W @ beta; verify checks them (and the
    unchanged LayerNorm-free parts), and catches a wrong bias."""
    L = "model.layers.{n}."
    rules = {"sc2": {"model_types": ["starcoder2"], "folds": [
        {"norm": L + "input_layernorm", "into": [L + "self_attn.q_proj", L + "self_attn.k_proj",
                                                 L + "self_attn.v_proj"]},
        {"norm": L + "post_attention_layernorm", "into": [L + "mlp.c_fc"]}]}}
    src = ckpts("starcoder2")
    dst = convert(src, tmp_path / "out", rules=rules)
    plan = streamfold.load_plan(src, rules=rules)[2]
    assert plan.count("bias") == 8
    r = streamfold.verify(src, dst, rules=rules)
    assert r.ok, r.summary()
    assert r.counts["biases"] == 8 and r.counts["identity"] == 8  # 4 weights + 4 biases of LayerNorms
    name = "model.layers.1.mlp.c_fc.bias"
    overwrite(dst, name, read_tensor(src, name))  # the unfolded bias
    r = streamfold.verify(src, dst, rules=rules)
    assert_fails_naming(r, name, "is not the source bias + model.layers.1.mlp.c_fc.weight @ "
                                 "model.layers.1.post_attention_layernorm.bias")
    name = "model.layers.0.input_layernorm.bias"
    overwrite(dst, name, read_tensor(src, name))
    r = streamfold.verify(src, dst, rules=rules)
    assert_fails_naming(r, name, "not the identity (0)")


def test_forward_flags_a_broken_model(converted):
    """Gross damage shows in the logits too: the folded MLPs replaced by the unfolded source."""
    src, dst = converted()
    for n in ("model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight",
              "model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight"):
        overwrite(dst, n, read_tensor(src, n))
    r = streamfold.verify(src, dst, forward=True)
    assert_fails_naming(r, "logits", "cosine to the source's logits")
    assert r.forward["min_cosine_required"] == 0.99 and r.folds_rounded
