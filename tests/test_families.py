"""Every built-in family is exact in stock transformers, driven by the family data alone.

For each model type of each built-in family (``streamfold.rules.schema.FAMILIES``: the data files) a tiny
random model comes from ``streamfold.derive.tiny`` (norm scales far from the identity, ``1 + w`` norms
too, LayerNorm and linear biases non-zero), saved in bf16 with every norm in a shard of its own. It is
converted in compat and strict mode with source and float32 merged dtypes, and:

- the plan accounts for exactly the norms found numerically in the model (no unknown norm); the report
  folds exactly the norms the family's fold rules name (the untied head only when untied) and keeps the
  ones its keep rules name;
- every tensor that is neither a folded norm nor a consumer is byte-identical (so are vision/audio
  towers of multimodal wrappers, none of whose tensors may be touched); folded norms are the identity
  of their measured convention (compat) or absent (strict, where transformers reports exactly those as
  missing);
- stock transformers loads every output (its Auto class): float32-merged logits within 1e-5 relative,
  bf16-merged cosine >= 0.9999 at every position, greedy tokens identical for a few steps;
- families with ``strict_refused`` refuse strict with a one-line reason.

Models are built, saved and loaded under ``standin.towers``: Gemma 3n's timm vision tower (not buildable
here) is a small stand-in module; its language model, audio tower and embedders are transformers' own.

Adding a family is a data file: its model types are picked up here automatically. Set
``SF_FAMILY_NUMBERS=path.json`` to record the measured errors per model type.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
tiny = pytest.importorskip("streamfold.derive.tiny")
pixels = pytest.importorskip("streamfold.derive.pixels")

import streamfold  # noqa: E402
from streamfold.core.reader import Checkpoint  # noqa: E402
from streamfold.rules.patterns import config_get, looks_like_norm  # noqa: E402
from streamfold.rules.schema import FAMILIES  # noqa: E402
from tests.representatives import FAMILY_TYPES, matrix  # noqa: E402

MAX_REL_F32 = 1e-5
MIN_COS_BF16 = 0.9999
GREEDY_STEPS = 4
OUTPUTS = {"compat": ("compat", "source"), "strict": ("strict", "source"),
           "compat_f32": ("compat", "float32"), "strict_f32": ("strict", "float32")}
# Tensor-name fragments of non-language towers in multimodal wrappers (left byte-identical).
TOWER_PARTS = ("vision", "visual", "audio", "multi_modal_projector", "embed_vision", "embed_audio")

# Kept norms left far from the identity (not calmed), with why: DeepSeek-V3.2's sparse-attention indexer
# picks the top index_topk keys by a score its k_norm feeds; calmed, the tiny model's top-k margins become
# small enough that bf16 rounding of the folded MLA projections flips a selection (min cosine 0.981).
KEEP_FAR = {"deepseek_v32": ("indexer.k_norm",)}

# Config variants tested besides each type's tiny default (id "type+name"): switches of published
# checkpoints under which more norms fold.  With the defaults these families' linears have no biases, so
# their LayerNorm-with-bias norms stay whole and no folding path would be proven in transformers.
CONFIG_VARIANTS: dict[str, dict[str, dict]] = {
    "phimoe": {"bias": {"attention_bias": True, "lm_head_bias": True}},  # Phi-3.5-MoE's config
    "nemotron": {"bias": {"attention_bias": True, "mlp_bias": True}},
    # StableLM 2 (with use_parallel_residual the same norm also feeds the bias-free MLP: stays whole)
    "stablelm": {"qkvbias": {"use_qkv_bias": True}},
}


# Multimodal wrappers derived with several language model types (``text_model_types``): each other
# type is one more case (id "type+text:<text model type>"), checked like the default one.
TEXT_VARIANT_PREFIX = "text:"

# Issue 20's vision-language wrappers: LLaVA is the fast representative of a wrapper traced and checked
# with an image (and of text_model_types); the rest of that matrix runs under --full.
VLM_FAST = "llava"


def _model_types() -> list[str]:
    types = sorted({mt for fam in FAMILIES.values() if not (fam.get("refused") or fam.get("nothing_to_fold"))
                    for mt in fam["model_types"]})  # refusals: tests/test_scope.py
    types += sorted(f"{mt}+{v}" for mt, vs in CONFIG_VARIANTS.items() for v in vs)
    return types + sorted(f"{mt}+{TEXT_VARIANT_PREFIX}{t}" for fam in FAMILIES.values() for mt in fam["model_types"]
                          for t in fam.get("text_model_types", [])[1:])


def _family(mt: str) -> dict:
    return next(f for f in FAMILIES.values() if mt in f["model_types"])


def _raw(ckpt: Checkpoint, name: str) -> bytes:
    t = ckpt.tensors[name]
    with open(t.path, "rb") as f:
        f.seek(t.begin)
        return f.read(t.nbytes)


def _rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _min_cos(a, b) -> float:
    a, b = a.reshape(-1, a.shape[-1]).double(), b.reshape(-1, b.shape[-1]).double()
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).min().item()


def _load(path: Path, model_type: str):
    return tiny.load_pretrained(path, model_type)


class Case:
    """One model type: its bf16 source, the four conversions (or the strict refusal), reference outputs."""

    def __init__(self, case_id: str, root: Path):
        mt, _, variant = case_id.partition("+")
        self.mt, self.id, self.fam = mt, case_id, _family(mt)
        if variant.startswith(TEXT_VARIANT_PREFIX):
            overrides = {"text_config.model_type": variant[len(TEXT_VARIANT_PREFIX):]}
        else:
            overrides = CONFIG_VARIANTS[mt][variant] if variant else {}
        model = tiny.build_tiny_model(config=tiny.tiny_config(mt, **overrides), seed=0)
        self.norm_info = model.tiny_norms  # module -> NormInfo, found and classified numerically
        # Norms the conversion keeps get mild random scales (tiny.calm_norms: conditioning, so that bf16
        # rounding of the folded weights is not amplified by a saturated softmax); folded ones stay far.
        # Which ones are kept comes from a first save's plan; that the plan keeps exactly what the rules
        # declare is test_report_folds_what_the_rules_declare, and a norm wrongly planned as folded keeps
        # its far scale.
        probe = tiny.save_sharded(model, root / "probe", dtype="bfloat16")
        _, _, probe_plan = streamfold.load_plan(probe)
        of_saved = {v: k for k, v in model.tiny_saved_names.items()}
        self.calmed = {of_saved[n.weight][: -len(".weight")] for n in probe_plan.kept if n.weight in of_saved} - \
            {m for m in model.tiny_norms if any(f in m for f in KEEP_FAR.get(mt, ()))}
        tiny.calm_norms(model, self.calmed, seed=0)
        shutil.rmtree(probe)
        self.src = tiny.save_sharded(model, root / "src", dtype="bfloat16")
        wm = json.loads((self.src / tiny.INDEX_NAME).read_text())["weight_map"]
        self.norm_tensors = {k for k, s in wm.items() if s == tiny.NORM_SHARD}
        # saved name -> in-memory parameter name (what from_pretrained's loading info reports)
        self.param_of = {v: k for k, v in model.tiny_saved_names.items()}
        self.aliases: dict[str, list[str]] = {}  # saved name -> every parameter name of it (tied norms: Zamba)
        for k, v in model.tiny_saved_names.items():
            self.aliases.setdefault(v, []).append(k)
        del model
        self.outs: dict[str, Path] = {}
        self.reports: dict[str, streamfold.ConversionReport] = {}
        self.strict_error: str | None = None
        for key, (mode, merged) in OUTPUTS.items():
            if mode == "strict" and self.fam.get("strict_refused"):
                with pytest.raises(streamfold.StreamfoldError) as ei:
                    streamfold.convert(self.src, root / key, mode=mode, merged_dtype=merged)
                self.strict_error = str(ei.value)
                assert not (root / key).exists()
                continue
            self.reports[key] = streamfold.convert(self.src, root / key, mode=mode, merged_dtype=merged)
            self.outs[key] = root / key
        ref_model, _ = _load(self.src, mt)
        self.inputs = tiny.example_inputs(ref_model)
        self.ref = tiny.forward_logits(ref_model, self.inputs)
        self.ref_greedy = tiny.greedy_tokens(ref_model, self.inputs, GREEDY_STEPS)
        self.images = pixels.image_inputs(ref_model)  # a prompt with a generated image (wrappers), else None
        self.ref_images = tiny.forward_logits(ref_model, self.images) if self.images is not None else None
        _, _, self.plan = streamfold.load_plan(self.src)


_CASES: dict[str, Case] = {}
NUMBERS: dict[str, dict] = {}


@pytest.fixture(scope="module", params=matrix(_model_types(), FAMILY_TYPES | {VLM_FAST}))
def case(request, tmp_path_factory):
    mt = request.param
    if mt not in _CASES:
        _CASES.clear()  # one model type's files and models at a time
        _CASES[mt] = Case(mt, tmp_path_factory.mktemp(mt))
    return _CASES[mt]


def _record(mt: str, **kw) -> None:
    NUMBERS.setdefault(mt, {}).update(kw)
    out = os.environ.get("SF_FAMILY_NUMBERS")
    if out:
        Path(out).write_text(json.dumps(NUMBERS, indent=1, sort_keys=True))


# -- which norms --------------------------------------------------------------------------------------
def _rx(pattern: str) -> re.Pattern:
    parts = re.split(r"(\{[a-z]+\})", pattern)
    return re.compile("^" + "".join(r"\d+" if re.fullmatch(r"\{[a-z]+\}", p) else re.escape(p) for p in parts) + "$")


def _spellings(fam: dict, pattern: str) -> list[str]:
    """A rules pattern as each of the family's layouts spells it (the longest matching prefix wins)."""
    out = [pattern]
    for lay in fam.get("layouts", []):
        key = max((k for k in lay if pattern.startswith(k)), key=len, default=None)
        if key is not None:
            out.append(lay[key] + pattern[len(key):])
    return out


