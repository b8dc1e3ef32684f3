"""Already-FlashNorm checkpoints (issue 14): recognized, reported (exit 4), and converted between modes.

- streamfold's own outputs (compat and strict, with config.json flags) converted again write nothing and
  say so: ``AlreadyFlashNorm`` in the library, exit status 4 and one line on the command line;
- a flagless checkpoint whose foldable norms are ALL the identity (another tool's output, a hand-made one,
  an untrained model) is recognized from the values; one with only some identity norms converts normally;
- ``--mode`` changes the mode without touching a weight: compat -> strict equals a direct strict conversion
  of the original source tensor by tensor (bytes), strict -> compat equals a direct compat conversion
  (identity norms in the source norms' dtype, LayerNorm biases restored), and both load in stock transformers
  with the source model's logits (float32 merged: max relative error <= 1e-5; bf16 merged: cosine >= 0.9999)
  on Llama, Gemma (``1 + w``, identity zeros) and Phi (LayerNorm with bias, lm_head bias);
- ``--merged-dtype float32`` on a folded checkpoint is refused with the reason;
- ``inspect`` prints the FlashNorm state instead of a plan to fold again; the mode change's card does not
  stack on the source's; ``verify`` checks mode changes, restored norms included.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import streamfold
from streamfold.cli import main
from streamfold.core.errors import EXIT_ALREADY_FLASHNORM, AlreadyFlashNorm
from streamfold.core.reader import Checkpoint
from tests.factory import (build_checkpoint, load_model, logits, make_config, model_param_name, norm_tensor_names,
                           read_tensors)
from tests.factory import test_inputs as make_inputs  # (not collected as a test)

ROOT = Path(__file__).resolve().parents[1]
MAX_REL_F32 = 1e-5
MIN_COS_BF16 = 0.9999
DIRECT = {"compat": ("compat", "source"), "strict": ("strict", "source"),
          "compat_f32": ("compat", "float32"), "strict_f32": ("strict", "float32")}
# mode change output -> (direct output it starts from, target mode, direct output it must equal)
REMODE = {"c2s": ("compat", "strict", "strict"), "s2c": ("strict", "compat", "compat"),
          "c2s_f32": ("compat_f32", "strict", "strict_f32"), "s2c_f32": ("strict_f32", "compat", "compat_f32")}


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _min_cos(a, b):
    a, b = a.reshape(-1, a.shape[-1]).double(), b.reshape(-1, b.shape[-1]).double()
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).min().item()


def _raw_tensors(path) -> dict[str, tuple[str, tuple, bytes]]:
    ck = Checkpoint(path)
    try:
        out = {}
        for name, t in ck.tensors.items():
            with open(t.path, "rb") as f:
                f.seek(t.begin)
                out[name] = (t.dtype, t.shape, f.read(t.nbytes))
        return out
    finally:
        ck.close()


def _set_tensors(path: Path, values: dict[str, float]) -> None:
    """Overwrite tensors of a checkpoint folder in place with constants (shape and dtype kept)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if not set(values) & set(tensors):
            continue
        for k in set(values) & set(tensors):
            tensors[k] = torch.full_like(tensors[k], values[k])
        save_file(tensors, str(shard), metadata=meta)


def _identity_values(name: str, path: Path, skip: int = 0) -> dict[str, float]:
    """The identity value of every foldable norm tensor of factory arch ``name`` (all but ``skip`` of them)."""
    folded = [n for n in norm_tensor_names(name, path) if n.fold]
    out = {}
    for n in folded[skip:]:
        out[n.weight] = n.identity
        if n.bias:
            out[n.bias] = 0.0
    return out


def _drop_flags(path: Path) -> None:
    cfg = json.loads((path / "config.json").read_text())
    for k in ("flashnorm", "flashnorm_mode", "flashnorm_version"):
        cfg.pop(k, None)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))


class Case:
    """A bf16 factory source, its four direct conversions, the four mode changes of those, reference logits."""

    def __init__(self, name: str, root: Path):
        self.name, self.root = name, root
        self.src = build_checkpoint(name, root / "src", dtype="bfloat16", seed=0)
        self.out: dict[str, Path] = {}
        self.reports = {}
        for key, (mode, merged) in DIRECT.items():
            streamfold.convert(self.src, root / key, mode=mode, merged_dtype=merged, base_model="org/orig")
            self.out[key] = root / key
        for key, (start, mode, _) in REMODE.items():
            self.reports[key] = streamfold.convert(self.out[start], root / key, mode=mode, verify=True)
            self.out[key] = root / key
        self.inputs = make_inputs(name)
        self.ref = logits(self.src, self.inputs)
        self.folded = [n for n in norm_tensor_names(name, self.src) if n.fold]


_CASES: dict[str, Case] = {}


