"""Checkpoints in the other tensor-name layouts transformers loads convert exactly, in their own layout.

``save_pretrained`` writes one spelling of a model's tensor names; transformers' loader also accepts
others, which published checkpoints use. Each case re-saves a tiny random model (norm scales far from the
identity, ``1 + w`` norms too, norms in a shard of their own) under one such layout:

- a bare base model: Llama without ``model.`` (untied, ``lm_head`` beside it; and tied, exactly the names
  ``model.model.save_pretrained`` writes), GPT-2 without ``transformer.``;
- a text model under a multimodal wrapper's prefix: Qwen3.5 text under ``model.language_model.`` (its
  conversion mapping's ``PrefixChange``);
- a legacy rename of the conversion mapping: Mixtral in transformers' in-memory names (fused
  ``mlp.experts.gate_up_proj [E, 2I, H]``, ``mlp.gate``) where ``save_pretrained`` writes per-expert
  ``block_sparse_moe.experts.N.w1/w3``.

For each: stock transformers loads the re-saved source completely with the same logits as the
``save_pretrained`` spelling (the layout is one the loader accepts); streamfold plans it with the family's
data (same norms folded as under the default spelling, the layout named in the plan), writes it back with
the same tensor names, and transformers loads the output: float32-merged logits within 1e-5 relative
(compat and strict), bf16-merged cosine >= 0.9999; ``verify`` passes.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
tiny = pytest.importorskip("streamfold.derive.tiny")

import streamfold  # noqa: E402
from streamfold.derive.layouts import respell, save_memory_names  # noqa: E402
from streamfold.derive.names import all_saved_names  # noqa: E402
from streamfold.rules.layout import spell  # noqa: E402
from streamfold.rules.schema import family_for  # noqa: E402

MAX_REL_F32 = 1e-5
MIN_COS_BF16 = 0.9999

# case id -> (model_type, config overrides, how the source is spelled, prefix map, words the plan's layout names)
CASES = {
    "llama-bare": ("llama", {"tie_word_embeddings": False}, "prefix", {"model.": ""}, "model.* as (no prefix)"),
    "llama-bare-tied": ("llama", {"tie_word_embeddings": True}, "base", {"model.": ""}, "model.* as (no prefix)"),
    "gpt2-bare": ("gpt2", {}, "prefix", {"transformer.": ""}, "transformer.* as (no prefix)"),
    "qwen3_5_text-nested": ("qwen3_5_text", {"tie_word_embeddings": False}, "prefix",
                            {"model.": "model.language_model."}, "model.* as model.language_model.*"),
    "mixtral-fused": ("mixtral", {"tie_word_embeddings": False}, "memory", None, "in-memory names"),
}


def _names(folder: Path) -> list[str]:
    return sorted(json.loads((folder / tiny.INDEX_NAME).read_text())["weight_map"])


def _rel(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _min_cos(a, b) -> float:
    a, b = a.reshape(-1, a.shape[-1]).double(), b.reshape(-1, b.shape[-1]).double()
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).min().item()


class Case:
    """One layout: the default-spelled and the re-spelled source, reference logits, conversions."""

    def __init__(self, cid: str, root: Path):
        mt, overrides, how, lay, self.words = CASES[cid]
        self.mt, self.fam = mt, family_for(mt)[1]
        model = tiny.build_tiny_model(config=tiny.tiny_config(mt, **overrides), seed=0)
        # kept norms get mild scales (as tests/test_families.py does: conditioning of the bf16 check)
        probe = tiny.save_sharded(model, root / "probe", dtype="bfloat16")
        _, _, probe_plan = streamfold.load_plan(probe)
        of_saved = {v: k for k, v in model.tiny_saved_names.items()}
        tiny.calm_norms(model, {of_saved[n.weight][: -len(".weight")] for n in probe_plan.kept}, seed=0)
        self.default = tiny.save_sharded(model, root / "default", dtype="bfloat16")
        if how == "memory":
            norms = {n + s for n in model.tiny_norms for s in (".weight", ".bias")}
            self.src = save_memory_names(model, root / "src", norms)
        else:
            self.src = respell(self.default, root / "src", lambda k: spell(k, lay))
        if how == "base":  # exactly what the bare base model's save_pretrained writes
            assert _names(self.src) == all_saved_names(model.model)
        del model
        ref_model, _ = tiny.load_pretrained(self.default, mt)
        self.inputs = tiny.example_inputs(ref_model)
        self.ref = tiny.forward_logits(ref_model, self.inputs)
        del ref_model
        _, _, self.default_plan = streamfold.load_plan(self.default)
        _, _, self.plan = streamfold.load_plan(self.src)
        self.outs = {}
        for mode, merged in (("compat", "float32"), ("strict", "float32"), ("compat", "source")):
            if mode == "strict" and self.fam.get("strict_refused"):
                continue
            out = root / f"{mode}_{merged}"
            streamfold.convert(self.src, out, mode=mode, merged_dtype=merged)
            self.outs[mode, merged] = out


@pytest.fixture(scope="module", params=[pytest.param(c, marks=() if c == "llama-bare" else pytest.mark.full)
                                        for c in CASES])
def case(request, tmp_path_factory):
    return Case(request.param, tmp_path_factory.mktemp(request.param))


def test_transformers_loads_the_layout_as_saved(case):
    """The re-spelled source is a layout the loader accepts: complete, and the same model."""
    assert _names(case.src) != _names(case.default)
    model, info = tiny.load_pretrained(case.src, case.mt)
    assert not info.get("missing_keys") and not info.get("unexpected_keys"), info
    assert torch.equal(tiny.forward_logits(model, case.inputs), case.ref)


def test_plan_folds_the_same_norms_under_the_layout(case):
    assert case.plan.layout is not None and case.words in case.plan.layout, case.plan.layout
    assert case.words in case.plan.describe()
    assert len(case.plan.folded) == len(case.default_plan.folded) > 0
    assert len(case.plan.kept) == len(case.default_plan.kept)
    assert case.plan.unknown_norms == []
    names = set(_names(case.src))
    assert all(n.weight in names and all(c.weight in names for c in n.consumers) for n in case.plan.folded)


def test_output_keeps_the_layout_and_is_exact_in_transformers(case):
    src_names = _names(case.src)
    dropped = {x for n in case.plan.folded for x in (n.weight, n.bias) if x}
    for (mode, merged), out in case.outs.items():
        want = src_names if mode == "compat" else sorted(set(src_names) - dropped)
        assert _names(out) == want, (mode, merged)
        model, info = tiny.load_pretrained(out, case.mt)
        assert not info.get("unexpected_keys"), info
        got = tiny.forward_logits(model, case.inputs)
        if merged == "float32":
            assert _rel(got, case.ref) <= MAX_REL_F32, (mode, _rel(got, case.ref))
        else:
            assert _min_cos(got, case.ref) >= MIN_COS_BF16, (mode, _min_cos(got, case.ref))
        assert torch.equal(got.argmax(-1), case.ref.argmax(-1)) or merged == "source"


def test_verify_passes_in_the_layout(case):
    report = streamfold.verify(case.src, case.outs["compat", "source"])
    assert report.ok, report.summary()


def test_card_and_detect_follow_the_layout(case, tmp_path):
    out = case.outs["compat", "source"]
    assert case.words in (out / "README.md").read_text()
    with pytest.raises(streamfold.AlreadyFlashNorm) as ei:  # detect reads the same layout
        streamfold.convert(out, tmp_path / "again")
    assert ei.value.state.mode == "compat" and len(ei.value.state.norms) == len(case.plan.folded)


# -- every stored layout of every family (--full) ---------------------------------------------------------
# configs under which the family's LayerNorm biases fold (with the defaults its linears have no biases, so
# nothing would fold), as in tests/test_families.py
FOLDING_CONFIG = {"phimoe": {"attention_bias": True, "lm_head_bias": True},
                  "nemotron": {"attention_bias": True, "mlp_bias": True},
                  "falcon": {"bias": True}, "stablelm": {"use_qkv_bias": True}}


def _stored_spellings() -> list:
    from streamfold.rules.schema import FAMILIES
    out = []
    for name, fam in sorted(FAMILIES.items()):
        if fam.get("refused") or fam.get("nothing_to_fold"):
            continue
        mt = fam["model_types"][0]
        out += [pytest.param(mt, "layout", lay, id=f"{name}-layout{i}", marks=pytest.mark.full)
                for i, lay in enumerate(fam.get("layouts", [])) if lay]
        out += [pytest.param(mt, "form", form["name"], id=f"{name}-form{i}", marks=pytest.mark.full)
                for i, form in enumerate(fam.get("forms", []))]
    return out


@pytest.mark.parametrize("mt, kind, which", _stored_spellings())
def test_every_stored_layout_loads_and_converts_exactly(mt, kind, which, tmp_path):
    """Each layout and form a family's data records (derived by tools/derive_rules.py) on that family's
    tiny model: transformers loads it as the saved model, streamfold converts it in its own names, exact."""
    cfg = tiny.tiny_config(mt, tie_word_embeddings=False, **FOLDING_CONFIG.get(mt, {}))
    model = tiny.build_tiny_model(config=cfg, seed=0)
    default = tiny.save_sharded(model, tmp_path / "default", dtype="bfloat16")
    if kind == "form":
        src = save_memory_names(model, tmp_path / "src", {n + s for n in model.tiny_norms for s in (".weight", ".bias")})
    else:
        src = respell(default, tmp_path / "src", lambda k: spell(k, which))
    del model
    ref_model, _ = tiny.load_pretrained(default, mt)
    inputs = tiny.example_inputs(ref_model)
    ref = tiny.forward_logits(ref_model, inputs)
    del ref_model
    model, info = tiny.load_pretrained(src, mt)
    assert not info.get("missing_keys") and not info.get("unexpected_keys"), info
    assert torch.equal(tiny.forward_logits(model, inputs), ref)
    _, _, plan = streamfold.load_plan(src)
    assert plan.folded and plan.layout and not plan.unknown_norms
    streamfold.convert(src, tmp_path / "out", merged_dtype="float32")
    assert _names(tmp_path / "out") == _names(src)
    model, info = tiny.load_pretrained(tmp_path / "out", mt)
    assert not info.get("missing_keys") and not info.get("unexpected_keys"), info
    assert _rel(tiny.forward_logits(model, inputs), ref) <= MAX_REL_F32