def _matching(fam: dict, pattern: str, names) -> set[str]:
    rxs = [_rx(p + ".weight") for p in _spellings(fam, pattern)]
    return {n for n in names if any(r.match(n) for r in rxs)}


def _unnamed_in_kept_towers(case) -> set[str]:
    """Norm tensors inside a subtree kept whole by prefix (``keep under``) whose names do not read as a norm
    (Ernie 4.5 VL's resampler ``spatial_linear.3``, a LayerNorm in a Sequential): the planner lists a tower's
    norms by name only, and never touches any tensor there (byte-identical: test_tensors_untouched_except_folds)."""
    prefixes = [p for k in case.fam.get("keep", []) if "under" in k for p in _spellings(case.fam, k["under"])]
    return {n for n in case.norm_tensors if not looks_like_norm(n) and any(n.startswith(p) for p in prefixes)}


def _named_in_kept_towers(case) -> set[str]:
    """The converse: tensors a kept tower's plan lists by name that are not numerically norms (Emu3's VQ model
    ``norm1`` is a BatchNorm3d, in eval mode a fixed affine map); kept, so byte-identical like the rest."""
    prefixes = [p for k in case.fam.get("keep", []) if "under" in k for p in _spellings(case.fam, k["under"])]
    planned = {x for n in case.plan.kept for x in (n.weight, n.bias) if x}
    return {n for n in planned - case.norm_tensors if any(n.startswith(p) for p in prefixes)}


