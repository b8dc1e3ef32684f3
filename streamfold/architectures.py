"""Architecture rules as data: which norm feeds which linears, per model family.

Each family is a plain dict (the same schema a user's ``--rules`` file uses, see ``rules.py``):

- ``model_types``: config ``model_type`` values it covers.
- ``offset``: the norm multiplies by ``offset + w`` (0 for ``w``; 1 for Gemma-style ``1 + w``).
  The fold scales by ``offset + w`` and the identity weight is ``1 - offset``.
- ``folds``: ``{"norm": pattern, "into": [consumer, ...]}``. A consumer is a module pattern whose
  ``.weight`` input columns (last axis) are scaled, or ``{"weight": tensor, "axis": k, "bias": tensor}``
  for fused or transposed layouts. ``"untied_head": true`` marks the final norm, which folds only into
  an untied ``lm_head``. ``"variants"`` (instead of ``into``) lists alternative consumer sets, the
  first one fully present is used (dense vs. MoE layers).
- ``keep``: ``{"norm": pattern, "why": reason}`` norms that must stay (post-norms, q/k norms).

Patterns: ``{n}`` is a layer index (shared between a norm and its consumers), ``{e}`` matches
every expert index present.
"""
from __future__ import annotations

_ATTN = ["model.layers.{n}.self_attn.q_proj", "model.layers.{n}.self_attn.k_proj",
         "model.layers.{n}.self_attn.v_proj"]
_MLP = ["model.layers.{n}.mlp.gate_proj", "model.layers.{n}.mlp.up_proj"]
_HEAD = {"norm": "model.norm", "into": ["lm_head"], "untied_head": True}
_QK_WHY = "q/k norm acts on projection outputs before RoPE, not on a linear's input"

FAMILIES: dict[str, dict] = {
    "llama": {
        "model_types": ["llama", "mistral", "qwen2", "smollm3", "granite", "ernie4_5"],
        "offset": 0,
        "folds": [
            {"norm": "model.layers.{n}.input_layernorm", "into": _ATTN},
            {"norm": "model.layers.{n}.post_attention_layernorm", "into": _MLP},
            _HEAD,
        ],
    },
    "qwen3": {
        "model_types": ["qwen3"],
        "offset": 0,
        "folds": [
            {"norm": "model.layers.{n}.input_layernorm", "into": _ATTN},
            {"norm": "model.layers.{n}.post_attention_layernorm", "into": _MLP},
            _HEAD,
        ],
        "keep": [
            {"norm": "model.layers.{n}.self_attn.q_norm", "why": _QK_WHY},
            {"norm": "model.layers.{n}.self_attn.k_norm", "why": _QK_WHY},
        ],
    },
    "phi3": {
        "model_types": ["phi3"],
        "offset": 0,
        "folds": [
            {"norm": "model.layers.{n}.input_layernorm", "into": ["model.layers.{n}.self_attn.qkv_proj"]},
            {"norm": "model.layers.{n}.post_attention_layernorm", "into": ["model.layers.{n}.mlp.gate_up_proj"]},
            _HEAD,
        ],
    },
}
