"""Tiny configs for deriving and testing FlashNorm rules (development time only; transformers).

``tiny_config(model_type, **overrides)``: the config class's own defaults shrunk to tiny dimensions
(hidden 64, 2-4 layers, 4 heads, vocab 256, 4 experts), eager attention, every layer kind of a hybrid
present, tiny vision/audio towers for multimodal wrappers.  Per-type overrides live in ``_PER_TYPE``
(data).  ``auto_class(model_type)``: the Auto class that loads a whole checkpoint of the type.
"""
from __future__ import annotations

from typing import Any

import transformers
from transformers.models.auto import configuration_auto, modeling_auto


# Generic shrinking: config field -> tiny value, applied where the config class has the field.
_TEXT_SHRINK: dict[str, Any] = {
    "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 512,
    "initializer_range": 0.05,
    # mixture of experts
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_k": 2, "moe_topk": 2, "top_k_experts": 2, "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 64, "shared_intermediate_size": 64, "intermediate_size_mlp": 128,
    "n_group": 2, "topk_group": 1, "first_k_dense_replace": 1, "moe_layer_start_index": 1,
    # MLA / sparse attention indexers
    "kv_lora_rank": 16, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
    "qk_head_dim": 16, "index_topk": 4, "index_head_dim": 16, "index_n_heads": 2,
    # linear attention (Gated DeltaNet), Mamba
    "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_num_key_heads": 2,
    "linear_num_value_heads": 4, "mamba_n_heads": 8, "mamba_d_head": 16, "mamba_d_state": 16,
    "mamba_chunk_size": 8, "mamba_d_ssm": 128, "mamba_n_groups": 1,
    # Gemma 3n / 4 extras
    "hidden_size_per_layer_input": 16, "vocab_size_per_layer_input": 256, "laurel_rank": 8,
    "num_kv_shared_layers": 0,
    # windows and chunks small enough that a 12-token input exercises them
    "sliding_window": 8, "attention_chunk_size": 8, "block_size": 8,
    "block_multiple_of": 16,
}
_VISION_SHRINK: dict[str, Any] = {
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "depth": 2, "num_attention_heads": 2,
    "num_heads": 2, "num_key_value_heads": 2, "head_dim": 16, "image_size": 32, "patch_size": 8,
    "initializer_range": 0.05, "vision_output_dim": 64, "projector_input_dim": 64, "projector_output_dim": 64,
    "num_position_embeddings": 16, "position_embedding_size": 64, "max_position_embeddings": 64,
    "vocab_size": 8, "output_proj_dims": 64, "num_global_heads": 2,
}
_AUDIO_SHRINK: dict[str, Any] = {
    **_VISION_SHRINK, "conf_num_hidden_layers": 2, "conf_num_attention_heads": 2, "input_feat_size": 16,
    "sscp_conv_channel_size": [8, 4], "subsampling_conv_channels": [8, 4],
}
# Fields whose default None means "feature off": shrunk only when the default turns the feature on.
_KEEP_NONE = {"q_lora_rank", "sliding_window", "attention_chunk_size", "block_size",
              "index_topk", "first_k_dense_replace", "moe_layer_start_index"}
_TOKEN_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
# Multimodal special tokens: inside the tiny vocab, at its top (text inputs stay below 250).
_SPECIAL_TOKENS = ("image_token_id", "image_token_index", "video_token_id", "audio_token_id",
                   "boi_token_id", "boi_token_index", "eoi_token_id", "eoi_token_index",
                   "vision_start_token_id", "vision_end_token_id", "boa_token_id", "eoa_token_id")

