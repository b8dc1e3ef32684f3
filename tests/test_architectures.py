"""Every supported architecture converts exactly, in every mode, and the plan says what it did.

For each architecture of tests/factory.py (random bf16 model, norms far from the identity, LayerNorm and
linear biases non-zero, norms in a shard of their own), the checkpoint is converted in compat and strict
mode with merged tensors in the source dtype and in float32, and:

- the plan folds exactly the norms the factory marks ``fold`` (into exactly its consumers, along the
  right axis) and keeps every other norm, with a reason of the right kind; nothing is left unexplained;
- every tensor that is neither a folded norm nor a consumer (weight, or bias absorbing a LayerNorm bias)
  is byte-identical to the source; folded norms are the identity in compat and absent in strict; folded
  weights are ``W * (offset + g)`` rounded once (or not at all in float32); strict outputs equal compat
  outputs minus the removed norms;
- stock transformers loads every output, and float32 logits match the source's: max relative error
  <= 1e-5 with float32 merged tensors, cosine >= 0.9999 at every position with bf16 merged tensors;
  strict checkpoints report exactly the removed norms as missing;
- families whose strict mode is not exact (Nemotron) refuse strict mode with a one-line reason.

Plus: user rules files (JSON and TOML) for an unknown architecture, validated against the checkpoint,
and the refusal of quantized tensors without a quantization_config (FP8 block scales, GPTQ, AWQ, MXFP4).
"""
from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch

import streamfold
from streamfold.core.reader import Checkpoint
from tests.representatives import FACTORY_ARCHS, matrix
from tests.factory import (ARCHS, build_checkpoint, load_model, logits, model_param_name, norm_tensor_names,
                           read_tensors)
from tests.factory import test_inputs as make_inputs  # (not collected as a test)

MAX_REL_F32 = 1e-5
MIN_COS_BF16 = 0.9999
# output name -> (mode, merged dtype)
OUTPUTS = {"compat": ("compat", "source"), "strict": ("strict", "source"),
           "compat_f32": ("compat", "float32"), "strict_f32": ("strict", "float32")}


def _raw(ckpt: Checkpoint, name: str) -> bytes:
    t = ckpt.tensors[name]
    with open(t.path, "rb") as f:
        f.seek(t.begin)
        return f.read(t.nbytes)


class Case:
    """One architecture: its bf16 source, the factory's norm facts, the four conversions, reference logits."""

    def __init__(self, name: str, root: Path):
        self.name, self.spec = name, ARCHS[name]
        self.src = build_checkpoint(name, root / "src", dtype="bfloat16", seed=0)
        self.norms = norm_tensor_names(name, self.src)
        self.outs: dict[str, Path] = {}
        self.reports: dict[str, streamfold.ConversionReport] = {}
        self.strict_error: str | None = None
        for key, (mode, merged) in OUTPUTS.items():
            if mode == "strict" and not self.spec.strict_exact:
                with pytest.raises(streamfold.StreamfoldError) as ei:
                    streamfold.convert(self.src, root / key, mode=mode, merged_dtype=merged)
                self.strict_error = str(ei.value)
                assert not (root / key).exists()
                continue
            self.reports[key] = streamfold.convert(self.src, root / key, mode=mode, merged_dtype=merged)
            self.outs[key] = root / key
        self.inputs = make_inputs(name)
        self.ref = logits(self.src, self.inputs)

    @property
    def folded(self):
        return [n for n in self.norms if n.fold]

    @property
    def kept(self):
        return [n for n in self.norms if not n.fold]


_CASES: dict[str, Case] = {}


@pytest.fixture(scope="module", params=matrix(list(ARCHS), FACTORY_ARCHS))
def case(request, tmp_path_factory):
    name = request.param
    if name not in _CASES:
        _CASES.clear()  # one architecture's files and models at a time
        _CASES[name] = Case(name, tmp_path_factory.mktemp(name))
    return _CASES[name]


# -- the plan -------------------------------------------------------------------------------------------
_REASON_KINDS = {  # factory reason keyword -> what streamfold's reason must mention
    "tied lm_head": ("tied", "embedding"),
    "LayerNorm bias": ("LayerNorm bias",),
    "post-norm": ("post-norm",),
    "q/k": ("q/k",),
    "vision side": ("vision",),
    "average-pooled": ("vision",),
}


