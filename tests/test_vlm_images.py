"""Why vision-language wrappers are checked on a prompt with an image, not only on text.

Llama 3.2 Vision (``mllama``) skips its cross-attention layers when there is no image, so a text-only
check is blind to their norms. A real tiny Mllama is converted (float32 merged weights), then its
cross-attention layer's ``input_layernorm`` is put back to its source value (the norm now scales a
second time, on top of the folded ``cross_attn.q_proj``): the text logits do not move, the image
prompt's logits do (``pixels.image_inputs``: generated pixels, image tokens counted by the model).
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
tiny = pytest.importorskip("streamfold.derive.tiny")
pixels = pytest.importorskip("streamfold.derive.pixels")

import streamfold  # noqa: E402


def _rel(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.full
def test_text_check_is_blind_to_cross_attention_norms_image_check_is_not(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny.build_tiny_model("mllama")
    assert model.config.text_config.cross_attention_layers == [1]
    src = tiny.save_sharded(model, tmp_path / "src")
    ref, _ = tiny.load_pretrained(src, "mllama")
    text, image = tiny.example_inputs(ref), pixels.image_inputs(ref)
    ref_text, ref_image = tiny.forward_logits(ref, text), tiny.forward_logits(ref, image)
    streamfold.convert(src, tmp_path / "out", merged_dtype="float32")
    out, _ = tiny.load_pretrained(tmp_path / "out", "mllama")
    assert _rel(tiny.forward_logits(out, text), ref_text) <= 1e-5
    assert _rel(tiny.forward_logits(out, image), ref_image) <= 1e-5

    shard = tmp_path / "out" / tiny.NORM_SHARD
    folded, source = load_file(str(shard)), load_file(str(src / tiny.NORM_SHARD))
    name = next(k for k in folded if k.endswith("layers.1.input_layernorm.weight"))
    assert torch.all(folded[name] == 1) and not torch.all(source[name] == 1)
    folded[name] = source[name]
    save_file(folded, str(shard), metadata={"format": "pt"})
    broken, _ = tiny.load_pretrained(tmp_path / "out", "mllama")
    assert _rel(tiny.forward_logits(broken, text), ref_text) <= 1e-5  # text never runs layer 1
    assert _rel(tiny.forward_logits(broken, image), ref_image) > 1e-2
