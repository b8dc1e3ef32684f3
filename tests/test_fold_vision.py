"""``--fold-vision``: vision towers folded with rules derived from transformers' computation, proven in
stock transformers on prompts with a generated image.

Each family with tower rules (``vision_folds`` in its data file; ``tools/derive_rules.py`` derives them
by tracing a prompt with an image) is built tiny with random norm scales far from the identity (folded
norms; ``1 + w`` where the tower measures it), saved bf16 and sharded with every norm in a shard of its
own (so no norm sits beside its consumers), converted with ``fold_vision=True`` and loaded in stock
transformers. The oracle is the source model's own logits in transformers: float32-merged outputs within
1e-5 relative on a text prompt and on a prompt with an image, bf16-merged cosine >= 0.9999, strict mode
too (or its measured refusal). The fast suite runs one family (``FAST``), compat float32, plus a control
that the image prompt sees the tower's folds; ``--full`` runs every family in every mode.

The refusals (a family without tower rules, a composed wrapper, an already-folded checkpoint whose
tower was not folded) need no torch.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import streamfold
from streamfold.cli import main as cli_main
from streamfold.rules.loader import FAMILIES
from streamfold.rules.vision import has_vision

from .representatives import matrix

SAMPLE = Path(streamfold.__file__).parent / "sample"
MAX_REL_F32 = 1e-5
MIN_COS_BF16 = 0.9999
FAST = "qwen2_5_vl"
VISION_TYPES = sorted(m for fam in FAMILIES.values() if has_vision(fam) for m in fam["model_types"])
OUTPUTS = {"compat_f32": ("compat", "float32"), "compat_bf16": ("compat", "source"),
           "strict_f32": ("strict", "float32"), "strict_bf16": ("strict", "source")}


def _fam(mt: str) -> dict:
    return next(f for f in FAMILIES.values() if mt in f["model_types"])


def _rel(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _min_cos(a, b) -> float:
    import torch
    a, b = a.reshape(-1, a.shape[-1]).double(), b.reshape(-1, b.shape[-1]).double()
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).min().item()


class VCase:
    """One model type: its bf16 source (tower norms far from identity), conversions, reference logits."""

    def __init__(self, mt: str, root: Path, outputs: dict):
        from streamfold.derive import pixels, tiny
        self.mt, self.fam, self.tiny = mt, _fam(mt), tiny
        model = tiny.build_tiny_model(mt, seed=0)
        # norms the conversion keeps get mild scales (conditioning for bf16, as tests/test_families.py);
        # every folded one, the tower's included, keeps its far-from-identity scale
        probe = tiny.save_sharded(model, root / "probe", dtype="bfloat16")
        _, _, probe_plan = streamfold.load_plan(probe, fold_vision=True)
        of_saved = {v: k for k, v in model.tiny_saved_names.items()}
        tiny.calm_norms(model, {of_saved[n.weight][: -len(".weight")] for n in probe_plan.kept}, seed=0)
        shutil.rmtree(probe)
        self.src = tiny.save_sharded(model, root / "src", dtype="bfloat16")
        self.norm_info = {model.tiny_saved_names[m + ".weight"]: i for m, i in model.tiny_norms.items()}
        del model
        ref, _ = tiny.load_pretrained(self.src, mt)
        self.text, self.images = tiny.example_inputs(ref), pixels.image_inputs(ref)
        self.ref_text, self.ref_images = tiny.forward_logits(ref, self.text), tiny.forward_logits(ref, self.images)
        del ref
        _, _, self.plan = streamfold.load_plan(self.src, fold_vision=True)
        self.outs, self.strict_error = {}, None
        for key, (mode, merged) in outputs.items():
            if mode == "strict" and self.fam.get("strict_refused"):
                with pytest.raises(streamfold.StreamfoldError) as ei:
                    streamfold.convert(self.src, root / key, mode=mode, merged_dtype=merged, fold_vision=True)
                self.strict_error = str(ei.value)
                continue
            streamfold.convert(self.src, root / key, mode=mode, merged_dtype=merged, fold_vision=True)
            self.outs[key] = root / key

    def logits(self, out: Path):
        model, info = self.tiny.load_pretrained(out, self.mt)
        return self.tiny.forward_logits(model, self.text), self.tiny.forward_logits(model, self.images), info


@pytest.fixture(scope="module")
def fast_case(tmp_path_factory):
    pytest.importorskip("torch")
    return VCase(FAST, tmp_path_factory.mktemp("fast"), {"compat_f32": OUTPUTS["compat_f32"]})


def test_tower_folded_exactly_in_transformers_text_and_image(fast_case):
    c = fast_case
    tower = [n for n in c.plan.folded if n.tower]
    assert tower and any(n.weight.startswith("visual.blocks.") for n in tower)
    out = c.outs["compat_f32"]
    assert json.loads((out / "config.json").read_text())["flashnorm_vision"] is True
    text, images, info = c.logits(out)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    assert _rel(text, c.ref_text) <= MAX_REL_F32
    assert _rel(images, c.ref_images) <= MAX_REL_F32
    report = streamfold.verify(c.src, out)
    assert report.ok, report.problems[:3]
    card = (out / "README.md").read_text()
    assert "config.flashnorm_vision" in card and "Vision tower folded too" in card


def test_inspect_json_says_what_the_tower_folds(fast_case, capsys):
    c = fast_case
    assert cli_main(["inspect", str(c.src), "--fold-vision", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["fold_vision"]
    tower = [n for n in c.plan.norms if n.tower]
    assert got["folded"] == sum(n.status == "fold" for n in tower) > 0
    assert got["kept"] == sum(n.status == "keep" for n in tower)
    assert {g["norm"] for g in got["norms"]} >= {"visual.blocks.*.norm1", "visual.blocks.*.norm2"}
    assert cli_main(["inspect", str(c.src), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fold_vision"] is None


def test_image_prompt_sees_the_tower_folds(fast_case):
    """Control: one tower norm put back to its source value (it now scales twice) moves the image
    prompt's logits and leaves the text prompt's alone: the image check can fail, the text one is blind."""
    from safetensors.torch import load_file, save_file
    import torch
    c = fast_case
    broken = c.outs["compat_f32"].parent / "broken"
    shutil.copytree(c.outs["compat_f32"], broken)
    name = next(n.weight for n in c.plan.folded if n.tower)
    shard = json.loads((broken / "model.safetensors.index.json").read_text())["weight_map"][name]
    folded, source = load_file(str(broken / shard)), load_file(str(c.src / shard))
    assert torch.all(folded[name] == 1) and torch.all((source[name].float() - 1).abs() >= 0.19)
    folded[name] = source[name]
    save_file(folded, str(broken / shard), metadata={"format": "pt"})
    text, images, _ = c.logits(broken)
    assert _rel(text, c.ref_text) <= MAX_REL_F32
    assert _rel(images, c.ref_images) > 1e-2


@pytest.fixture(scope="module", params=matrix(VISION_TYPES, lambda v: False))
def vcase(request, tmp_path_factory):
    pytest.importorskip("torch")
    return VCase(request.param, tmp_path_factory.mktemp(request.param), OUTPUTS)


def test_every_tower_family_in_every_mode(vcase):
    """Per family: the tower's traced norms fold, each in a shard apart from its consumers; compat and
    strict, float32 within 1e-5 on text and image prompts, bf16 cosine >= 0.9999; verify passes."""
    c = vcase
    tower = [n for n in c.plan.folded if n.tower]
    assert tower, c.mt
    wm = json.loads((c.src / "model.safetensors.index.json").read_text())["weight_map"]
    from safetensors.torch import load_file
    norms = load_file(str(c.src / c.tiny.NORM_SHARD))
    for n in tower:
        assert all(wm[x.weight] != wm[n.weight] for x in n.consumers), n.weight
        scale = norms[n.weight].double() + c.norm_info[n.weight].offset  # what the norm multiplies by
        assert (scale.abs() - 1).abs().min() >= 0.19, n.weight
    removed = sorted(x for n in c.plan.folded for x in (n.weight, n.bias) if x)
    for key, out in c.outs.items():
        mode, merged = OUTPUTS[key]
        text, images, info = c.logits(out)
        assert info["unexpected_keys"] == [], key
        assert (info["missing_keys"] == []) if mode == "compat" else len(info["missing_keys"]) == len(removed), key
        if merged == "float32":
            got = max(_rel(text, c.ref_text), _rel(images, c.ref_images))
            print(f"{c.mt} {key}: tower norms folded {len(tower)}, max rel err (text, image) {got:.2e}")  # -s
            assert _rel(text, c.ref_text) <= MAX_REL_F32, (key, _rel(text, c.ref_text))
            assert _rel(images, c.ref_images) <= MAX_REL_F32, (key, _rel(images, c.ref_images))
        else:
            got = min(_min_cos(text, c.ref_text), _min_cos(images, c.ref_images))
            print(f"{c.mt} {key}: min cosine (text, image) {got:.7f}")
            assert _min_cos(text, c.ref_text) >= MIN_COS_BF16, key
            assert _min_cos(images, c.ref_images) >= MIN_COS_BF16, key
        report = streamfold.verify(c.src, out)
        assert report.ok, (key, report.problems[:3])
    if c.fam.get("strict_refused"):
        assert c.strict_error and "strict mode is not exact" in c.strict_error


# -- refusals (no torch) ------------------------------------------------------------------------------------
def _refusal(capsys, argv) -> str:
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("streamfold: error: ") and "\n" not in err, err
    return err


def test_refused_for_a_family_without_tower_rules(tmp_path, capsys):
    err = _refusal(capsys, [str(SAMPLE), str(tmp_path / "out"), "--fold-vision"])
    assert "--fold-vision" in err and "no vision-tower rules" in err
    assert not (tmp_path / "out").exists()


def test_refused_for_a_composed_wrapper(tmp_path, capsys):
    src = tmp_path / "wrapper"
    shutil.copytree(SAMPLE, src)
    cfg = json.loads((src / "config.json").read_text())
    wrapped = {"model_type": "sf_test_wrapper", "text_config": {**cfg, "model_type": "llama"}}
    (src / "config.json").write_text(json.dumps(wrapped))
    err = _refusal(capsys, ["inspect", str(src), "--fold-vision"])
    assert "composed wrapper" in err and "sf_test_wrapper" in err


def test_refused_on_a_folded_checkpoint_whose_tower_was_not(fast_case, tmp_path, capsys):
    plain = tmp_path / "plain"
    streamfold.convert(fast_case.src, plain)  # language model folded, tower untouched
    assert "flashnorm_vision" not in json.loads((plain / "config.json").read_text())
    err = _refusal(capsys, [str(plain), str(tmp_path / "strict"), "--mode", "strict", "--fold-vision"])
    assert "whose vision tower was not folded" in err


def test_mode_changes_of_a_tower_folded_checkpoint(vcase, tmp_path):
    """compat -> strict -> compat of the tower-folded output: the flag carries over, every tower norm is
    recognised as folded under its own convention (SigLIP's ``w`` inside PaliGemma's ``1 + w`` family) and
    restored as its identity; logits on text and image prompts stay within 1e-5 of the source's."""
    c = vcase
    if c.fam.get("strict_refused"):
        pytest.skip(f"{c.mt}: strict mode refused ({c.fam['strict_refused'][:60]}...)")
    strict, back = tmp_path / "strict", tmp_path / "back"
    r1 = streamfold.convert(c.outs["compat_f32"], strict, mode="strict")
    r2 = streamfold.convert(strict, back, mode="compat")
    assert r1.mode_change == "compat -> strict" and r2.mode_change == "strict -> compat"
    for out in (strict, back):
        assert json.loads((out / "config.json").read_text())["flashnorm_vision"] is True
    text, images, info = c.logits(back)
    assert info["missing_keys"] == []
    assert _rel(text, c.ref_text) <= MAX_REL_F32 and _rel(images, c.ref_images) <= MAX_REL_F32
    with pytest.raises(streamfold.AlreadyFlashNorm):
        streamfold.convert(back, tmp_path / "again", fold_vision=True)