def test_plan_covers_exactly_the_numerically_found_norms(case):
    planned = {x for n in case.plan.norms for x in (n.weight, n.bias) if x}
    assert case.plan.unknown_norms == []
    planned -= _named_in_kept_towers(case)
    assert planned == case.norm_tensors - _unnamed_in_kept_towers(case), (f"planned but not a norm: {sorted(planned - case.norm_tensors)[:4]}; "
                                          f"norms not planned: {sorted(case.norm_tensors - planned)[:4]}")


def test_report_folds_what_the_rules_declare(case):
    """Folded norm tensors == those matched by the family's fold rules (minus a tied head and rules whose
    ``when`` does not hold); kept == the rest, each matched by a keep rule or a tied head."""
    fam, plan = case.fam, case.plan
    cfg = json.loads((case.src / "config.json").read_text())
    defaults = fam.get("defaults", {})
    weights = {n for n in case.norm_tensors - _unnamed_in_kept_towers(case) if n.endswith(".weight")}
    declared, heads = set(), set()
    for rule in fam["folds"]:
        ok = all(config_get(cfg, k, defaults.get(k)) in v for k, v in rule.get("when", {}).items())
        hit = _matching(fam, rule["norm"], weights)
        if rule.get("untied_head") and plan.tied:
            heads |= hit
        elif ok:
            declared |= hit
    folded = {n.weight for n in plan.folded}
    if case.id != case.mt and TEXT_VARIANT_PREFIX not in case.id:  # the point of CONFIG_VARIANTS: a LayerNorm
        # with bias folds (W @ beta into biases)
        assert any(n.bias for n in plan.folded), f"{case.id}: no LayerNorm with bias folded"
    # a declared LayerNorm-with-bias fold stays when a consumer has no bias to absorb W @ beta
    bias_kept = {n.weight for n in plan.kept if n.bias and "LayerNorm bias" in n.reason}
    assert folded == declared - bias_kept, f"{sorted(folded ^ (declared - bias_kept))[:6]}"
    kept_declared = heads.copy()
    for k in fam.get("keep", []):
        if "under" in k:
            kept_declared |= {w for w in weights if any(w.startswith(p) for p in _spellings(fam, k["under"]))}
        else:
            kept_declared |= _matching(fam, k["norm"], weights)
    kept = {n.weight for n in plan.kept} - _named_in_kept_towers(case)
    assert kept == weights - folded
    assert kept <= kept_declared | bias_kept, f"kept without a keep rule: {sorted(kept - kept_declared)[:6]}"
    for key, rep in case.reports.items():
        assert rep.norms_folded == len(plan.folded) and rep.norms_kept == len(plan.kept), key
        # the report spells rule patterns in the CLI's one notation: layers.{n}.x -> layers.*.x
        assert {g["norm"] for g in rep.groups if g["status"] == "fold"} == \
            {re.sub(r"\{[a-z]+\}", "*", n.rule) for n in plan.folded}
    if fam.get("strict_refused"):
        assert "strict mode is not exact" in case.strict_error and "--mode compat" in case.strict_error
        assert "\n" not in case.strict_error
    else:
        assert case.strict_error is None