# Per-type overrides (data; "wrapper.sub_config" keys apply to a wrapper's sub-config): layer counts that make every layer kind appear, fallbacks to torch code paths.
_PER_TYPE: dict[str, dict[str, Any]] = {
    "qwen3_next": {"num_hidden_layers": 4},  # full_attention_interval 4: layers 0-2 DeltaNet, 3 attention
    "qwen3_5_text": {"num_hidden_layers": 4},
    "qwen3_5_moe_text": {"num_hidden_layers": 4},
    "llama4_text": {"num_hidden_layers": 4, "interleave_moe_layer_step": 2},  # NoPE layer 3; dense + MoE
    "exaone4": {"num_hidden_layers": 4},  # sliding_window_pattern 4
    "lfm2": {"num_hidden_layers": 3, "full_attn_idxs": [1]},  # conv, attention, conv
    "granitemoehybrid": {"num_hidden_layers": 3, "layer_types": ["mamba", "attention", "mamba"]},
    "minimax": {"num_hidden_layers": 2, "layer_types": ["linear_attention", "full_attention"]},
    "deepseek_v32": {"num_hidden_layers": 2},
    # Conditioning (values only): at init 0.05 the bf16-merged min logit cosine is 0.983 (not investigated;
    # deepseek_v32, same rules, passes at 0.05; float32 max rel err 4.7e-07 there, 2.4e-07 at 0.02); at 0.02 it passes 0.9999.
    "glm_moe_dsa": {"initializer_range": 0.02},
    "glm4_moe": {"num_hidden_layers": 2},
    "ernie4_5_moe": {"moe_layer_end_index": 1},
    "hunyuan_v1_moe": {"num_experts": 4},
    # DBRX: fields of its own names; attn_config lacks rope_theta in transformers 5.24 (DbrxAttention reads it)
    # and clip_qkv None fails torch.clamp: both set as in published DBRX
    "dbrx": {"d_model": 64, "n_heads": 4, "n_layers": 2, "max_seq_len": 512, "vocab_size": 256,
             "initializer_range": 0.05, "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
             "ffn_config": {"ffn_hidden_size": 128, "moe_num_experts": 4, "moe_top_k": 2}},
    # layer kinds from periods (layer_types is a read-only property): 0 mamba+MoE, 1 attention+MLP,
    # 2 mamba+MLP, 3 attention+MoE
    "jamba": {"num_hidden_layers": 4, "attn_layer_period": 2, "attn_layer_offset": 1,
              "expert_layer_period": 3, "expert_layer_offset": 0, "mamba_dt_rank": 4},
    "bamba": {"attn_layer_indices": [1]},  # layer 0 Mamba2, layer 1 attention (default: all Mamba2)
    "nemotron_h": {"ssm_state_size": 16, "mamba_num_heads": 8, "mamba_head_dim": 16, "n_groups": 1,
                   "chunk_size": 8, "moe_shared_expert_intermediate_size": 64},  # heads * head_dim = 2 * hidden
    "lfm2_moe": {"num_hidden_layers": 4, "num_dense_layers": 1,  # 0 conv+MLP, 1 attention+MoE, 2 conv+MoE
                 "layer_types": ["conv", "full_attention", "conv", "full_attention"]},  # default None
    # conditioning (values only): at init 0.05 the tiny AFMoE's bf16-merged logit cosine is 0.974; 0.02 passes
    "afmoe": {"initializer_range": 0.02},
    "mamba2": {"num_heads": 8, "head_dim": 16, "state_size": 16, "n_groups": 1, "time_step_rank": 4,
               "chunk_size": 8},  # num_heads * head_dim = expand * hidden
    "recurrent_gemma": {"num_hidden_layers": 3},  # block_types recurrent, recurrent, attention
    # partial rotary: the default rotary_dim 64 is wider than the tiny head (64 / 4 heads = 16)
    "gptj": {"rotary_dim": 8},
    "codegen": {"rotary_dim": 8},
    # attention_types must list num_layers layers: one global and one local (window 8 < 12 tokens)
    "gpt_neo": {"attention_types": [[["global", "local"], 1]], "window_size": 8},
    "opt": {"ffn_dim": 128},  # OPT's MLP width is ffn_dim, not intermediate_size
    # MptConfig gets none of the generic shrink fields (its own names)
    "mpt": {"d_model": 64, "n_heads": 4, "n_layers": 2, "vocab_size": 256, "max_seq_len": 512,
            "initializer_range": 0.05},
    "dots1": {"n_shared_experts": 1},  # default None, but every MoE layer builds its shared expert
    "qwen2_vl_text": {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}},
    "qwen2_vl.vision_config": {"embed_dim": 32, "hidden_size": 64},
    "qwen2_5_vl_text": {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}},
    "qwen2_5_vl.vision_config": {"fullatt_block_indexes": [1], "window_size": 32},
    "paligemma": {"projection_dim": 64, "hidden_size": 64},  # the projector's output is the text model's input
    "vipllava": {"vision_feature_layers": [-2, -1]},  # default (-2, -5, -8, -11, 6): layers the tiny tower lacks
    # LLaVA-NeXT family: one 32x32 grid pinpoint, so a 32x32 image is the base view plus one tile
    "llava_next": {"image_grid_pinpoints": [[32, 32]]},
    "llava_next_video": {"image_grid_pinpoints": [[32, 32]]},
    "llava_onevision": {"image_grid_pinpoints": [[32, 32]]},
    # Llama 3.2 Vision: layer 1 of 3 is a cross-attention layer (default [3, 8, ...] of 40)
    "mllama_text_model": {"num_hidden_layers": 3, "cross_attention_layers": [1]},
    "mllama.vision_config": {"attention_heads": 2, "num_global_layers": 1, "intermediate_layers_indices": [1]},
    "glm4v_text": {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}},
    "glm4v_moe_text": {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5,
                                           "mrope_section": [1, 1, 2]}},
    # Zamba / Zamba2: two hybrid layers, so the shared attention block (one module, tied across the layers
    # that use it; Zamba2 adds per-use adapters) runs twice: layers 2 and 4 / 1 and 3 of 5
    "zamba": {"num_hidden_layers": 5, "attn_layer_period": 2, "attn_layer_offset": 1},
    "zamba2": {"num_hidden_layers": 5, "layers_block_type": ["mamba", "hybrid", "mamba", "hybrid", "mamba"]},
    # Llama 4: the adapter's fc1 reads the pixel-shuffled patches (ratio 0.5: 4 x hidden), as published
    "llama4.vision_config": {"intermediate_size": 128},
    "gemma3": {"mm_tokens_per_image": 4},
    # Conditioning (values only): at the shared vision init 0.05 the tower-folded bf16-merged image-prompt
    # min cosine is 0.99989 (seed 0; 0.99970 / 0.99989 at seeds 1 / 2); at 0.1: 0.99991 (0.99989 / 0.99993)
    "gemma4.vision_config": {"initializer_range": 0.1},  # 32x32 image, 8x8 patches: 16 patches pooled to 4 tokens
    "gemma3.vision_config": {"vision_use_head": False},  # as published Gemma 3 checkpoints
    # Conditioning (values only): at the shared vision init 0.05 the tower-folded bf16-merged image-prompt
    # min cosine is 0.97229 (text prompt 0.99999, float32-merged exact at 6.2e-07); at 0.02: 0.999994, at
    # 0.1: 0.99999. Its language model is MoE (top-2 of 4 experts), where bf16 rounding can flip a route
    "mistral_large4.vision_config": {"initializer_range": 0.02},
    # Conditioning (values only, no effect on which tensors exist or how they are used): Gemma 4 uses
    # attention scaling 1, so scores grow like sqrt(head_dim) and the default global_head_dim 512 saturates
    # a random model's softmax, amplifying bf16 rounding of folded weights (min bf16-merged cosine 0.990).
    # Head dims 8 / 16 keep the real 1:2 sliding/global ratio; with init 0.02 the cosine is >= 0.99993.
    "gemma4_text": {"head_dim": 8, "global_head_dim": 16, "initializer_range": 0.02},
    # the same conditioning for Gemma 4 unified (measured at the defaults: bf16-merged min cosine 0.99893)
    "gemma4_unified_text": {"head_dim": 8, "global_head_dim": 16, "initializer_range": 0.02},
    # Mistral 4 (MLA): head_dim is qk_nope + qk_rope (the rotary part is partial_rotary_factor of it), not the
    # rotary width alone as in DeepSeek's MLA
    "mistral4": {"head_dim": 16},
    # Kimi K2.5: the projector's pre-norm is projection_hidden_size wide and reads the vision tower's output
    "kimi_k25": {"projection_hidden_size": 32},
    # Ernie 4.5 VL MoE: the MoE width is a pair (text experts, vision experts); layer 0 dense, 1 MoE; the
    # image/video start and end ids (not in _SPECIAL_TOKENS) inside the tiny vocab
    "ernie4_5_vl_moe_text": {"moe_intermediate_size": [32, 16], "mlp_layer_types": ["dense", "sparse"],
                             "moe_num_shared_experts": 1,
                             "rope_parameters": {"rope_type": "default", "rope_theta": 5e5, "mrope_section": [3, 3, 2]}},
    "ernie4_5_vl_moe": {"image_start_token_id": 244, "image_end_token_id": 245, "video_start_token_id": 246,
                        "video_end_token_id": 247},
    # Gemma 4 unified: the encoder-free vision embedder reads (patch_size * pooling_kernel_size)^2 * 3 raw pixel
    # channels (6912 by default), the audio embedder audio_embed_dim samples per token
    "gemma4_unified.vision_config": {"patch_size": 2, "pooling_kernel_size": 2, "mm_embed_dim": 64, "mm_posemb_size": 16},
    "gemma4_unified.audio_config": {"audio_embed_dim": 32},
    # Phi-4 multimodal: the image crop, the audio conformer's channels and the side towers' token ids
    "phi4_multimodal.vision_config": {"crop_size": 32, "image_token_id": 250},
    "phi4_multimodal.audio_config": {"ext_pw_out_channel": 32, "depthwise_separable_out_channel": 32,
                                     "nemo_conv_channels": 32, "audio_token_id": 251},
    # conditioning (values only): at init 0.05 the tiny Bailing hybrid's (Kimi Delta Attention layers)
    # bf16-merged min cosine is 0.999889, the tiny CPM-Ant's float32-merged max rel err 1.09e-05
    "bailing_hybrid": {"initializer_range": 0.02},
    "cpmant": {"initializer_range": 0.02},
    "qwen2_5_omni_thinker": {"audio_start_token_id": 246, "audio_end_token_id": 247, "user_token_id": 249},
    "qwen3_omni_moe_thinker": {"audio_start_token_id": 246, "audio_end_token_id": 247, "user_token_id": 249},
    "qwen2_5_omni_text": {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}},
    # Qwen4-exp: layers 0-2 Gated DeltaNet, 3 indexed attention (its QSA indexer needs sizes, default None);
    # hyper-connection rank, n-gram embedding table and per-layer embedding width shrunk
    "qwen4_exp_text": {"num_hidden_layers": 4, "indexer_n_heads": 2, "indexer_kv_heads": 1, "indexer_head_dim": 16,
                       "indexer_budget": 8, "indexer_compress_ratio": 2, "hc_lowrank": 16, "ple_embed_dim": 64,
                       "ngram_vocab_size_base": 256, "make_ngram_vocab_size_divisible_by": 8, "split_ngram_parts": 4,
                       "initializer_range": 0.02},
    # Janus: the aligner and the VQ model's projections write the text model's width; a small VQ codebook
    "janus.vision_config": {"projection_dim": 64, "num_image_tokens": 16},
    "janus.vq_config": {"num_embeddings": 64, "latent_channels": 32, "base_channels": 32, "projection_dim": 64,
                        "image_token_embed_dim": 64},
    # validators of new configs: sizes the tiny shrink leaves inconsistent
    "zaya": {"num_experts_per_tok": 1},  # ZAYA supports top-1 routing only
    "glm5_next_text": {"index_kpool": 2, "qk_rope_head_dim": 0},  # index_topk (4) a multiple of index_kpool; NoPE (DSA)
    "hy_v4_vl_text": {"rope_parameters": {"rope_theta": 1e4, "rope_type": "default", "mrope_section": [2, 1, 1]}},
    "cosmos3_edge_text": {"rope_parameters": {"rope_type": "default", "rope_theta": 1e8, "mrope_section": [2, 3, 3]}},
    "kolibri1_1": {"index_layers": [1], "index_num_heads": 1, "index_pool_size": 64, "index_compression": 2,
                   "index_num_local_tokens": 4, "index_num_sink_tokens": 1, "index_topk": 4},
    "inkling2.vision_config": {"text_hidden_size": 64},
    "nemotron_h_omni.vision_config": {"video_temporal_patch_size": 2},
    "chameleon": {"vocabulary_map": {"<image>": 250}},  # the image placeholder token (default None)
    "emu3": {"vocabulary_map": {"<image>": 250, "<|extra_200|>": 251}},  # image placeholder, end of image line
    "emu3.vq_config": {"codebook_size": 64, "base_channels": 32, "channel_multiplier": [1, 2], "embed_dim": 16,
                       "latent_channels": 16},
    # M-RoPE sections summing to half the tiny head_dim (16)
    "glm_ocr_text": {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}},
    "paddleocr_vl_text": {"rope_parameters": {"rope_type": "default", "rope_theta": 5e5, "mrope_section": [2, 3, 3]}},
    "hunyuan_vl_text": {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}},
    # Cohere Compass: RoPE parameters per layer type (the class default {} has none)
    "cohere_compass_text": {"rope_parameters": {
        t: {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 3, 3]}
        for t in ("full_attention", "sliding_attention")}},
    # XGLM: fields of its own names (d_model, ffn_dim, num_layers, attention_heads)
    "xglm": {"d_model": 64, "ffn_dim": 128, "num_layers": 2, "attention_heads": 4},
    # conditioning (values only): at init 0.05 the tiny LFM3's bf16-merged min cosine is 0.99984
    "lfm3": {"initializer_range": 0.02},
}
# Attributes the modeling code reads but the config class does not declare (published config.json files set
# them): set on the built config
_EXTRA_ATTRS: dict[str, dict[str, Any]] = {
    "qwen2_5_omni_thinker": {"vision_start_token_id": 248},
    "qwen3_omni_moe_thinker": {"vision_start_token_id": 248},
}
# Gated DeltaNet hybrids amplify weight rounding through the recurrence at the shared default init 0.05
# (min logit cosine under 2^-9 relative weight noise 0.96-0.999); at 0.02 it is 0.99999, as llama at 0.05.
for _mt in ("qwen3_next", "qwen3_5_text", "qwen3_5_moe_text"):
    _PER_TYPE[_mt] = {**_PER_TYPE.get(_mt, {}), "initializer_range": 0.02}


