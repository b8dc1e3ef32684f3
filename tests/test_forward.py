"""streamfold.check.forward: the numpy float32 forward pass matches transformers' logits (relative error <= 1e-4).

Checkpoints: tests/factory.py architectures (float32 and bf16), plus small models built here for the
RoPE variants and attention options the factory configs leave at their defaults. Every model has random
norm weights far from 1.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import streamfold
from streamfold.check import forward
from streamfold.core.errors import StreamfoldError
from tests.factory import ARCHS, build_checkpoint, logits
from tests.representatives import matrix
from tests.factory import test_input_ids as input_ids  # (not collected as a test)

REL_TOL = 1e-4
FORWARD_ARCHS = [n for n, s in ARCHS.items() if s.model_type in forward.SUPPORTED]


def rel_error(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def numpy_logits(path, ids: torch.Tensor, **kw) -> np.ndarray:
    return np.stack([forward.logits(path, row.numpy(), **kw) for row in ids])


def test_covers_the_brief():
    must = {"llama", "mistral", "qwen2", "qwen3", "phi3", "mixtral", "qwen2_moe", "qwen3_moe"}
    assert must <= {ARCHS[n].model_type for n in FORWARD_ARCHS}
    assert {"llama", "llama_tied"} <= set(FORWARD_ARCHS)  # untied and tied heads


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", matrix(FORWARD_ARCHS, {"llama", "llama_tied", "qwen2_moe", "phi3"}))
def test_matches_transformers(tmp_path, name, dtype):
    path = build_checkpoint(name, tmp_path / name, dtype=dtype)
    ids = input_ids(name)
    ref = logits(path, ids).numpy()
    got = numpy_logits(path, ids)
    assert got.shape == ref.shape
    assert rel_error(got, ref) <= REL_TOL


# -- configurations the factory leaves at defaults ---------------------------------------------------------
def _build(tmp_path, model_type: str, **cfg) -> str:
    """A random model of ``model_type`` with norms far from 1, saved with save_pretrained (float32)."""
    from transformers import AutoConfig, AutoModelForCausalLM
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.08, tie_word_embeddings=False,
                bos_token_id=1, eos_token_id=2, pad_token_id=0)
    base.update(cfg)
    config = AutoConfig.for_model(model_type, **base)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(torch.empty(p.shape).uniform_(0.3, 2.5, generator=g))
            elif n.endswith(".bias"):
                p.copy_(torch.empty(p.shape).uniform_(-0.2, 0.2, generator=g))
    out = tmp_path / model_type
    model.save_pretrained(out)
    return str(out)


def _ids(seq=12, vocab=128, batch=2):
    return torch.randint(3, vocab, (batch, seq), generator=torch.Generator().manual_seed(7))


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16, "rope_theta": 500000.0}
VARIANTS = {
    "llama3_rope": ("llama", dict(rope_parameters=LLAMA3, head_dim=16)),
    "linear_rope": ("llama", dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})),
    "dynamic_rope_grown": ("llama", dict(max_position_embeddings=8,
                                         rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})),
    "yarn_rope": ("llama", dict(max_position_embeddings=128, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "rope_theta": 1e4})),
    "head_dim_32_biases": ("llama", dict(head_dim=32, attention_bias=True, mlp_bias=True,
                                         rope_parameters={"rope_type": "default", "rope_theta": 1234.0})),
    "mha_tied": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "mistral_window4": ("mistral", dict(sliding_window=4)),
    "qwen2_window4": ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "phi3_longrope_partial": ("phi3", dict(
        max_position_embeddings=64, original_max_position_embeddings=8, partial_rotary_factor=0.5,
        rope_parameters={"rope_type": "longrope", "rope_theta": 1e4, "partial_rotary_factor": 0.5,
                         "short_factor": [1.0, 1.1, 1.3, 1.7], "long_factor": [1.0, 2.0, 3.5, 6.0]})),
    "phi3_longrope_short": ("phi3", dict(
        max_position_embeddings=64, original_max_position_embeddings=32,
        rope_parameters={"rope_type": "longrope", "rope_theta": 1e4,
                         "short_factor": [1.0 + i / 10 for i in range(8)],
                         "long_factor": [1.0 + i for i in range(8)]})),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_config_variants_match_transformers(tmp_path, variant):
    model_type, cfg = VARIANTS[variant]
    path = _build(tmp_path, model_type, **cfg)
    ids = _ids()
    ref = logits(path, ids).numpy()
    got = numpy_logits(path, ids)
    assert rel_error(got, ref) <= REL_TOL


@pytest.mark.parametrize("variant,plain", [
    ("llama3_rope", dict(rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
    ("mistral_window4", dict(sliding_window=None)),
    ("phi3_longrope_partial", dict(original_max_position_embeddings=32)),  # 12 tokens: short factors
])
def test_variants_change_the_logits(tmp_path, variant, plain):
    """Guard against a config option both implementations ignore: the same weights without it give
    different logits."""
    model_type, cfg = VARIANTS[variant]
    a = _build(tmp_path / "a", model_type, **cfg)
    b = _build(tmp_path / "b", model_type, **dict(cfg, **plain))
    ids = _ids(seq=12)[:1]
    assert rel_error(numpy_logits(a, ids), numpy_logits(b, ids)) > 1e-3


def test_small_blocks_and_strict_checkpoint(tmp_path):
    """Row-blocked weight reads give the same logits; a strict FlashNorm output (no norm tensors)
    runs and matches both transformers' load of it and the source."""
    src = build_checkpoint("qwen3", tmp_path / "src", dtype="bfloat16")
    ids = input_ids("qwen3")
    ref = numpy_logits(src, ids)
    assert rel_error(numpy_logits(src, ids, block_bytes=1 << 12), ref) <= 1e-6
    dst = tmp_path / "dst"
    streamfold.convert(src, dst, mode="strict", merged_dtype="float32")
    got = numpy_logits(dst, ids)
    assert rel_error(got, logits(dst, ids).numpy()) <= REL_TOL
    assert rel_error(got, ref) <= 1e-5


def test_compare_logits_numbers():
    ref = np.array([[1.0, 2.0, 3.0], [3.0, 1.0, 0.0]], dtype=np.float32)
    got = np.array([[1.0, 2.0, 3.5], [0.0, 1.0, 3.0]], dtype=np.float32)
    c = forward.compare_logits(ref, got)
    assert c["max_abs_error"] == 3.0 and c["max_rel_error"] == 1.0
    assert c["argmax_agreement"] == 0.5 and c["tokens"] == 2
    assert abs(c["min_cosine"] - 1.0 / 10.0) < 1e-12  # row 2: dot 1, norms sqrt(10) each


def test_unsupported_model_type(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "gemma2"}))
    with pytest.raises(StreamfoldError, match="forward pass supports"):
        forward.Decoder(d)