def test_measured_convention_matches_the_rules(case):
    """Each folded norm's rule offset (``w`` vs ``1 + w``) is the one measured on the module."""
    fam_offset = case.fam.get("offset", 0)
    for n in case.plan.folded:
        module = case.param_of[n.weight][: -len(".weight")]
        got = n.offset if n.offset is not None else fam_offset
        assert got == case.norm_info[module].offset, f"{n.weight}: rules say offset {got}, measured " \
                                                     f"{case.norm_info[module].offset}"


# -- tensors --------------------------------------------------------------------------------------------
def test_tensors_untouched_except_folds(case):
    norm_t, consumers = set(), set()
    for n in case.plan.folded:
        norm_t |= {x for x in (n.weight, n.bias) if x}
        for c in n.consumers:
            consumers.add(c.weight)
            if n.bias is not None and c.bias:
                consumers.add(c.bias)
    src = Checkpoint(case.src)
    towers = {t for t in src.tensors if any(p in t for p in TOWER_PARTS)}
    assert not towers & (norm_t | consumers), f"tower tensors changed: {sorted(towers & (norm_t | consumers))[:4]}"
    # a wrapper's kept subtrees (vision tower) are really in the checkpoint: the byte checks below cover them
    for k in case.fam.get("keep", []):
        if "under" in k:
            assert any(t.startswith(p) for t in src.tensors for p in _spellings(case.fam, k["under"])), k["under"]
    mods = {n.weight: case.norm_info[case.param_of[n.weight][: -len(".weight")]] for n in case.plan.folded}
    try:
        for key, out_dir in case.outs.items():
            mode = OUTPUTS[key][0]
            out = Checkpoint(out_dir)
            try:
                want = set(src.tensors) - (norm_t if mode == "strict" else set())
                assert set(out.tensors) == want, key
                for name in want - norm_t - consumers:
                    assert _raw(out, name) == _raw(src, name), f"{key}: {name} changed"
                    assert out.tensors[name].dtype == src.tensors[name].dtype
                if mode == "compat":
                    from safetensors.torch import load_file
                    vals = {}
                    for s in tiny.SHARD_NAMES:
                        vals.update(load_file(str(out_dir / s)))
                    for n in case.plan.folded:
                        ident = 1.0 - mods[n.weight].offset
                        assert torch.all(vals[n.weight].float() == ident), f"{key}: {n.weight} is not identity"
                        assert out.tensors[n.weight].dtype == src.tensors[n.weight].dtype
                        if n.bias:
                            assert torch.all(vals[n.bias] == 0), f"{key}: {n.bias}"
            finally:
                out.close()
    finally:
        src.close()


# -- stock transformers -----------------------------------------------------------------------------------
def test_logits_and_greedy_in_transformers(case):
    removed = sorted(p for n in case.plan.folded for x in (n.weight, n.bias) if x for p in case.aliases[x])
    rel, cos = {}, {}
    for key, out_dir in sorted(case.outs.items(), key=lambda kv: OUTPUTS[kv[0]][1] != "float32"):
        mode, merged = OUTPUTS[key]
        model, info = _load(out_dir, case.mt)
        assert info["unexpected_keys"] == [] and info["mismatched_keys"] == [], key
        assert info["missing_keys"] == (removed if mode == "strict" else []), key
        got = tiny.forward_logits(model, case.inputs)
        if merged == "float32":
            rel[key] = _rel(got, case.ref)
            assert rel[key] <= MAX_REL_F32, f"{key}: max rel err {rel[key]:.2e}"
            assert torch.equal(tiny.greedy_tokens(model, case.inputs, GREEDY_STEPS), case.ref_greedy), key
        else:
            cos[key] = _min_cos(got, case.ref)
        del model
    _record(case.id, max_rel_f32=max(rel.values()), min_cos_bf16=min(cos.values()),
            folded=len(case.plan.folded), kept=len(case.plan.kept))
    worst = min(cos.values())
    assert worst >= MIN_COS_BF16, f"bf16-merged cosine {worst:.6f}"