def _fields(cfg) -> set[str]:
    return set(cfg.to_dict()) | set(getattr(type(cfg), "attribute_map", {}) or {})


def _shrunk(cls, table: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    default = cls()
    have = _fields(default) | set(getattr(cls, "__dataclass_fields__", {}))
    kw = {k: v for k, v in table.items()
          if k in have and (k not in _KEEP_NONE or getattr(default, k, None) is not None)}
    if "kv_lora_rank" in kw:  # MLA: head_dim is the rotary part, one kv head per query head
        kw["head_dim"] = kw.get("qk_rope_head_dim", kw.get("head_dim"))
        kw["num_key_value_heads"] = kw.get("num_attention_heads")
    for k, v in _TOKEN_IDS.items():
        if k in have:
            kw[k] = v
    return {**kw, **extra}


def _sub_model_type(parent_cls, key: str) -> str | None:
    sub = parent_cls.sub_configs.get(key)
    mt = getattr(sub, "model_type", None)
    return mt or None


def tiny_config(model_type: str, **overrides) -> "transformers.PretrainedConfig":
    """A tiny config of ``model_type``: the class defaults shrunk (``_TEXT_SHRINK``), per-type
    overrides (``_PER_TYPE``), then ``overrides``; sub-configs of multimodal wrappers shrunk too.
    ``text_config.model_type`` in ``overrides`` builds a wrapper around another language model type;
    another dotted key (``vision_config.use_clipped_linears``) sets that sub-config's field."""
    cls = configuration_auto.CONFIG_MAPPING[model_type]
    subs = dict(getattr(cls, "sub_configs", {}) or {})
    if not subs:
        kw = _shrunk(cls, _TEXT_SHRINK, _PER_TYPE.get(model_type, {}))
        kw.update(overrides)
        return _finish(_with_all_layer_kinds(cls, kw, cls(**kw)))
    # a causal LM with side towers but no text_config (Phi-4 multimodal): its own fields are the text model's
    kw: dict[str, Any] = {} if "text_config" in subs else _shrunk(cls, _TEXT_SHRINK, {})
    default = cls()
    text_mt = overrides.pop("text_config.model_type", None)  # another language model inside the wrapper
    for k in [k for k in overrides if "." in k]:  # "vision_config.field": a sub-config's field (a variant)
        head, field = k.split(".", 1)
        overrides[head] = {**overrides.get(head, {}), field: overrides.pop(k)}
    for key in subs:
        sub_mt = getattr(getattr(default, key, None), "model_type", None) or _sub_model_type(cls, key)
        if key == "text_config" and text_mt:
            sub_mt = text_mt
        if sub_mt is None:
            continue
        if key == "text_config":
            sub = tiny_config(sub_mt, **overrides.pop("text_config", {}))
        else:
            table = _AUDIO_SHRINK if "audio" in key else _VISION_SHRINK
            scls = configuration_auto.CONFIG_MAPPING[sub_mt]
            skw = _shrunk(scls, table, {**_PER_TYPE.get(sub_mt, {}), **_PER_TYPE.get(f"{model_type}.{key}", {})})
            skw.update(overrides.pop(key, {}))
            sub = scls(**skw)
        kw[key] = sub.to_dict()
    text = kw.get("text_config", {})
    for key in ("vision_config",):
        vc = kw.get(key)
        if vc is not None and "out_hidden_size" in vc:
            vc["out_hidden_size"] = text.get("hidden_size", 64)  # the merger's output feeds the text model
    for k in _SPECIAL_TOKENS:
        kw[k] = 250 + _SPECIAL_TOKENS.index(k) % 6
    kw.update(_PER_TYPE.get(model_type, {}))
    kw.update(overrides)
    fields = set(getattr(cls, "__dataclass_fields__", {})) | _fields(cls())
    cfg = cls(**{k: v for k, v in kw.items() if k in fields or k.endswith("_config")})
    for k, v in _EXTRA_ATTRS.get(model_type, {}).items():
        setattr(cfg, k, v)
    return _finish(cfg)


def _missing_kinds(cfg, default) -> list[str]:
    want = list(dict.fromkeys(getattr(default, "layer_types", None) or []))
    have = getattr(cfg, "layer_types", None) or []
    return [k for k in want if k not in have]


def _with_all_layer_kinds(cls, kw: dict[str, Any], cfg):
    """Hybrids: every layer kind of the full-size default config must appear in the tiny one.  When the
    shrunk config lost some (e.g. Gemma 3's full-attention layer every 6th), its last layers take them."""
    missing = _missing_kinds(cfg, cls())
    if not missing:
        return cfg
    if "layer_types" in kw:
        raise ValueError(f"tiny {cfg.model_type}: layer kinds {missing} missing from {cfg.layer_types}")
    types = list(cfg.layer_types)
    if len(types) <= len(missing):
        types = [types[0]] + types
    types[len(types) - len(missing):] = missing
    cfg = cls(**{**kw, "num_hidden_layers": len(types), "layer_types": types})
    if _missing_kinds(cfg, cls()):
        raise ValueError(f"tiny {cfg.model_type}: cannot make every layer kind appear ({cfg.layer_types})")
    return cfg


def _finish(cfg):
    cfg._attn_implementation = "eager"
    for c in [cfg] + [getattr(cfg, k) for k in getattr(cfg, "sub_configs", {}) if getattr(cfg, k, None) is not None]:
        c._attn_implementation = "eager"
        if hasattr(c, "use_cache"):
            pass
    return cfg


def auto_class(model_type: str):
    """The Auto class that loads a whole checkpoint of ``model_type`` (multimodal wrappers included)."""
    subs = configuration_auto.CONFIG_MAPPING[model_type].sub_configs
    # a wrapper with an image side (vision tower, or Emu3's VQ model: its causal-LM class is the text model alone)
    if model_type in modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and \
            (subs.get("vision_config") is not None or subs.get("vq_config") is not None):
        return transformers.AutoModelForImageTextToText
    if model_type in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return transformers.AutoModelForCausalLM
    if model_type in modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return transformers.AutoModelForImageTextToText
    raise ValueError(f"{model_type}: no causal-LM or image-text-to-text Auto class in transformers "
                     f"{transformers.__version__}")
