"""Which case of each matrix the fast suite runs (the rest are marked ``full``: ``pytest --full``).

One family of each rule shape: plain pre-norm (llama), fused projections (phi3), MoE
with shared expert and gate (qwen2_moe), fused ``[experts, in, out]`` experts (gpt_oss), MLA latent norms
(deepseek_v3), LayerNorm with bias (gpt_neox), parallel block (cohere), ``1 + w`` norms and hybrid mixer
layers (qwen3_next), a multimodal wrapper with its language model nested (qwen3_vl), ``[in, out]`` Conv1D
weights folded on axis 0 (gpt2), a config-conditioned rule (stablelm).
"""
from __future__ import annotations

import pytest

FAMILY_TYPES = {"llama", "phi3", "qwen2_moe", "gpt_oss", "deepseek_v3", "gpt_neox", "cohere",
                "qwen3_next", "qwen3_vl", "gpt2", "stablelm"}
# tests/factory.py architectures (hand-written expectations)
FACTORY_ARCHS = {"llama", "gemma3", "phi3", "qwen2_moe", "gpt_oss", "deepseek_v3", "cohere", "gpt_neox",
                 "nemotron"}


def matrix(values, fast) -> list:
    """``values`` as pytest params (a tuple is one case of several arguments), those not in ``fast`` (a
    set, or a predicate) marked ``full``."""
    keep = fast if callable(fast) else (lambda v: v in fast)
    return [v if keep(v) else pytest.param(*(v if isinstance(v, tuple) else (v,)), marks=pytest.mark.full)
            for v in values]
