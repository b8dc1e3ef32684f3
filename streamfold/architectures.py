"""Architecture rules as data: which norm feeds which linears, per model family.

Each family is a plain dict (the same schema a user's ``--rules`` file uses, see ``rules.py``):

- ``model_types``: config ``model_type`` values it covers.
- ``offset``: the norm multiplies by ``offset + w`` (0 for ``w``; 1 for Gemma-style ``1 + w``).
  The fold scales by ``offset + w`` and the identity weight is ``1 - offset``.
- ``folds``: ``{"norm": pattern, "into": [consumer, ...]}``. A consumer is a module pattern whose
  ``.weight`` input columns (last axis) are scaled and whose ``.bias`` (if present) absorbs a
  LayerNorm bias, or ``{"weight": tensor, "axis": k, "bias": tensor}`` for fused or transposed
  layouts. ``"untied_head": true`` marks the final norm, which folds only into an untied head
  (kept when embeddings are tied or the head tensor is absent). ``"variants"`` (instead of
  ``into``) lists alternative consumer sets, the first one fully present is used (dense vs. MoE
  layers). ``"when": {config_key: [accepted values]}`` applies a rule only when the config
  (or its ``text_config``) matches; ``null`` accepts a missing key.
- ``keep``: ``{"norm": pattern, "why": reason}`` norms that must stay (post-norms, q/k norms, ...).
- ``tie_default``: whether embeddings are tied when ``config.json`` does not say (``true``/``false``,
  or the list of this family's model types whose config class defaults to tied).
- ``layouts``: alternative tensor-name layouts (multimodal checkpoints nest the language model).
  Each maps a pattern prefix, as written in the rules, to the checkpoint's spelling (the longest
  matching prefix wins); the first layout in which a fold norm exists is used.
- ``strict_refused``: why strict mode (folded norms removed) would not load as the identity;
  strict conversions of the family are refused with that reason.

Patterns: ``{n}`` is a layer index (shared between a norm and its consumers), ``{e}`` matches
every expert index present, ``{h}`` a head index (keep rules).

Sources of truth: the installed transformers' modeling files (which norm feeds which linear) and the
names ``save_pretrained`` writes; tests/test_architectures.py proves each family exact on random models.
"""
from __future__ import annotations

L = "model.layers.{n}."
_QKV = [L + "self_attn.q_proj", L + "self_attn.k_proj", L + "self_attn.v_proj"]
_GATE_UP = [L + "mlp.gate_proj", L + "mlp.up_proj"]
_HEAD = {"norm": "model.norm", "into": ["lm_head"], "untied_head": True}

_QK_WHY = "q/k norm acts on projection outputs before RoPE, not on a linear's input"
_POST_WHY = "post-norm: its output is added to the residual stream, not read by a linear"
_VISION_WHY = "vision side: outside FlashNorm's language-model scope, left untouched"


def _keep(patterns, why: str) -> list[dict]:
    return [{"norm": p, "why": why} for p in patterns]


def _qk_keep(prefix: str = L, why: str = _QK_WHY) -> list[dict]:
    return _keep([prefix + "self_attn.q_norm", prefix + "self_attn.k_norm"], why)


def _gemma2_folds(p: str, head: str) -> dict:
    """Gemma2/Gemma3 sandwich layers under prefix ``p`` (``model.`` for the text-only models)."""
    lp = p + "layers.{n}."
    return {
        "folds": [
            {"norm": lp + "input_layernorm",
             "into": [lp + "self_attn.q_proj", lp + "self_attn.k_proj", lp + "self_attn.v_proj"]},
            {"norm": lp + "pre_feedforward_layernorm", "into": [lp + "mlp.gate_proj", lp + "mlp.up_proj"]},
            {"norm": p + "norm", "into": [head], "untied_head": True},
        ],
        "keep": _keep([lp + "post_attention_layernorm", lp + "post_feedforward_layernorm"], _POST_WHY)
        + _qk_keep(lp),
    }


_GEMMA3_VISION = [
    "model.vision_tower.vision_model.encoder.layers.{n}.layer_norm1",
    "model.vision_tower.vision_model.encoder.layers.{n}.layer_norm2",
    "model.vision_tower.vision_model.post_layernorm",
    "model.vision_tower.encoder.layers.{n}.layer_norm1",
    "model.vision_tower.encoder.layers.{n}.layer_norm2",
    "model.vision_tower.post_layernorm",
    "model.multi_modal_projector.mm_soft_emb_norm",
]

_MOE_EXPERTS = [L + "mlp.gate", L + "mlp.experts.{e}.gate_proj", L + "mlp.experts.{e}.up_proj"]

