"""Composed wrappers: an unknown multimodal model_type planned through its known language model.

A tiny real LLaVA (transformers' ``LlavaForConditionalGeneration``: CLIP vision tower, projector, Llama
language model; norm scales far from the identity, vision LayerNorm biases non-zero) is saved in both
spellings transformers loads: the legacy one ``save_pretrained`` writes (``language_model.model.*``,
``language_model.lm_head``, ``vision_tower.*``) and the in-memory one (``model.language_model.*``,
``lm_head``, ``model.vision_tower.*``), with ``config.json``'s ``model_type`` replaced by one no
streamfold family knows, while ``text_config.model_type`` stays ``llama``. streamfold plans the language
model with the llama family's rules under the prefix the names show and keeps everything else whole,
saying so in ``inspect`` and the card. transformers (the LLaVA class) loads each output: logits of a
text-only prompt and of a prompt with an image (pixel values generated here) match the source's:
float32-merged within 1e-5 relative, bf16-merged cosine >= 0.9999; the tower and projector are
byte-identical. A tiny Aya Vision (SigLIP tower, pixel-shuffle projector with its own LayerNorm, Cohere2
language model with a parallel block) is checked the same way. Names that do not tile are refused in one
line, exit 2.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
tiny = pytest.importorskip("streamfold.derive.tiny")

import streamfold  # noqa: E402
from streamfold.derive.layouts import save_memory_names  # noqa: E402

MAX_REL_F32 = 1e-5
MIN_COS_BF16 = 0.9999
WRAPPER = "sf_test_wrapper"  # a model_type no streamfold family has
VOCAB, IMAGE_TOKEN, SIDE, PATCH = 128, 127, 32, 8
N_IMAGE_TOKENS = (SIDE // PATCH) ** 2  # CLIP patches; the CLS feature is dropped ("default" strategy)


def _llava():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          image_size=SIDE, patch_size=PATCH, projection_dim=32)
    tc = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_index=IMAGE_TOKEN, tie_word_embeddings=False,
                      image_seq_length=N_IMAGE_TOKENS)
    return LlavaForConditionalGeneration, cfg


def _aya_vision():
    from transformers import AyaVisionConfig, AyaVisionForConditionalGeneration, Cohere2Config, SiglipVisionConfig
    vc = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=SIDE, patch_size=PATCH)
    tc = Cohere2Config(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, sliding_window=8,
                       layer_types=["sliding_attention", "full_attention"])
    cfg = AyaVisionConfig(vision_config=vc, text_config=tc, image_token_index=IMAGE_TOKEN, downsample_factor=2,
                          tie_word_embeddings=False, vision_feature_layer=-1)
    return AyaVisionForConditionalGeneration, cfg


# wrapper -> (builder, its model_type, text family, folded norm modules under the language model's prefix,
# image tokens per image)
WRAPPERS = {
    "llava": (_llava, "llava", "llama", ["layers.0.input_layernorm", "layers.0.post_attention_layernorm",
                                          "layers.1.input_layernorm", "layers.1.post_attention_layernorm", "norm"],
              N_IMAGE_TOKENS),
    # Aya Vision: SigLIP tower, pixel-shuffle projector with its own LayerNorm, Cohere2 (parallel block)
    "aya_vision": (_aya_vision, "aya_vision", "cohere2", ["layers.0.input_layernorm", "layers.1.input_layernorm",
                                                         "norm"], N_IMAGE_TOKENS // 4),
}


def _build(kind: str):
    cls, cfg = WRAPPERS[kind][0]()
    cfg._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = cls(cfg).eval()
    model.tiny_norms = tiny.randomize(model, 0)
    return model


def _as_unknown(folder: Path, kind: str) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == WRAPPERS[kind][1]
    cfg["model_type"] = WRAPPER
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


def _load(folder: Path, kind: str):
    """The wrapper's class on ``folder``, its config's model_type restored (transformers knows no WRAPPER)."""
    from transformers import AutoConfig, AutoModelForImageTextToText
    d = json.loads((folder / "config.json").read_text())
    d["model_type"] = WRAPPERS[kind][1]
    cfg = AutoConfig.for_model(**{k: v for k, v in d.items() if not k.startswith("flashnorm")})
    model, info = AutoModelForImageTextToText.from_pretrained(str(folder), config=cfg, dtype=torch.float32,
                                                              attn_implementation="eager", output_loading_info=True)
    return model.eval(), info


def _inputs(n_image: int) -> dict[str, dict]:
    g = torch.Generator().manual_seed(7)
    text = torch.randint(3, IMAGE_TOKEN - 1, (2, 12), generator=g)
    ids = torch.randint(3, IMAGE_TOKEN - 1, (2, n_image + 8), generator=g)
    ids[:, 3:3 + n_image] = IMAGE_TOKEN
    pixels = torch.randn(2, 3, SIDE, SIDE, generator=g)
    return {"text": {"input_ids": text, "attention_mask": torch.ones_like(text)},
            "image": {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}}


@torch.no_grad()
def _logits(model, inputs) -> dict:
    return {k: model(**v, use_cache=False).logits.float() for k, v in inputs.items()}


def _rel(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _min_cos(a, b) -> float:
    a, b = a.reshape(-1, a.shape[-1]).double(), b.reshape(-1, b.shape[-1]).double()
    return torch.nn.functional.cosine_similarity(a, b, dim=-1).min().item()


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


# layout id -> (language-model prefix, head tensor) as the checkpoint spells them
LAYOUTS = {"legacy": ("language_model.model.", "language_model.lm_head.weight"),
           "inmemory": ("model.language_model.", "lm_head.weight")}


class Wrapper:
    def __init__(self, kind: str, layout: str, root: Path):
        self.kind, self.prefix, self.head = kind, *LAYOUTS[layout]
        _, _, self.family, folded, n_image = WRAPPERS[kind]
        self.folded = {f"{self.prefix}{m}.weight" for m in folded}
        model = _build(kind)
        if layout == "legacy":
            self.src = tiny.save_sharded(model, root / "src", dtype="bfloat16")
        else:
            norms = {n + s for n in model.tiny_norms for s in (".weight", ".bias")}
            self.src = save_memory_names(model, root / "src", norms)
        del model
        _as_unknown(self.src, kind)
        self.inputs = _inputs(n_image)
        ref, info = _load(self.src, kind)
        assert not info.get("missing_keys") and not info.get("unexpected_keys"), info
        self.ref = _logits(ref, self.inputs)
        del ref
        _, _, self.plan = streamfold.load_plan(self.src)
        self.outs = {}
        for mode, merged in (("compat", "float32"), ("strict", "float32"), ("compat", "source")):
            out = root / f"{mode}_{merged}"
            streamfold.convert(self.src, out, mode=mode, merged_dtype=merged)
            self.outs[mode, merged] = out


@pytest.fixture(scope="module", params=[pytest.param(("llava", "inmemory"), id="llava-inmemory"),
                                        pytest.param(("llava", "legacy"), id="llava-legacy", marks=pytest.mark.full),
                                        pytest.param(("aya_vision", "inmemory"), id="aya_vision-inmemory",
                                                     marks=pytest.mark.full)])
def wrapper(request, tmp_path_factory):
    kind, layout = request.param
    return Wrapper(kind, layout, tmp_path_factory.mktemp(f"{kind}-{layout}"))


def test_plan_is_the_text_family_under_the_prefix(wrapper):
    plan = wrapper.plan
    from streamfold.rules.patterns import looks_like_norm
    assert plan.composed is not None and plan.family == wrapper.family and plan.model_type == WRAPPER
    assert plan.composed.prefix == wrapper.prefix and plan.composed.head + ".weight" == wrapper.head
    assert {n.weight for n in plan.folded} == wrapper.folded
    outside = {t for t in _tensors(wrapper.src) if not t.startswith(wrapper.prefix) and t.endswith(".weight")
               and looks_like_norm(t)}
    assert outside and {n.weight for n in plan.kept} == outside  # the tower's (and projector's) norms
    text = plan.describe()
    assert "composed wrapper" in text and wrapper.prefix in text
    assert plan.to_dict()["composed"]["text_family"] == wrapper.family


def test_outputs_are_exact_in_transformers_text_and_image(wrapper):
    for (mode, merged), out in wrapper.outs.items():
        model, info = _load(out, wrapper.kind)
        assert not info.get("unexpected_keys"), info
        got = _logits(model, wrapper.inputs)
        for k in ("text", "image"):
            if merged == "float32":
                assert _rel(got[k], wrapper.ref[k]) <= MAX_REL_F32, (mode, k, _rel(got[k], wrapper.ref[k]))
            else:
                assert _min_cos(got[k], wrapper.ref[k]) >= MIN_COS_BF16, (mode, k)


def test_everything_outside_the_language_model_is_untouched(wrapper):
    src, out = _tensors(wrapper.src), _tensors(wrapper.outs["compat", "source"])
    assert sorted(src) == sorted(out)
    outside = [k for k in src if not k.startswith(wrapper.prefix) and k != wrapper.head]
    assert any("vision_tower" in k for k in outside) and any("multi_modal_projector" in k for k in outside)
    assert any(k.endswith("norm.weight") for k in outside)
    for k in outside:
        assert torch.equal(src[k].view(torch.uint8) if src[k].dtype == torch.bfloat16 else src[k],
                           out[k].view(torch.uint8) if out[k].dtype == torch.bfloat16 else out[k]), k


def test_inspect_and_card_say_so(wrapper):
    text = streamfold.inspect(str(wrapper.src)).describe()
    assert "composed wrapper" in text and WRAPPER in text
    card = (wrapper.outs["compat", "float32"] / "README.md").read_text()
    assert "Composed wrapper" in card and wrapper.prefix in card


def test_verify_passes(wrapper):
    report = streamfold.verify(wrapper.src, wrapper.outs["compat", "source"])
    assert report.ok, report.summary()


# -- names that do not tile ------------------------------------------------------------------------------
def _with_extra(src: Path, dst: Path, extra: dict[str, str]) -> Path:
    """A copy of ``src`` whose shard 2 also holds ``extra`` (new name -> existing tensor to copy)."""
    from safetensors.torch import save_file
    import shutil
    shutil.copytree(src, dst)
    index = json.loads((dst / tiny.INDEX_NAME).read_text())
    every = _tensors(src)
    shard = tiny.SHARD_NAMES[1]
    content = {k: every[k] for k, s in index["weight_map"].items() if s == shard}
    for new, old in extra.items():
        content[new] = every[old].clone()
        index["weight_map"][new] = shard
    save_file(content, str(dst / shard), metadata={"format": "pt"})
    (dst / tiny.INDEX_NAME).write_text(json.dumps(index, indent=2))
    return dst


def _refused(src: Path, tmp_path: Path) -> str:
    r = subprocess.run([sys.executable, "-m", "streamfold", str(src), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert not (tmp_path / "out").exists()
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("streamfold: error: "), r.stderr
    return lines[0]


def test_a_norm_no_rule_places_is_refused(wrapper, tmp_path):
    p = wrapper.prefix
    src = _with_extra(wrapper.src, tmp_path / "src", {f"{p}layers.0.cross_layernorm.weight":
                                                      f"{p}layers.0.input_layernorm.weight"})
    line = _refused(src, tmp_path)
    assert f"{p}layers.0.cross_layernorm.weight" in line and "do not tile" in line


def test_a_language_model_under_two_prefixes_is_refused(wrapper, tmp_path):
    p = wrapper.prefix
    src = _with_extra(wrapper.src, tmp_path / "src", {"draft_model.layers.0.input_layernorm.weight":
                                                      f"{p}layers.0.input_layernorm.weight"})
    line = _refused(src, tmp_path)
    assert "2 prefixes" in line and "do not tile" in line


def test_an_unknown_text_model_is_unsupported(wrapper, tmp_path):
    import shutil
    src = tmp_path / "src"
    shutil.copytree(wrapper.src, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["text_config"]["model_type"] = "sf_no_such_text_model"
    (src / "config.json").write_text(json.dumps(cfg))
    line = _refused(src, tmp_path)
    assert f"unsupported model_type {WRAPPER!r}" in line and "sf_no_such_text_model" in line


def test_converted_wrapper_is_recognized_and_changes_mode(wrapper, tmp_path):
    """detect finds the folded language model through the same composition: converting the output again
    writes nothing (already FlashNorm), and strict -> compat restores identity norms that load exactly."""
    with pytest.raises(streamfold.AlreadyFlashNorm) as ei:
        streamfold.convert(wrapper.outs["compat", "source"], tmp_path / "again")
    assert ei.value.state.mode == "compat" and not (tmp_path / "again").exists()
    back = tmp_path / "back"
    report = streamfold.convert(wrapper.outs["strict", "float32"], back, mode="compat")
    assert report.mode_change == "strict -> compat"
    model, info = _load(back, wrapper.kind)
    assert not info.get("missing_keys") and not info.get("unexpected_keys"), info
    got = _logits(model, wrapper.inputs)
    for k in ("text", "image"):
        assert _rel(got[k], wrapper.ref[k]) <= MAX_REL_F32, k