def test_plan_folds_exactly_the_foldable_norms(case):
    _, _, plan = streamfold.load_plan(case.src)
    assert plan.unknown_norms == []
    want = {n.weight: n for n in case.folded}
    got = {n.weight: n for n in plan.folded}
    assert set(got) == set(want), f"folded: {sorted(set(got) ^ set(want))}"
    src = Checkpoint(case.src)
    try:
        for w, n in want.items():
            p = got[w]
            assert p.bias == n.bias
            pc = {c.weight: (c.axis % len(src.tensors[c.weight].shape), c.bias) for c in p.consumers}
            fc = {c.weight: (c.input_axis, c.bias) for c in n.consumers}
            assert pc == fc, f"{w}: consumers differ"
    finally:
        src.close()
    kept = {n.weight: n for n in plan.kept}
    assert set(kept) == {n.weight for n in case.kept}
    for n in case.kept:
        reason = kept[n.weight].reason
        kinds = [v for k, v in _REASON_KINDS.items() if k in n.reason]
        assert kinds, f"factory reason not classified: {n.reason}"
        assert any(word in reason for word in kinds[0]), f"{n.weight}: {reason!r} vs factory {n.reason!r}"
    # the family's strict refusal is data, and matches transformers' behaviour
    from streamfold.rules.schema import family_for
    assert bool(family_for(case.spec.model_type)[1].get("strict_refused")) == (not case.spec.strict_exact)
    if not case.spec.strict_exact:
        assert "strict mode is not exact" in case.strict_error and "--mode compat" in case.strict_error
        assert "\n" not in case.strict_error


def test_report_lists_every_norm_family(case):
    for key, rep in case.reports.items():
        assert sum(g["count"] for g in rep.groups) == len(case.norms)
        assert rep.norms_folded == len(case.folded) and rep.norms_kept == len(case.kept)
        text = rep.summary()
        for g in rep.groups:
            assert g["norm"] in text
            if g["status"] == "keep":
                assert g["reason"] and g["reason"] in text
            else:
                assert g["consumers"] and all(c in text for c in g["consumers"])
        d = rep.to_dict()
        assert json.loads(json.dumps(d))["groups"] == rep.groups


# -- tensors --------------------------------------------------------------------------------------------
def _expected_changes(case):
    norm_t, weights, biases = set(), {}, {}
    for n in case.folded:
        norm_t |= {x for x in (n.weight, n.bias) if x}
        for c in n.consumers:
            weights[c.weight] = (n, c)
            if n.bias is not None:
                biases[c.bias] = (n, c)
    return norm_t, weights, biases


def _scale_of(n, src_t):
    g = src_t[n.weight].float()
    return g + 1.0 if n.convention == "1+w" else g


def _bcast(scale, ndim, axis):
    shape = [1] * ndim
    shape[axis] = -1
    return scale.reshape(shape)


def test_tensors_exactly_as_planned(case):
    norm_t, weights, biases = _expected_changes(case)
    src = Checkpoint(case.src)
    src_t = read_tensors(case.src)
    # DeepSeek keeps its routers float32 in a bf16 checkpoint: each consumer is folded in its own dtype
    mixed = {w for w in weights if src.tensors[w].dtype == "F32"}
    assert bool(mixed) == case.name.startswith("deepseek"), sorted(mixed)[:3]
    try:
        for key, out_dir in case.outs.items():
            mode, merged = OUTPUTS[key]
            out = Checkpoint(out_dir)
            out_t = read_tensors(out_dir)
            cfg = json.loads((out_dir / "config.json").read_text())
            assert cfg["flashnorm"] is True and cfg["flashnorm_mode"] == mode
            expect_names = set(src.tensors) - (norm_t if mode == "strict" else set())
            assert set(out.tensors) == expect_names
            for name in expect_names:
                st, ot = src.tensors[name], out.tensors[name]
                assert ot.shape == st.shape and out.shard_of[name] == src.shard_of[name]
                if name in norm_t:  # compat: identity in the norm's own dtype
                    n = next(x for x in case.folded if name in (x.weight, x.bias))
                    ident = n.identity if name == n.weight else 0.0
                    assert ot.dtype == st.dtype
                    assert torch.all(out_t[name].float() == ident), name
                elif name in weights:
                    n, c = weights[name]
                    w = src_t[name]
                    want = w.float() * _bcast(_scale_of(n, src_t), w.dim(), c.input_axis)
                    if merged == "source":
                        want = want.to(w.dtype)
                    assert out_t[name].dtype == want.dtype
                    assert torch.equal(out_t[name], want), f"{key}: {name} is not W * g rounded once"
                elif name in biases:
                    n, c = biases[name]
                    b, w = src_t[name], src_t[c.weight]
                    want = b.double() + torch.tensordot(w.double(), src_t[n.bias].double(),
                                                        dims=([c.input_axis], [0]))
                    dt = torch.float32 if merged == "float32" and b.dtype == torch.bfloat16 else b.dtype
                    assert out_t[name].dtype == dt
                    rtol = 2 ** -8 if dt == torch.bfloat16 else 2 ** -23
                    torch.testing.assert_close(out_t[name].double(), want, rtol=rtol, atol=1e-6)
                else:
                    assert ot.dtype == st.dtype and _raw(out, name) == _raw(src, name), f"{key}: {name} changed"
            out.close()
            rep = streamfold.verify(case.src, out_dir)  # the torch-free verifier agrees
            assert rep.ok, rep.summary()
        for key in ("strict", "strict_f32"):  # strict == compat without the folded norms, byte for byte
            if key not in case.outs:
                continue
            s, c = Checkpoint(case.outs[key]), Checkpoint(case.outs[key.replace("strict", "compat")])
            assert all(_raw(s, k) == _raw(c, k) for k in s.tensors)
            s.close()
            c.close()
    finally:
        src.close()