def test_refused_when_the_tower_rules_name_no_tensor(fast_case):
    """A checkpoint whose tower is spelled otherwise (or absent) is refused, not silently left unfolded."""
    from streamfold.planning.compose import resolve
    cfg = json.loads((fast_case.src / "config.json").read_text())
    names = json.loads((fast_case.src / "model.safetensors.index.json").read_text())["weight_map"]
    assert resolve(cfg, names, vision=True).fam["folds"]
    renamed = {("tower." + n[len("visual."):] if n.startswith("visual.") else n): s for n, s in names.items()}
    with pytest.raises(streamfold.StreamfoldError, match="no norm or consumer of qwen2_5_vl's vision-tower rules"):
        resolve(cfg, renamed, vision=True)


def test_verify_follows_the_flag(fast_case, tmp_path):
    """verify re-plans with the tower's rules when config.json says flashnorm_vision (or --fold-vision
    asks): without the flag the tower-folded output is not the plain plan, and the reverse."""
    c = fast_case
    noflag = tmp_path / "noflag"
    shutil.copytree(c.outs["compat_f32"], noflag)
    cfg = json.loads((noflag / "config.json").read_text())
    del cfg["flashnorm_vision"]
    (noflag / "config.json").write_text(json.dumps(cfg))
    assert not streamfold.verify(c.src, noflag).ok
    assert streamfold.verify(c.src, noflag, fold_vision=True).ok
    plain = tmp_path / "plain"
    streamfold.convert(c.src, plain, merged_dtype="float32")
    assert streamfold.verify(c.src, plain).ok
    assert not streamfold.verify(c.src, plain, fold_vision=True).ok