def _case(name: str, tmp_path_factory) -> Case:
    if name not in _CASES:
        _CASES[name] = Case(name, tmp_path_factory.mktemp(f"detect_{name}"))
    return _CASES[name]


@pytest.fixture(scope="module", params=["llama", "gemma", "phi"])
def case(request, tmp_path_factory):
    return _case(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return _case("llama", tmp_path_factory)


# -- mode changes -----------------------------------------------------------------------------------------
def test_mode_changes_equal_direct_conversions(case):
    """compat -> strict is the direct strict conversion, strict -> compat the direct compat one, tensor by
    tensor (name, dtype, shape, bytes): folded weights untouched, identity norms (and LayerNorm biases)
    restored in the source norms' dtype, even when the folded weights are float32."""
    for key, (start, mode, same_as) in REMODE.items():
        got, want = _raw_tensors(case.out[key]), _raw_tensors(case.out[same_as])
        assert sorted(got) == sorted(want), key
        for k in want:
            assert got[k] == want[k], f"{case.name} {key}: {k} differs from the direct {same_as} conversion"
        r = case.reports[key]
        assert r.verification.ok, r.verification.summary()
        assert r.mode == mode and r.mode_change == f"{DIRECT[start][0]} -> {mode}"
        assert r.tensors_folded == 0 and r.biases_updated == 0
        n_norm_tensors = sum(1 + bool(n.bias) for n in case.folded)
        assert (r.tensors_dropped, r.tensors_restored) == ((n_norm_tensors, 0) if mode == "strict"
                                                           else (0, n_norm_tensors))
        cfg = json.loads((case.out[key] / "config.json").read_text())
        src_cfg = json.loads((case.src / "config.json").read_text())
        assert (cfg["flashnorm"], cfg["flashnorm_mode"], cfg["flashnorm_version"]) == (True, mode, 1)
        assert {k: v for k, v in cfg.items() if not k.startswith("flashnorm")} == src_cfg
        index = json.loads((case.out[key] / "model.safetensors.index.json").read_text())["weight_map"]
        assert sorted(index) == sorted(got)


def test_mode_changes_load_with_source_logits(case):
    removed = sorted(model_param_name(case.name, x) for n in case.folded for x in (n.weight, n.bias) if x)
    for key, (start, mode, _) in REMODE.items():
        model, info = load_model(case.out[key], with_info=True)
        assert info["unexpected_keys"] == [] and info["mismatched_keys"] == [], key
        assert info["missing_keys"] == (removed if mode == "strict" else []), key
        got = logits(model, case.inputs)
        del model
        if start.endswith("_f32"):
            assert _rel(got, case.ref) <= MAX_REL_F32, f"{case.name} {key}: max rel err {_rel(got, case.ref):.2e}"
        else:
            assert _min_cos(got, case.ref) >= MIN_COS_BF16, f"{case.name} {key}: cosine {_min_cos(got, case.ref)}"


def test_converting_again_writes_nothing(case, tmp_path):
    """Every FlashNorm output (direct or mode-changed) converted again with no --mode, or its own mode."""
    for key, path in case.out.items():
        mode = json.loads((path / "config.json").read_text())["flashnorm_mode"]
        for ask in (None, mode):
            with pytest.raises(AlreadyFlashNorm) as ei:
                streamfold.convert(path, tmp_path / "again", mode=ask)
            assert not (tmp_path / "again").exists()
            st = ei.value.state
            assert st.folded and st.mode == mode and st.declared and st.flags["flashnorm_version"] == 1
            assert len(st.norms) == len(case.folded)
            assert {n.status for n in st.norms} == {"identity" if mode == "compat" else "absent"}
            msg = str(ei.value)
            assert "\n" not in msg and "already a FlashNorm checkpoint" in msg and f"{mode} mode" in msg


def test_float32_merged_refused(case, tmp_path):
    for key in ("compat", "strict_f32"):
        with pytest.raises(streamfold.StreamfoldError) as ei:
            streamfold.convert(case.out[key], tmp_path / "x", merged_dtype="float32")
        assert not isinstance(ei.value, AlreadyFlashNorm)
        msg = str(ei.value)
        assert "--merged-dtype float32 cannot be applied" in msg and "already a FlashNorm checkpoint" in msg
        assert ("float32 already" if key.endswith("_f32") else "rounded to BF16") in msg
        assert not (tmp_path / "x").exists()


# -- flagless checkpoints ----------------------------------------------------------------------------------
def test_flagless_identity_recognized(case, tmp_path):
    """Another tool's output: every foldable norm the identity (Gemma: zeros), no config flags."""
    path = tmp_path / "flagless"
    shutil.copytree(case.src, path)
    _set_tensors(path, _identity_values(case.name, path))
    with pytest.raises(AlreadyFlashNorm) as ei:
        streamfold.convert(path, tmp_path / "out")
    st = ei.value.state
    assert (st.mode, st.declared, st.flags) == ("compat", False, {})
    assert "no config.json flags" in str(ei.value) and not (tmp_path / "out").exists()
    # ... and converts to strict: the identity norms are dropped, flags added, the model unchanged
    r = streamfold.convert(path, tmp_path / "strict", mode="strict", verify=True)
    assert r.verification.ok and r.mode_change == "compat -> strict"
    cfg = json.loads((tmp_path / "strict" / "config.json").read_text())
    assert (cfg["flashnorm"], cfg["flashnorm_mode"], cfg["flashnorm_version"]) == (True, "strict", 1)
    inputs = make_inputs(case.name)
    assert _rel(logits(tmp_path / "strict", inputs), logits(path, inputs)) <= MAX_REL_F32


def test_flagless_strict_recognized(llama, tmp_path):
    """A strict checkpoint without flags was an error naming a mismatched config; now it is recognized."""
    path = tmp_path / "strict"
    shutil.copytree(llama.out["strict"], path)
    _drop_flags(path)
    with pytest.raises(AlreadyFlashNorm) as ei:
        streamfold.convert(path, tmp_path / "out")
    assert ei.value.state.mode == "strict" and "every foldable norm is absent" in str(ei.value)


def test_misnamed_norms_are_not_taken_for_strict(llama, tmp_path):
    """No norm where the rules expect one but norm-like tensors under other names: a naming mismatch (the
    planner's error), not a strict FlashNorm checkpoint."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    path = tmp_path / "renamed"
    shutil.copytree(llama.src, path)
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())

    def rename(k):
        return re.sub(r"(input_layernorm|post_attention_layernorm)\.", r"\1_v2.", k).replace("model.norm.", "model.final_norm.")
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            meta, tensors = f.metadata(), {rename(k): f.get_tensor(k) for k in f.keys()}
        save_file(tensors, str(shard), metadata=meta)
    index["weight_map"] = {rename(k): v for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    with pytest.raises(streamfold.StreamfoldError) as ei:
        streamfold.convert(path, tmp_path / "out")
    assert not isinstance(ei.value, AlreadyFlashNorm) and "no tensor matches a norm rule" in str(ei.value)


def test_mixed_identity_and_absent(llama, tmp_path):
    """Some folded norms present as identity, the others absent: already folded ("mixed"); --mode compat
    restores the absent one and gives the direct compat conversion."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    path = tmp_path / "mixed"
    shutil.copytree(llama.out["compat"], path)
    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = path / index["weight_map"].pop("model.norm.weight")
    with safe_open(str(shard), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys() if k != "model.norm.weight"}
    save_file(tensors, str(shard), metadata=meta)
    index_path.write_text(json.dumps(index))
    with pytest.raises(AlreadyFlashNorm) as ei:
        streamfold.convert(path, tmp_path / "out")
    assert ei.value.state.mode == "mixed" and ei.value.state.count("absent") == 1
    r = streamfold.convert(path, tmp_path / "out", mode="compat", verify=True)
    assert r.verification.ok and r.tensors_restored == 1
    assert _raw_tensors(tmp_path / "out") == _raw_tensors(llama.out["compat"])


def test_partially_identity_converts_normally(llama, tmp_path):
    path = tmp_path / "partial"
    shutil.copytree(llama.src, path)
    _set_tensors(path, _identity_values("llama", path, skip=1))  # all but the first foldable norm
    r = streamfold.convert(path, tmp_path / "out", verify=True)
    assert r.mode_change is None and r.norms_folded == len(llama.folded) and r.verification.ok
    assert r.tensors_folded > 0


def test_untrained_model_is_a_noop(tmp_path):
    """A freshly initialized model has identity norms (ones): folding is a no-op, reported as such."""
    import transformers
    model = transformers.AutoModelForCausalLM.from_config(make_config("llama"))
    model.save_pretrained(tmp_path / "fresh")
    with pytest.raises(AlreadyFlashNorm) as ei:
        streamfold.convert(tmp_path / "fresh", tmp_path / "out")
    assert ei.value.state.mode == "compat" and not ei.value.state.declared


def test_flags_with_learned_norms_refused(llama, tmp_path):
    """config.json says FlashNorm but a norm is not the identity (trained after conversion?): refused, named."""
    path = tmp_path / "lying"
    shutil.copytree(llama.src, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(flashnorm=True, flashnorm_mode="compat", flashnorm_version=1)
    (path / "config.json").write_text(json.dumps(cfg))
    for mode in (None, "strict"):
        with pytest.raises(streamfold.StreamfoldError) as ei:
            streamfold.convert(path, tmp_path / "out", mode=mode)
        assert "is not the identity" in str(ei.value) and "model.layers.0.input_layernorm.weight" in str(ei.value)


# -- command line, inspect, card, verify ---------------------------------------------------------------
def test_cli_exit_status_and_json(llama, tmp_path, capsys):
    assert main([str(llama.out["compat"]), str(tmp_path / "out")]) == EXIT_ALREADY_FLASHNORM == 4
    cap = capsys.readouterr()
    assert cap.out == "" and cap.err.count("\n") == 1 and cap.err.startswith("streamfold: ")
    assert main([str(llama.out["strict"]), str(tmp_path / "out"), "--json"]) == 4
    d = json.loads(capsys.readouterr().out)
    assert d["already_flashnorm"] is True and d["mode"] == "strict" and d["version"] == 1
    assert main([str(llama.out["compat"]), str(tmp_path / "out"), "--merged-dtype", "float32"]) == 2
    assert "cannot be applied" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    r = subprocess.run([sys.executable, "-m", "streamfold", llama.out["strict"], tmp_path / "out", "-q"],
                       capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert r.returncode == 4 and "already a FlashNorm checkpoint" in r.stderr, r.stderr
    assert "exit status" in subprocess.run([sys.executable, "-m", "streamfold", "convert", "--help"],
                                           capture_output=True, text=True, env={"PYTHONPATH": str(ROOT)}).stdout


def test_inspect_prints_state(llama, tmp_path, capsys):
    flagless = tmp_path / "flagless"
    shutil.copytree(llama.out["compat"], flagless)
    _drop_flags(flagless)
    for key, path, mode, status in (("compat", llama.out["compat"], "compat", "IDENTITY"),
                                    ("strict", llama.out["strict"], "strict", "ABSENT"),
                                    ("flagless", flagless, "compat", "IDENTITY")):
        text = streamfold.inspect(path).describe()
        assert f"FlashNorm checkpoint: {mode} mode" in text, key
        assert ("flashnorm_version 1" in text) == (key != "flagless"), key
        assert re.search(rf"{status}\s+model\.layers\.\{{n\}}\.input_layernorm\s+x2", text), text
        assert "FOLD" not in text and "nothing to fold" in text
        assert main(["inspect", str(path), "--json"]) == 0
        d = json.loads(capsys.readouterr().out)
        assert d["flashnorm"]["flashnorm"] is True and d["flashnorm"]["mode"] == mode and d["mode_change"] is None
        assert {e["status"] for e in d["flashnorm"]["each_norm"]} == {status.lower()}
    text = streamfold.inspect(llama.out["strict"], mode="compat").describe()
    assert "mode change strict -> compat" in text and "5 restored as identity" in text
    plain = streamfold.inspect(llama.src).describe()  # a normal checkpoint still gets its fold plan
    assert "FOLD" in plain and "FlashNorm checkpoint" not in plain


def test_mode_change_card_does_not_stack(llama):
    for key in ("c2s", "s2c"):
        card = (llama.out[key] / "README.md").read_text()
        front = card.split("---")[1]
        assert card.startswith("---\n") and card.count("\n---\n") == 1
        assert "base_model: org/orig" in front and f"flashnorm-{REMODE[key][1]}" in front
        assert f"flashnorm-{DIRECT[REMODE[key][0]][0]}" not in front
        assert "# orig-FlashNorm\n" in card and "FlashNorm-FlashNorm" not in card
        assert card.count("## What's different") == 1 and "byte for byte" in card


def test_verify_catches_a_wrong_restored_norm(llama, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(llama.out["s2c"], bad)
    _set_tensors(bad, {"model.layers.1.input_layernorm.weight": 2.0})
    v = streamfold.verify(llama.out["strict"], bad)
    assert not v.ok and any("model.layers.1.input_layernorm.weight" in str(p) and "identity" in str(p)
                            for p in v.problems)
    assert streamfold.verify(llama.out["strict"], llama.out["s2c"]).ok


def test_restored_norm_values(case):
    """Independently of the direct conversion: restored norms hold the identity of the family's convention."""
    t = read_tensors(case.out["s2c_f32"], [x for n in case.folded for x in (n.weight, n.bias) if x])
    for n in case.folded:
        assert t[n.weight].dtype == torch.bfloat16 and bool((t[n.weight] == n.identity).all()), n.weight
        if n.bias:
            assert bool((t[n.bias] == 0).all()), n.bias


def test_benchmarks_readme_has_no_machine_paths():
    text = (ROOT / "benchmarks" / "README.md").read_text()
    assert not re.search(r"(?<![\w.])/(home|tmp|work|root|Users|mnt|scratch|data)/", text), \
        re.search(r"(?<![\w.])/(home|tmp|work|root|Users|mnt|scratch|data)/\S*", text).group(0)
    assert not re.search(r"\bcd /", text)
