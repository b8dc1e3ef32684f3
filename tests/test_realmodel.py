"""SmolLM2-135M-Instruct (a real Llama-architecture model with learned norms): greedy text is identical."""
import numpy as np
import pytest
import torch

import streamfold
from streamfold.core.reader import Checkpoint
from tests.conftest import full_run
from tests.representatives import matrix
from tests.realmodel import PROMPTS, greedy_generate, load, smollm2_checkpoint

# (prompts, greedy tokens each): the fast suite checks one prompt's continuation, --full four
GREEDY_FULL, GREEDY_FAST = (4, 40), (1, 24)


@pytest.fixture(scope="module")
def source(request):
    n_prompts, n_tokens = GREEDY_FULL if full_run(request.config) else GREEDY_FAST
    path = smollm2_checkpoint()
    model, tok = load(path)
    ids = tok("The quick brown fox jumps over the lazy dog because", return_tensors="pt").input_ids
    with torch.no_grad():
        ref_logits = model(ids).logits
    texts = [greedy_generate(model, tok, p, n=n_tokens) for p in PROMPTS[:n_prompts]]
    return path, ids, ref_logits, texts, n_tokens


@pytest.mark.parametrize("mode,merged", matrix([("compat", "source"), ("strict", "source"), ("compat", "float32")],
                                               {("compat", "source")}))
def test_smollm2_greedy_identical(source, tmp_path, mode, merged):
    path, ids, ref_logits, ref_texts, n_tokens = source
    dst = tmp_path / "flash"
    report = streamfold.convert(path, dst, mode=mode, merged_dtype=merged)
    assert report.norms_folded == 60 and report.norms_kept == 1  # 30 layers x 2; tied final norm kept

    src_ck, out_ck = Checkpoint(path), Checkpoint(dst)
    np.testing.assert_array_equal(out_ck.array("model.norm.weight"), src_ck.array("model.norm.weight"))
    for n in range(30):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            name = f"model.layers.{n}.{norm}.weight"
            if mode == "strict":
                assert name not in out_ck.tensors
            else:
                assert np.all(out_ck.array(name).astype(np.float32) == 1.0)
    assert out_ck.tensors["model.layers.0.self_attn.q_proj.weight"].dtype == ("F32" if merged == "float32" else "BF16")

    model, tok = load(dst)
    with torch.no_grad():
        got = model(ids).logits
    cos = torch.nn.functional.cosine_similarity(got.flatten(), ref_logits.flatten(), dim=0).item()
    if merged == "float32":
        rel = ((got - ref_logits).abs().max() / ref_logits.abs().max()).item()
        assert rel <= 1e-5, rel
    assert cos >= 0.9999, cos
    for prompt, want in zip(PROMPTS, ref_texts):
        assert greedy_generate(model, tok, prompt, n=n_tokens) == want, prompt