# -- logits in stock transformers ------------------------------------------------------------------------
def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _min_cos(a, b):
    a, b = a.reshape(-1, a.shape[-1]).double(), b.reshape(-1, b.shape[-1]).double()
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).min().item()


def test_logits_match_in_transformers(case):
    removed = sorted(model_param_name(case.name, x) for n in case.folded for x in (n.weight, n.bias) if x)
    for key, out_dir in case.outs.items():
        mode, merged = OUTPUTS[key]
        model, info = load_model(out_dir, with_info=True)
        assert info["unexpected_keys"] == [] and info["mismatched_keys"] == []
        assert info["missing_keys"] == (removed if mode == "strict" else []), key
        got = logits(model, case.inputs)
        del model
        if merged == "float32":
            assert _rel(got, case.ref) <= MAX_REL_F32, f"{key}: max rel err {_rel(got, case.ref):.2e}"
        else:
            assert _min_cos(got, case.ref) >= MIN_COS_BF16, f"{key}: cosine {_min_cos(got, case.ref):.6f}"
    if not case.folded:  # nothing foldable: the conversion must not have changed a tensor
        assert _rel(logits(case.outs["compat"], case.inputs), case.ref) == 0


def test_gemma3_in_memory_layout(tmp_path):
    """Gemma3 saved under transformers' in-memory names (model.language_model.*, model.vision_tower.*), a
    layout 5.24 loads as is: the language model is found and folded there, the vision side left alone."""
    from safetensors.torch import load_file, save_file
    src = build_checkpoint("gemma3", tmp_path / "legacy", dtype="bfloat16", seed=1)
    mem = tmp_path / "mem"
    mem.mkdir()

    def ren(k):
        for a, b in (("language_model.model.", "model.language_model."), ("vision_tower.", "model.vision_tower."),
                     ("multi_modal_projector.", "model.multi_modal_projector.")):
            if k.startswith(a):
                return b + k[len(a):]
        raise AssertionError(k)
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            save_file({ren(k): v for k, v in load_file(f).items()}, str(mem / f.name), metadata={"format": "pt"})
        elif f.name == "model.safetensors.index.json":
            idx = json.loads(f.read_text())
            idx["weight_map"] = {ren(k): v for k, v in idx["weight_map"].items()}
            (mem / f.name).write_text(json.dumps(idx))
        else:
            shutil.copy(f, mem / f.name)
    _, _, plan = streamfold.load_plan(mem)
    legacy = streamfold.load_plan(src)[2]
    assert [ren(n.weight) for n in legacy.folded] == [n.weight for n in plan.folded]
    assert [ren(n.weight) for n in legacy.kept] == [n.weight for n in plan.kept]
    assert plan.unknown_norms == [] and all(n.weight.startswith("model.language_model.") for n in plan.folded)
    inputs = make_inputs("gemma3")
    ref = logits(src, inputs)
    for mode in ("compat", "strict"):
        streamfold.convert(mem, tmp_path / mode, mode=mode, merged_dtype="float32")
        model, info = load_model(tmp_path / mode, with_info=True)
        assert info["unexpected_keys"] == []
        assert len(info["missing_keys"]) == (4 if mode == "strict" else 0)
        assert _rel(logits(model, inputs), ref) <= MAX_REL_F32