def test_patch_merger_folds_with_its_scale_tiled(fast_case):
    """Qwen2.5-VL's merger.ln_q normalizes each patch, then 4 patches are regrouped into one vector for
    merger.mlp.0: traced as a consumer with tile 4, the scale repeated 4 times along mlp.0's input (the
    logits check above covers it: a wrongly tiled scale moves the image prompt's logits)."""
    ln_q = next(n for n in fast_case.plan.norms if n.weight == "visual.merger.ln_q.weight")
    assert ln_q.status == "fold" and [(c.weight, c.tile) for c in ln_q.consumers] == [("visual.merger.mlp.0.weight", 4)]
    width = ln_q.scale.shape[0] // 4
    assert all((ln_q.scale[k * width:(k + 1) * width] == ln_q.scale[:width]).all() for k in range(4))


@pytest.mark.parametrize("tile", [0, 1.5, True])
def test_schema_refuses_a_bad_tile(tmp_path, tile):
    from streamfold.rules.schema import load_rules_file
    rules = {"model_types": ["x"], "folds": [{"norm": "a.norm", "into": [{"weight": "a.w", "axis": 1, "tile": tile}]}]}
    (tmp_path / "r.json").write_text(json.dumps(rules))
    with pytest.raises(streamfold.StreamfoldError, match="tile must be a whole number"):
        load_rules_file(tmp_path / "r.json")