FAMILIES: dict[str, dict] = {
    # -- RMSNorm, pre-norm, Llama layout ----------------------------------------------------------
    "llama": {
        "description": "Llama, Mistral, Qwen2/2.5, SmolLM/2/3, Granite, Ernie 4.5",
        "model_types": ["llama", "mistral", "qwen2", "smollm3", "granite", "ernie4_5"],
        "offset": 0,
        "tie_default": ["smollm3", "ernie4_5"],
        "folds": [
            {"norm": L + "input_layernorm", "into": _QKV},
            {"norm": L + "post_attention_layernorm", "into": _GATE_UP},
            _HEAD,
        ],
    },
    "qwen3": {
        "description": "Qwen3",
        "model_types": ["qwen3"],
        "offset": 0,
        "folds": [
            {"norm": L + "input_layernorm", "into": _QKV},
            {"norm": L + "post_attention_layernorm", "into": _GATE_UP},
            _HEAD,
        ],
        "keep": _qk_keep(),
    },
    "phi3": {
        "description": "Phi-3 (fused projections)",
        "model_types": ["phi3"],
        "offset": 0,
        "folds": [
            {"norm": L + "input_layernorm", "into": [L + "self_attn.qkv_proj"]},
            {"norm": L + "post_attention_layernorm", "into": [L + "mlp.gate_up_proj"]},
            _HEAD,
        ],
    },
    # -- Gemma: (1 + w) RMSNorm ------------------------------------------------------------------
    "gemma": {
        "description": "Gemma (1 + w)",
        "model_types": ["gemma"],
        "offset": 1,
        "tie_default": True,
        "folds": [
            {"norm": L + "input_layernorm", "into": _QKV},
            {"norm": L + "post_attention_layernorm", "into": _GATE_UP},  # a pre-MLP norm in Gemma 1
            _HEAD,
        ],
    },
    "gemma2": {
        "description": "Gemma2, Gemma3 text (1 + w, sandwich norms)",
        "model_types": ["gemma2", "gemma3_text"],
        "offset": 1,
        "tie_default": True,
        **_gemma2_folds("model.", "lm_head"),
    },
    "gemma3": {
        # Rules use transformers' in-memory names; "layouts" map them to what checkpoints store.
        "description": "Gemma3 multimodal (language model nested; vision tower untouched)",
        "model_types": ["gemma3"],
        "offset": 1,
        "tie_default": True,
        "layouts": [
            {"model.language_model.": "language_model.model.", "lm_head": "language_model.lm_head",
             "model.vision_tower.": "vision_tower.", "model.multi_modal_projector.": "multi_modal_projector."},
            {},
        ],
        "folds": _gemma2_folds("model.language_model.", "lm_head")["folds"],
        "keep": _gemma2_folds("model.language_model.", "lm_head")["keep"] + _keep(_GEMMA3_VISION, _VISION_WHY),
    },
    # -- Mixture of experts -----------------------------------------------------------------------
    "mixtral": {
        "description": "Mixtral",
        "model_types": ["mixtral"],
        "offset": 0,
        "folds": [
            {"norm": L + "input_layernorm", "into": _QKV},
            {"norm": L + "post_attention_layernorm",
             "into": [L + "block_sparse_moe.gate", L + "block_sparse_moe.experts.{e}.w1",
                      L + "block_sparse_moe.experts.{e}.w3"]},
            _HEAD,
        ],
    },
    "qwen2_moe": {
        "description": "Qwen2-MoE (shared expert and its gate)",
        "model_types": ["qwen2_moe"],
        "offset": 0,
        "folds": [
            {"norm": L + "input_layernorm", "into": _QKV},
            {"norm": L + "post_attention_layernorm", "variants": [
                _MOE_EXPERTS + [L + "mlp.shared_expert.gate_proj", L + "mlp.shared_expert.up_proj",
                                L + "mlp.shared_expert_gate"],
                _GATE_UP,  # dense layers (mlp_only_layers, decoder_sparse_step)
            ]},
            _HEAD,
        ],
    },
    "qwen3_moe": {
        "description": "Qwen3-MoE",
        "model_types": ["qwen3_moe"],
        "offset": 0,
        "folds": [
            {"norm": L + "input_layernorm", "into": _QKV},
            {"norm": L + "post_attention_layernorm", "variants": [_MOE_EXPERTS, _GATE_UP]},
            _HEAD,
        ],
        "keep": _qk_keep(),
    },
    "gpt_oss": {
        "description": "GPT-OSS (fused [experts, in, out] expert tensors, router bias)",
        "model_types": ["gpt_oss"],
        "offset": 0,
        "folds": [
            {"norm": L + "input_layernorm", "into": _QKV},
            {"norm": L + "post_attention_layernorm", "into": [
                L + "mlp.router",
                {"weight": L + "mlp.experts.gate_up_proj", "axis": 1, "bias": L + "mlp.experts.gate_up_proj_bias"},
            ]},
            _HEAD,
        ],
    },
    "deepseek": {
        "description": "DeepSeek-V2/V3 (MLA latent norms; dense and MoE layers; shared experts)",
        "model_types": ["deepseek_v2", "deepseek_v3"],
        "offset": 0,
        "folds": [
            {"norm": L + "input_layernorm", "variants": [
                [L + "self_attn.q_a_proj", L + "self_attn.kv_a_proj_with_mqa"],  # q_lora_rank set
                [L + "self_attn.q_proj", L + "self_attn.kv_a_proj_with_mqa"],  # V2-Lite: q_lora_rank null
            ]},
            {"norm": L + "self_attn.q_a_layernorm", "into": [L + "self_attn.q_b_proj"]},
            {"norm": L + "self_attn.kv_a_layernorm", "into": [L + "self_attn.kv_b_proj"]},
            {"norm": L + "post_attention_layernorm", "variants": [
                _MOE_EXPERTS + [L + "mlp.shared_experts.gate_proj", L + "mlp.shared_experts.up_proj"],
                _MOE_EXPERTS,  # n_shared_experts null
                _GATE_UP,  # the first first_k_dense_replace layers
            ]},
            _HEAD,
        ],
        "keep": _keep([L + "enorm", L + "hnorm", L + "shared_head.norm"],
                      "multi-token-prediction module: eh_proj reads the concatenation of two norms; "
                      "transformers does not use it"),
    },
    # -- post-norm and sandwich models --------------------------------------------------------------
    "olmo2": {
        "description": "OLMo2 (post-norms)",
        "model_types": ["olmo2"],
        "offset": 0,
        "folds": [_HEAD],
        "keep": _keep([L + "post_attention_layernorm", L + "post_feedforward_layernorm"], _POST_WHY)
        + _qk_keep(why="q/k norm acts on the full q/k projection output before RoPE, not on a linear's input"),
    },
    "glm4": {
        "description": "GLM4 (fused gate_up_proj, sandwich post-norms)",
        "model_types": ["glm4"],
        "offset": 0,
        "folds": [
            {"norm": L + "input_layernorm", "into": _QKV},
            {"norm": L + "post_attention_layernorm", "into": [L + "mlp.gate_up_proj"]},
            _HEAD,
        ],
        "keep": _keep([L + "post_self_attn_layernorm", L + "post_mlp_layernorm"], _POST_WHY),
    },
    # -- LayerNorm models -----------------------------------------------------------------------------
    "cohere": {
        "description": "Cohere / Command-R (bias-free LayerNorm, parallel block)",
        "model_types": ["cohere"],
        "offset": 0,
        "tie_default": True,
        "folds": [
            {"norm": L + "input_layernorm", "into": _QKV + _GATE_UP},  # attention and MLP read one norm
            _HEAD,
        ],
        "keep": _qk_keep(why=_QK_WHY + " (per-head LayerNorm, 2-D weight)"),
    },
    "gpt_neox": {
        "description": "GPT-NeoX / Pythia (LayerNorm with bias)",
        "model_types": ["gpt_neox"],
        "offset": 0,
        "folds": [
            {"norm": "gpt_neox.layers.{n}.input_layernorm", "into": ["gpt_neox.layers.{n}.attention.query_key_value"]},
            {"norm": "gpt_neox.layers.{n}.post_attention_layernorm", "into": ["gpt_neox.layers.{n}.mlp.dense_h_to_4h"]},
            {"norm": "gpt_neox.final_layer_norm", "into": ["embed_out"], "untied_head": True},
        ],
    },
    "phi": {
        "description": "Phi-1/1.5/2 (LayerNorm with bias, parallel block, lm_head bias)",
        "model_types": ["phi"],
        "offset": 0,
        "folds": [
            {"norm": L + "input_layernorm", "into": _QKV + [L + "mlp.fc1"]},
            {"norm": "model.final_layernorm", "into": ["lm_head"], "untied_head": True},
        ],
        "keep": _keep([L + "self_attn.q_layernorm", L + "self_attn.k_layernorm"], _QK_WHY),
    },
    "starcoder2": {
        "description": "StarCoder2 (LayerNorm with bias)",
        "model_types": ["starcoder2"],
        "offset": 0,
        "tie_default": True,
        "folds": [
            {"norm": L + "input_layernorm", "into": _QKV},
            {"norm": L + "post_attention_layernorm", "into": [L + "mlp.c_fc"]},
            _HEAD,
        ],
    },
    "stablelm": {
        "description": "StableLM (LayerNorm with bias; sequential or parallel residual)",
        "model_types": ["stablelm"],
        "offset": 0,
        "folds": [
            {"norm": L + "input_layernorm", "into": _QKV + _GATE_UP, "when": {"use_parallel_residual": [True]}},
            {"norm": L + "input_layernorm", "into": _QKV, "when": {"use_parallel_residual": [False, None]}},
            {"norm": L + "post_attention_layernorm", "into": _GATE_UP},
            _HEAD,
        ],
        "keep": _keep([L + "self_attn.q_layernorm.norms.{h}", L + "self_attn.k_layernorm.norms.{h}"],
                      _QK_WHY + " (one LayerNorm per head)"),
    },
    "nemotron": {
        "description": "Nemotron / Minitron (1 + w LayerNorm with bias)",
        "model_types": ["nemotron"],
        "offset": 1,
        "strict_refused": "transformers initialises a missing NemotronLayerNorm1P weight to ones, and the "
                          "norm multiplies by 1 + w, so a removed norm would load as a scale of 2",
        "folds": [
            {"norm": L + "input_layernorm", "into": _QKV},
            {"norm": L + "post_attention_layernorm", "into": [L + "mlp.up_proj"]},  # relu² MLP: no gate
            _HEAD,
        ],
    },
}