def test_phi_with_qk_layernorm(tmp_path):
    """Phi's optional per-head q/k LayerNorms (qk_layernorm=True; off in the factory's Phi-2) stay, with the
    reason, and the rest still folds exactly."""
    import transformers
    cfg = transformers.PhiConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=4, qk_layernorm=True,
                                 tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.PhiForCausalLM(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if "layernorm" in name:  # far from the identity, biases non-zero
                prm.copy_(torch.rand(prm.shape, generator=g) + (0.5 if name.endswith("weight") else -0.5))
    model.save_pretrained(tmp_path / "src")
    _, _, plan = streamfold.load_plan(tmp_path / "src")
    assert plan.unknown_norms == []
    kept = {n.weight: n.reason for n in plan.kept}
    assert set(kept) == {f"model.layers.{i}.self_attn.{x}_layernorm.weight" for i in range(2) for x in "qk"}
    assert all("q/k norm" in r for r in kept.values())
    assert {n.rule for n in plan.folded} == {"model.layers.{n}.input_layernorm", "model.final_layernorm"}
    streamfold.convert(tmp_path / "src", tmp_path / "out", merged_dtype="float32")
    ids = torch.randint(0, 128, (2, 10), generator=g)
    ref = logits(model, ids)
    assert _rel(logits(tmp_path / "out", ids), ref) <= MAX_REL_F32


def _header_tensors(shapes: dict[str, tuple]) -> dict:
    from streamfold.core.reader import TensorInfo
    out, off, p = {}, 0, Path("model.safetensors")
    for name, shape in shapes.items():  # DeepSeek routers are float32 in bf16 checkpoints
        dtype = "F32" if name.endswith(("mlp.gate.weight", "e_score_correction_bias")) else "BF16"
        n = (4 if dtype == "F32" else 2) * math.prod(shape)
        out[name] = TensorInfo(name, dtype, tuple(shape), p, off, off + n)
        off += n
    return out


def test_tie_default_when_config_is_silent():
    """A config without tie_word_embeddings is read with its model type's default (SmolLM3: tied)."""
    from streamfold.planning.planner import make_plan
    h = 8
    t = _header_tensors({"model.layers.0.input_layernorm.weight": (h,), "model.norm.weight": (h,),
                         **{f"model.layers.0.self_attn.{x}_proj.weight": (h, h) for x in "qkv"},
                         "model.layers.0.post_attention_layernorm.weight": (h,),
                         "model.layers.0.mlp.gate_proj.weight": (16, h), "model.layers.0.mlp.up_proj.weight": (16, h),
                         "lm_head.weight": (32, h)})
    heads = {}
    for mt in ("llama", "smollm3", "ernie4_5"):
        plan = make_plan({"model_type": mt}, t, None)
        heads[mt] = next(n.status for n in plan.norms if n.weight == "model.norm.weight")
    assert heads == {"llama": "fold", "smollm3": "keep", "ernie4_5": "keep"}
    plan = make_plan({"model_type": "smollm3", "tie_word_embeddings": False}, t, None)
    assert next(n.status for n in plan.norms if n.weight == "model.norm.weight") == "fold"


def test_deepseek_v3_mtp_layer_norms_are_kept_and_explained():
    """DeepSeek-V3's multi-token-prediction layer (model.layers.61 in the real checkpoint) has norms feeding
    a concatenation (enorm, hnorm -> eh_proj) and its own head; they stay, with the reason, and its
    ordinary decoder block folds like any other layer."""
    from streamfold.planning.planner import make_plan
    h, E = 8, 2
    L = "model.layers.1."
    shapes = {"model.norm.weight": (h,), "lm_head.weight": (32, h), L + "input_layernorm.weight": (h,),
              L + "self_attn.q_a_proj.weight": (4, h), L + "self_attn.q_a_layernorm.weight": (4,),
              L + "self_attn.q_b_proj.weight": (12, 4), L + "self_attn.kv_a_proj_with_mqa.weight": (6, h),
              L + "self_attn.kv_a_layernorm.weight": (4,), L + "self_attn.kv_b_proj.weight": (12, 4),
              L + "post_attention_layernorm.weight": (h,), L + "mlp.gate.weight": (E, h),
              L + "mlp.gate.e_score_correction_bias": (E,),
              **{L + f"mlp.experts.{e}.{p}_proj.weight": (4, h) for e in range(E) for p in ("gate", "up")},
              L + "mlp.shared_experts.gate_proj.weight": (4, h), L + "mlp.shared_experts.up_proj.weight": (4, h),
              L + "enorm.weight": (h,), L + "hnorm.weight": (h,), L + "eh_proj.weight": (h, 2 * h),
              L + "shared_head.norm.weight": (h,), L + "shared_head.head.weight": (32, h)}
    plan = make_plan({"model_type": "deepseek_v3", "tie_word_embeddings": False}, _header_tensors(shapes), None)
    assert plan.unknown_norms == []
    kept = {n.weight: n.reason for n in plan.kept}
    assert set(kept) == {L + "enorm.weight", L + "hnorm.weight", L + "shared_head.norm.weight"}
    assert all("multi-token-prediction" in r for r in kept.values())
    assert len(plan.folded) == 5 and plan.actions[L + "eh_proj.weight"].kind == "copy"
    assert plan.actions[L + "mlp.gate.weight"].out_dtype == "F32"
    assert plan.actions[L + "mlp.gate.e_score_correction_bias"].kind == "copy"



# Tensor names of the published Gemma 3n checkpoints (google/gemma-3n-E2B / -E4B, -it): as public readers
# of their model.safetensors.index.json spell them (ollama's and fairseq2's converters, an XLA loader
# checked against the real index). One decoder layer and a few tensors of each tower, hand-written here.
_G3N = "model.language_model."
_G3N_L = _G3N + "layers.0."
GEMMA3N_HUB_NAMES = {
    **{_G3N + k: s for k, s in {"embed_tokens.weight": (32, 8), "embed_tokens_per_layer.weight": (32, 4),
                               "per_layer_model_projection.weight": (4, 8), "per_layer_projection_norm.weight": (4,),
                               "norm.weight": (8,), "altup_projections.0.weight": (8, 8),
                               "altup_unembed_projections.0.weight": (8, 8)}.items()},
    **{_G3N_L + k: s for k, s in {
        "input_layernorm.weight": (8,), "self_attn.q_proj.weight": (8, 8), "self_attn.k_proj.weight": (4, 8),
        "self_attn.v_proj.weight": (4, 8), "self_attn.o_proj.weight": (8, 8), "self_attn.q_norm.weight": (4,),
        "self_attn.k_norm.weight": (4,), "post_attention_layernorm.weight": (8,),
        "pre_feedforward_layernorm.weight": (8,), "mlp.gate_proj.weight": (16, 8), "mlp.up_proj.weight": (16, 8),
        "mlp.down_proj.weight": (8, 16), "post_feedforward_layernorm.weight": (8,),
        "altup.correct_output_scale": (8,), "altup.correction_coefs.weight": (4, 4),
        "altup.prediction_coefs.weight": (16, 4), "altup.modality_router.weight": (4, 8),
        "altup.router_norm.weight": (8,), "laurel.linear_left.weight": (2, 8), "laurel.linear_right.weight": (8, 2),
        "laurel.post_laurel_norm.weight": (8,), "per_layer_input_gate.weight": (4, 8),
        "per_layer_projection.weight": (8, 4), "post_per_layer_input_norm.weight": (8,)}.items()},
    **{"model.vision_tower.timm_model." + k: s for k, s in {
        "conv_stem.conv.weight": (4, 3, 3, 3), "conv_stem.conv.bias": (4,), "conv_stem.bn.weight": (4,),
        "blocks.0.0.conv_exp.weight": (8, 4, 3, 3), "blocks.0.0.bn1.weight": (8,),
        "blocks.3.0.attn.key.norm.weight": (8,), "blocks.3.0.attn.query.proj.weight": (8, 8, 1, 1),
        "blocks.3.0.layer_scale.gamma": (8,), "msfa.ffn.pw_exp.conv.weight": (8, 8, 1, 1),
        "msfa.ffn.pw_exp.bn.weight": (8,), "msfa.norm.weight": (8,)}.items()},
    **{"model.audio_tower." + k: s for k, s in {
        "subsample_conv_projection.conv_0.conv.weight": (4, 1, 3, 3),
        "subsample_conv_projection.conv_0.norm.weight": (4,),
        "subsample_conv_projection.input_proj_linear.weight": (8, 16),
        "conformer.0.attention.pre_attn_norm.weight": (8,), "conformer.0.attention.attn.q_proj.weight": (8, 8),
        "conformer.0.attention.attn.per_dim_scale": (4,), "conformer.0.attention.post.weight": (8, 8),
        "conformer.0.attention.post_norm.weight": (8,), "conformer.0.ffw_layer_start.pre_layer_norm.weight": (8,),
        "conformer.0.ffw_layer_start.ffw_layer_1.weight": (16, 8),
        "conformer.0.ffw_layer_start.post_layer_norm.weight": (8,), "conformer.0.lconv1d.pre_layer_norm.weight": (8,),
        "conformer.0.lconv1d.linear_start.weight": (16, 8), "conformer.0.lconv1d.conv_norm.weight": (8,),
        "conformer.0.norm.weight": (8,)}.items()},
    **{f"model.embed_{m}.{k}": s for m in ("vision", "audio") for k, s in {
        "embedding.weight": (4, 8), "hard_embedding_norm.weight": (8,), "soft_embedding_norm.weight": (8,),
        "embedding_projection.weight": (8, 8)}.items()},
}


@pytest.mark.parametrize("untied", [False, True])
def test_gemma3n_family_matches_the_hub_checkpoint_names(untied):
    """The gemma3n data file (derived from save_pretrained of a tiny Gemma3nForConditionalGeneration) plans
    the published checkpoints' names: every norm accounted for, the two derived decoder folds (and the
    head's when untied), every vision/audio/embedder tensor copied."""
    from streamfold.planning.planner import make_plan
    shapes = dict(GEMMA3N_HUB_NAMES, **({"lm_head.weight": (32, 8)} if untied else {}))
    cfg = {"model_type": "gemma3n", "text_config": {"model_type": "gemma3n_text"}}
    if untied:
        cfg["text_config"]["tie_word_embeddings"] = False
    plan = make_plan(cfg, _header_tensors(shapes), None)
    assert plan.unknown_norms == []
    want = {_G3N_L + "pre_feedforward_layernorm.weight", _G3N_L + "altup.router_norm.weight"}
    assert {n.weight for n in plan.folded} == want | ({_G3N + "norm.weight"} if untied else set())
    towers = [t for t in shapes if t.startswith(("model.vision_tower.", "model.audio_tower.", "model.embed_"))]
    assert all(plan.actions[t].kind == "copy" for t in towers)
    kept = {n.weight for n in plan.kept}
    assert {"model.vision_tower.timm_model.msfa.norm.weight", "model.vision_tower.timm_model.blocks.3.0.attn.key.norm.weight",
            "model.audio_tower.conformer.0.lconv1d.conv_norm.weight", "model.embed_vision.hard_embedding_norm.weight",
            "model.embed_audio.soft_embedding_norm.weight"} <= kept

# -- user rules files ----------------------------------------------------------------------------------------
LLAMA_RULES = {
    "model_types": ["mymodel"],
    "folds": [
        {"norm": "model.layers.{n}.input_layernorm",
         "into": ["model.layers.{n}.self_attn.q_proj", "model.layers.{n}.self_attn.k_proj",
                  "model.layers.{n}.self_attn.v_proj"]},
        {"norm": "model.layers.{n}.post_attention_layernorm",
         "into": ["model.layers.{n}.mlp.gate_proj", {"weight": "model.layers.{n}.mlp.up_proj.weight", "axis": 1}]},
        {"norm": "model.norm", "into": ["lm_head"], "untied_head": True},
    ],
}
LLAMA_TOML = """
model_types = ["mymodel"]
offset = 0

[[folds]]
norm = "model.layers.{n}.input_layernorm"
into = ["model.layers.{n}.self_attn.q_proj", "model.layers.{n}.self_attn.k_proj", "model.layers.{n}.self_attn.v_proj"]

[[folds]]
norm = "model.layers.{n}.post_attention_layernorm"
into = ["model.layers.{n}.mlp.gate_proj", {weight = "model.layers.{n}.mlp.up_proj.weight", axis = 1}]

[[folds]]
norm = "model.norm"
into = ["lm_head"]
untied_head = true
"""


@pytest.fixture(scope="module")
def unknown_arch(tmp_path_factory):
    """The llama checkpoint relabelled as an architecture streamfold does not know, and llama's own output."""
    root = tmp_path_factory.mktemp("rules")
    src = build_checkpoint("llama", root / "llama", dtype="bfloat16", seed=3)
    ref = streamfold.convert(src, root / "llama_out")
    mine = root / "mymodel"
    shutil.copytree(src, mine)
    cfg = json.loads((mine / "config.json").read_text())
    cfg["model_type"] = "mymodel"
    (mine / "config.json").write_text(json.dumps(cfg))
    return mine, root / "llama_out", ref


def _same_tensors(a: Path, b: Path) -> bool:
    ca, cb = Checkpoint(a), Checkpoint(b)
    try:
        return set(ca.tensors) == set(cb.tensors) and all(_raw(ca, k) == _raw(cb, k) for k in ca.tensors)
    finally:
        ca.close()
        cb.close()


@pytest.mark.parametrize("fmt", ["json", "toml"])
def test_rules_file_for_unknown_architecture(unknown_arch, tmp_path, fmt):
    src, llama_out, ref = unknown_arch
    with pytest.raises(streamfold.StreamfoldError, match="unsupported model_type 'mymodel'.*--rules"):
        streamfold.convert(src, tmp_path / "refused")
    rules = tmp_path / f"mymodel.{fmt}"
    rules.write_text(json.dumps(LLAMA_RULES) if fmt == "json" else LLAMA_TOML)
    rep = streamfold.convert(src, tmp_path / "out", rules=rules)
    assert rep.family == "mymodel" and rep.norms_folded == ref.norms_folded == 5
    assert _same_tensors(tmp_path / "out", llama_out)


def _bad_rules(tmp_path, fams: dict) -> Path:
    p = tmp_path / "bad.json"
    p.write_text(json.dumps({"families": fams}))
    return p


@pytest.mark.parametrize("edit,needle", [
    # a consumer absent from the checkpoint
    (lambda r: r["folds"][0]["into"].append("model.layers.{n}.self_attn.qkv_proj"),
     r"consumer 'model\.layers\.0\.self_attn\.qkv_proj'"),
    # a norm pattern matching no tensor
    (lambda r: r["folds"].append({"norm": "model.layers.{n}.pre_feedforward_layernorm", "into": ["lm_head"]}),
     r"'model\.layers\.\{n\}\.pre_feedforward_layernorm\.weight'.*matches no tensor"),
    # a consumer whose input width is not the norm's (down_proj reads the MLP's 128 channels)
    (lambda r: r["folds"][1]["into"].append("model.layers.{n}.mlp.down_proj"),
     r"model\.layers\.0\.mlp\.down_proj\.weight.*\[64, 128\] has 128 inputs on axis -1 but norm .* has 64"),
    # a wrong axis for a consumer given explicitly
    (lambda r: r["folds"][1]["into"].__setitem__(1, {"weight": "model.layers.{n}.mlp.up_proj.weight", "axis": 0}),
     r"up_proj\.weight.*has 128 inputs on axis 0"),
    # one tensor claimed by two norms
    (lambda r: r["folds"][1]["into"].append("model.layers.{n}.self_attn.q_proj"), r"claimed by both"),
    # schema errors
    (lambda r: r.update(offset=2), r"\"offset\" must be 0"),
    (lambda r: r["folds"][0].update(when={"use_parallel_residual": True}), r"\"when\" maps config keys"),
    (lambda r: r.update(colour="blue"), r"unknown key 'colour'"),
])
def test_rules_file_validated_against_checkpoint(unknown_arch, tmp_path, edit, needle):
    src = unknown_arch[0]
    rules = json.loads(json.dumps(LLAMA_RULES))
    edit(rules)
    with pytest.raises(streamfold.StreamfoldError, match=needle) as ei:
        streamfold.convert(src, tmp_path / "out", rules=_bad_rules(tmp_path, {"mymodel": rules}))
    assert "\n" not in str(ei.value)
    assert not (tmp_path / "out").exists()


def test_layouts_and_strict_refusal_in_user_rules(unknown_arch, tmp_path):
    """The mechanisms the built-in families use are available to rules files too."""
    src = unknown_arch[0]
    rules = json.loads(json.dumps(LLAMA_RULES))
    # rules written for a nested language model; the identity layout is the one this checkpoint uses
    for f in rules["folds"]:
        f["norm"] = f["norm"].replace("model.", "model.language_model.")
        f["into"] = [c.replace("model.", "model.language_model.") if isinstance(c, str) else
                     {**c, "weight": c["weight"].replace("model.", "model.language_model.")} for c in f["into"]]
    rules["layouts"] = [{"model.language_model.": "text.model."}, {"model.language_model.": "model."}]
    rules["strict_refused"] = "this runtime fills missing norms with zeros"
    rep = streamfold.convert(src, tmp_path / "out", rules=_bad_rules(tmp_path, {"mymodel": rules}))
    assert rep.norms_folded == 5
    assert _same_tensors(tmp_path / "out", unknown_arch[1])
    with pytest.raises(streamfold.StreamfoldError, match=r"strict mode is not exact .*fills missing norms .*--mode compat"):
        streamfold.convert(src, tmp_path / "strict", mode="strict", rules=_bad_rules(tmp_path, {"mymodel": rules}))


# -- quantized checkpoints --------------------------------------------------------------------------------------
def _fabricate(d: Path, model_type: str, tensors: dict, quant: dict | None = None) -> Path:
    from safetensors.torch import save_file
    d.mkdir()
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    cfg = {"model_type": model_type, "hidden_size": 64, "tie_word_embeddings": False}
    if quant:
        cfg["quantization_config"] = quant
    (d / "config.json").write_text(json.dumps(cfg))
    return d


L0 = "model.layers.0."
_NORMS = {L0 + "input_layernorm.weight": torch.ones(64, dtype=torch.bfloat16),
          L0 + "post_attention_layernorm.weight": torch.ones(64, dtype=torch.bfloat16)}
QUANTIZED = {
    "fp8_block_scales": ("deepseek_v3", {
        L0 + "self_attn.q_a_proj.weight": torch.zeros(128, 64).to(torch.float8_e4m3fn),
        L0 + "self_attn.q_a_proj.weight_scale_inv": torch.ones(1, 1),
        **_NORMS}, {"quant_method": "fp8", "weight_block_size": [128, 128]},
        r"tensor 'model\.layers\.0\.self_attn\.q_a_proj\.weight' is quantized \(FP8 codes .*has no quantization_config"),
    "gptq": ("llama", {
        L0 + "self_attn.q_proj.qweight": torch.zeros(8, 64, dtype=torch.int32),
        L0 + "self_attn.q_proj.qzeros": torch.zeros(1, 8, dtype=torch.int32),
        L0 + "self_attn.q_proj.scales": torch.ones(1, 64, dtype=torch.float16),
        L0 + "self_attn.q_proj.g_idx": torch.zeros(64, dtype=torch.int32),
        **_NORMS}, {"quant_method": "gptq", "bits": 4, "group_size": 128},
        r"tensor 'model\.layers\.0\.self_attn\.q_proj\.qweight' is quantized \(INTN codes .*has no quantization_config"),
    "awq": ("qwen2", {
        L0 + "mlp.gate_proj.qweight": torch.zeros(64, 16, dtype=torch.int32),
        L0 + "mlp.gate_proj.qzeros": torch.zeros(1, 16, dtype=torch.int32),
        L0 + "mlp.gate_proj.scales": torch.ones(1, 128, dtype=torch.float16),
        **_NORMS}, {"quant_method": "awq", "bits": 4, "group_size": 64},
        r"tensor 'model\.layers\.0\.mlp\.gate_proj\.qweight' is quantized \(INTN codes .*has no quantization_config"),
    "mxfp4": ("gpt_oss", {
        L0 + "mlp.experts.gate_up_proj_blocks": torch.zeros(4, 64, 2, 16, dtype=torch.uint8),
        L0 + "mlp.experts.gate_up_proj_scales": torch.zeros(4, 64, 2, dtype=torch.uint8),
        L0 + "mlp.router.weight": torch.zeros(4, 64, dtype=torch.bfloat16),
        **_NORMS}, {"quant_method": "mxfp4"},
        r"tensor 'model\.layers\.0\.mlp\.experts\.gate_up_proj_blocks' is quantized \(MXFP4 codes .*has no quantization_config"),
    "fp8_no_scales": ("llama", {
        L0 + "self_attn.q_proj.weight": torch.zeros(64, 64).to(torch.float8_e5m2), **_NORMS},
        {"quant_method": "fbgemm_fp8"}, r"'model\.layers\.0\.self_attn\.q_proj\.weight' is F8_E5M2 but no scale tensor of a known layout"),
    "bitsandbytes": ("llama", {
        L0 + "self_attn.q_proj.weight": torch.zeros(2048, 1, dtype=torch.uint8),
        L0 + "self_attn.q_proj.weight.absmax": torch.ones(64),
        L0 + "self_attn.q_proj.weight.quant_map": torch.ones(16),
        **_NORMS}, {"quant_method": "bitsandbytes", "load_in_4bit": True},
        r"tensor 'model\.layers\.0\.self_attn\.q_proj\.weight' is quantized \(4-bit \(NF4/FP4\) codes .*has no quantization_config"),
}


@pytest.mark.parametrize("kind", list(QUANTIZED))
def test_quantized_tensors_without_quantization_config_refused(tmp_path, kind):
    """Quantized tensors with no quantization_config: no loader could read them, so neither does streamfold.
    (With a config, quantized sources fold partially: tests/test_quant_partial.py.)"""
    model_type, tensors, _quant, needle = QUANTIZED[kind]
    src = _fabricate(tmp_path / "src", model_type, tensors, None)
    with pytest.raises(streamfold.StreamfoldError) as ei:
        streamfold.convert(src, tmp_path / "out")
    msg = str(ei.value)
    assert re.search(needle, msg), msg
    assert "\n" not in msg
    assert not (tmp_path / "out").exists()