def test_changing_the_flag_between_a_killed_run_and_its_rerun_starts_fresh(fast_case, tmp_path, capsys):
    """The resume fingerprint holds --fold-vision: a run killed (SIGKILL, as tests/test_resume.py) with
    the flag, re-run without it, says so in one line, rewrites every shard the killed run completed, and
    ends byte-identical to a run that never had the flag (the re-runs in-process: only the kill needs a
    child)."""
    import subprocess
    import sys
    from .test_resume import KILLER, _shard_ids, staging_path
    from .test_tasks import _env, _files
    dst = tmp_path / "out"
    r = subprocess.run([sys.executable, "-c", KILLER, "shards", "2", str(fast_case.src), str(dst), "--workers", "2",
                        "--fold-vision"], capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == -9, (r.returncode, r.stderr)
    before = _shard_ids(staging_path(dst))
    assert len(before) == 2
    capsys.readouterr()
    assert cli_main([str(fast_case.src), str(dst)]) == 0
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if "not resuming" in x]
    assert len(lines) == 1 and "option fold_vision changed (True -> False)" in lines[0], err
    assert "re-using" not in err
    after = _shard_ids(dst)
    assert all(after[s] != before[s] for s in before)  # rewritten
    ref = tmp_path / "ref" / "out"  # never interrupted, never with the flag (the card names DST's folder)
    assert cli_main([str(fast_case.src), str(ref)]) == 0
    assert _files(dst) == _files(ref)
    assert "flashnorm_vision" not in json.loads((dst / "config.json").read_text())


@pytest.mark.full
def test_gemma4_tower_norms_stay_when_its_linears_clip_their_input(tmp_path):
    """Gemma 4's vision linears can clamp their input (vision_config.use_clipped_linears): a norm's scale
    does not commute with a clamp, so the tower rules (derived under that variant too) fold nothing there."""
    pytest.importorskip("torch")
    from streamfold.derive import tiny
    cfg = tiny.tiny_config("gemma4", **{"vision_config.use_clipped_linears": True})
    src = tiny.save_sharded(tiny.build_tiny_model(config=cfg), tmp_path / "src", dtype="bfloat16")
    assert any(n.endswith("self_attn.q_proj.input_min") for n in json.loads(
        (src / "model.safetensors.index.json").read_text())["weight_map"])
    _, _, plan = streamfold.load_plan(src, fold_vision=True)
    tower = [n for n in plan.norms if n.tower and n.weight.startswith("model.vision_tower.")]
    assert tower and all(n.status == "keep" for n in tower)
    assert plan.folded  # the language model still folds