@pytest.mark.only_for(set(pixels.PIXELS))
def test_image_prompt_logits_in_transformers(case):
    """Multimodal wrappers on a prompt with a generated image (``pixels.image_inputs``): the language model
    sees the image features (Mllama's cross-attention layers run only then); same bounds as text."""
    if case.images is None:
        pytest.skip(f"{case.mt}: no pixel inputs (not a vision-language wrapper of pixels.PIXELS)")
    rel, cos = {}, {}
    for key, out_dir in sorted(case.outs.items()):
        model, _ = _load(out_dir, case.mt)
        got = tiny.forward_logits(model, case.images)
        if OUTPUTS[key][1] == "float32":
            rel[key] = _rel(got, case.ref_images)
        else:
            cos[key] = _min_cos(got, case.ref_images)
        del model
    _record(case.id, image_max_rel_f32=max(rel.values()), image_min_cos_bf16=min(cos.values()))
    assert max(rel.values()) <= MAX_REL_F32, rel
    assert min(cos.values()) >= MIN_COS_BF16, cos


# -- tiny.py itself ------------------------------------------------------------------------------------------
# Conventions stated by the issue and FLASHNORM.md (hand-written: Gemma 4 is plain w, Gemma 1-3,
# Qwen3-Next and Qwen3.5 are 1 + w), checked against what tiny.py measures.
CONVENTIONS = {"gemma4_text": 0, "gemma": 1, "gemma2": 1, "gemma3_text": 1, "qwen3_next": 1, "qwen3_5_text": 1,
               "llama": 0, "nemotron": 1}


@pytest.mark.parametrize("mt", sorted(CONVENTIONS))
def test_tiny_measures_the_norm_convention(mt):
    model = tiny.build_tiny_model(mt)
    decoder = {k: v for k, v in model.tiny_norms.items() if "layers.0.input_layernorm" in k}
    assert decoder and all(v.offset == CONVENTIONS[mt] for v in decoder.values()), decoder


def test_tiny_models_are_deterministic_far_from_identity_and_sharded(tmp_path):
    a, b = tiny.build_tiny_model("qwen3_next", seed=3), tiny.build_tiny_model("qwen3_next", seed=3)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["model.norm.weight"], tiny.build_tiny_model("qwen3_next", seed=4).state_dict()["model.norm.weight"])
    kinds = set(a.config.layer_types)
    assert kinds == {"linear_attention", "full_attention"}
    mods = dict(a.named_modules())
    for name, info in a.tiny_norms.items():
        s = mods[name].weight.detach() + info.offset
        assert torch.all((s.abs() >= 0.5) & (s.abs() <= 2.0) & ((s.abs() - 1).abs() >= 0.2)), name
    out = tiny.save_sharded(a, tmp_path / "ck")
    wm = json.loads((out / tiny.INDEX_NAME).read_text())["weight_map"]
    norms = {k for k, s in wm.items() if s == tiny.NORM_SHARD}
    assert norms == {f"{n}.weight" for n in a.tiny_norms}
    rest = [s for k, s in sorted(wm.items()) if k not in norms]
    assert rest == [tiny.SHARD_NAMES[1 + i % 2] for i in range(len(rest))]


def test_layernorm_biases_and_linear_biases_nonzero():
    model = tiny.build_tiny_model("gpt_neox")
    for name, p in model.named_parameters():
        if name.endswith("bias"):
            assert torch.all(p != 0), name


@pytest.mark.parametrize("mt,kinds", [("lfm2", {"conv", "full_attention"}),
                                      ("granitemoehybrid", {"linear_attention", "full_attention"}),  # mamba
                                      ("minimax", {"linear_attention", "full_attention"}),
                                      ("gemma3_text", {"sliding_attention", "full_attention"}),
                                      ("qwen3_5_text", {"linear_attention", "full_attention"})])
def test_hybrids_have_every_layer_kind(mt, kinds):
    assert set(tiny.tiny_config(mt).layer_types) == kinds


def test_granitemoehybrid_builds_mamba_and_attention_layers():
    layers = tiny.build_tiny_model("granitemoehybrid").model.layers
    assert [getattr(layer, "mamba", None) is not None for layer in layers] == [True, False, True]
    assert getattr(layers[1], "self_attn", None) is not None
