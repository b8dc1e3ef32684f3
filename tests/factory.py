"""Tiny random Hugging Face checkpoints for streamfold's exactness tests.

Everything here runs on CPU with the pinned torch/transformers of the test environment (torch 2.13.0,
transformers 5.24).  It is test-only code: ``streamfold/`` itself never imports torch or transformers.

What it provides
----------------
* ``ARCHS``: architecture name -> :class:`ArchSpec` (a tiny config, the Auto class to load it with, and
  explicit FlashNorm data: every normalization tensor pattern, its convention, the exact consumer tensors
  that read its output and whether it must be folded or left untouched, with the reason).
* ``build_checkpoint(name, out_dir, dtype, seed)``: a random model whose norm weights are far from the
  identity (and whose LayerNorm/linear biases are non-zero), written as three safetensors shards with an
  index: every norm tensor in ``model-00001-of-00003.safetensors``, every other tensor alternating between
  shards 2 and 3 (so a norm never shares a shard with its consumers, and the consumers of one norm are
  spread over two shards).  Tensor names, dtypes and values are exactly what ``save_pretrained`` writes
  (the factory calls ``save_pretrained`` into a temporary directory and re-shards its output), which
  includes transformers 5's reverse key conversions on save (Mixtral ``block_sparse_moe.experts.N.w1``,
  per-expert Qwen2-MoE/DeepSeek tensors, GPT-NeoX ``embed_out``), the omission of a tied ``lm_head`` and
  float32 router tensors kept by ``_keep_in_fp32_modules_strict`` in bf16 checkpoints.
* ``load_model``/``logits``/``greedy``: float32 CPU reference inference with eager attention; loading
  records transformers' loading info (missing/unexpected keys) and its log warnings.
* ``norm_tensor_names(name, path)``: the norm rules expanded against a checkpoint's tensor names
  (``folded_norms``/``untouched_norms`` filter it; ``model_param_name`` maps a checkpoint name to the name
  transformers' loading info uses).

``PRIMARY_ARCHS`` lists the architectures of the brief; ``ARCHS`` also holds the extra variants
``gemma3_hub`` (published Gemma3 key layout), ``stablelm_parallel`` and ``nemotron_nobias``.
The full per-architecture audit behind the norm data is /work/scratch/arch_audit.md (lead: copy it where it
should live).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SAFE_SHARDS = 3
NORM_SHARD = "model-00001-of-00003.safetensors"
INDEX_NAME = "model.safetensors.index.json"
SHARD_NAMES = tuple(f"model-{i:05d}-of-{SAFE_SHARDS:05d}.safetensors" for i in range(1, SAFE_SHARDS + 1))

# Norm module classes by convention, read from the installed modeling files.  Every norm module met while
# building must be listed here (an unknown class is an error, so a new convention cannot slip through).
PLAIN_NORM_CLASSES = frozenset(
    {
        "LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "SmolLM3RMSNorm", "GraniteRMSNorm",
        "Phi3RMSNorm", "MixtralRMSNorm", "Qwen2MoeRMSNorm", "Qwen3MoeRMSNorm", "GptOssRMSNorm",
        "DeepseekV2RMSNorm", "DeepseekV3RMSNorm", "Olmo2RMSNorm", "Glm4RMSNorm",
        "CohereLayerNorm",  # LayerNorm (mean-subtracting) without bias
        "LayerNorm",  # torch.nn.LayerNorm (GPT-NeoX, Phi-2, StarCoder2, StableLM, SigLIP vision tower)
    }
)
ONE_PLUS_W_NORM_CLASSES = frozenset({"GemmaRMSNorm", "Gemma2RMSNorm", "Gemma3RMSNorm", "NemotronLayerNorm1P"})

_PLACEHOLDER = re.compile(r"\{([a-z])\}")


# --------------------------------------------------------------------------------------------------------
# Spec data
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Consumer:
    """A tensor that reads a norm's output.

    ``weight``/``bias`` are checkpoint tensor-name patterns (``{n}`` layer, ``{e}`` expert).  ``input_axis``
    is the axis of ``weight`` that is indexed by the norm's channels (1 for ``nn.Linear`` ``[out, in]``
    weights; 1 for GPT-OSS's fused ``[experts, in, out]`` expert tensors; 0 for Gemma3's ``[in, out]``
    ``mm_input_projection_weight``).  ``bias`` is None when the consumer has no bias in this config.
    """

    weight: str
    input_axis: int = 1
    bias: str | None = None


@dataclass(frozen=True)
class NormRule:
    """One family of norm modules (``module`` pattern; tensors are ``module + '.weight'`` / ``'.bias'``)."""

    module: str
    kind: str  # "rms" | "layernorm" (mean-subtracting)
    convention: str  # "w" (y = w * x_hat) | "1+w" (y = (1 + w) * x_hat)
    has_bias: bool  # LayerNorm bias tensor present in the checkpoint
    # Alternatives: exactly one tuple of consumers must be present for each concrete norm (dense vs MoE
    # layers).  Empty for norms whose output does not go into linears.
    consumers: tuple[tuple[Consumer, ...], ...]
    foldable: bool  # mathematically foldable into its consumers (FLASHNORM.md rules)
    fold: bool  # streamfold is expected to fold it
    reason: str  # why it folds / why it must stay untouched

    @property
    def identity(self) -> float:
        return 0.0 if self.convention == "1+w" else 1.0


@dataclass(frozen=True)
class ArchSpec:
    name: str
    model_type: str
    config: dict[str, Any]
    auto_class: str  # transformers Auto class used to load it
    model_class: str  # concrete class that must come out of the Auto class
    tied: bool
    norms: tuple[NormRule, ...]
    # Whether transformers 5.24 fills every folded norm tensor, when it is missing from a checkpoint
    # ("strict" mode), with that norm's identity (weight: 1, or 0 for "1+w" norms; bias: 0).
    strict_exact: bool
    notes: str = ""
    vision: bool = False  # multimodal: test_inputs() adds pixel_values and image tokens
    # (regex, replacement) applied in order to turn a checkpoint tensor name into the in-memory parameter name
    # that from_pretrained's loading info (missing_keys, ...) reports.  Expert tensors that transformers fuses
    # on load (Mixtral/Qwen-MoE/DeepSeek experts.N.*) have no 1:1 parameter; norms always map 1:1.
    load_renames: tuple[tuple[str, str], ...] = ()
    # (regex, replacement) applied to save_pretrained's tensor names before sharding, to reproduce a layout that
    # transformers loads but a fresh save_pretrained does not write (e.g. the hub's Gemma3 vision tower names).
    save_renames: tuple[tuple[str, str], ...] = ()

    @property
    def text_config(self) -> dict[str, Any]:
        return self.config.get("text_config", self.config)

    @property
    def vocab_size(self) -> int:
        return int(self.text_config["vocab_size"])


def lin(prefix: str, bias: bool = False) -> Consumer:
    """An ``nn.Linear`` consumer ``prefix.weight`` ([out, in]) with optional ``prefix.bias``."""
    return Consumer(prefix + ".weight", 1, prefix + ".bias" if bias else None)


def _rule(module, kind, convention, has_bias, consumers=(), *, structural=True, tied=False, scope=True,
          why_not="", why=""):
    """Build a NormRule; ``fold`` is derived from the structural facts, with the reason recorded.

    A norm folds iff its output goes only into linears (``structural``), its consumer is not a tied
    lm_head, it is in streamfold's scope (language model), and, for a LayerNorm with bias, every consumer
    has a bias to absorb ``W @ beta`` (FLASHNORM.md: "bias folds only into consumers that have a bias").
    """
    alts = tuple(tuple(a) for a in consumers)
    if any(isinstance(c, Consumer) for c in alts):
        raise TypeError("consumers must be a sequence of alternatives (each a sequence of Consumer)")
    foldable = structural and bool(alts)
    reason = why
    if not structural:
        reason = why_not
    elif tied:
        foldable = False
        reason = why_not or "final norm feeds a tied lm_head (the embedding matrix): folding would change the input embeddings"
    elif has_bias and any(c.bias is None for alt in alts for c in alt):
        foldable = False
        reason = why_not or "LayerNorm bias cannot fold: a consumer has no bias to absorb W @ beta"
    fold = foldable and scope
    if foldable and not scope:
        reason = why_not
    if fold and not reason:
        reason = "pre-norm: output read only by the listed linears"
    return NormRule(module, kind, convention, has_bias, alts, foldable, fold, reason)


_QK_NORM = "acts on q/k projection outputs (before RoPE), not on a linear's input"
_POST_NORM = "post-norm: its output is added to the residual stream, not read by a linear"


def _attn_linears(L, bias):
    return [lin(f"{L}self_attn.{p}_proj", bias) for p in "qkv"]


def _mlp_linears(L, bias=False, names=("gate_proj", "up_proj"), mlp="mlp"):
    return [lin(f"{L}{mlp}.{p}", bias) for p in names]


def _final_norm(module, lm_head, tied, kind="rms", conv="w", has_bias=False, lm_bias=False, embed=None):
    """The final norm feeds lm_head; when tied, no lm_head tensor is saved and the consumer recorded is the
    embedding matrix that lm_head reuses (``embed``), so tests can check it is left alone."""
    if tied:
        if embed is None:
            embed = module.rsplit(".", 1)[0] + ".embed_tokens"
        return _rule(module, kind, conv, has_bias, [[lin(embed)]], tied=True)
    return _rule(module, kind, conv, has_bias, [[lin(lm_head, lm_bias)]], why="final norm: read only by the untied lm_head")


def _llama_like(cfg, *, conv="w", q_k_norm=False, prefix="model."):
    L = prefix + "layers.{n}."
    tied = bool(cfg.get("tie_word_embeddings", False))
    bias = bool(cfg.get("attention_bias", False))
    mlp_bias = bool(cfg.get("mlp_bias", False))
    rules = [
        _rule(L + "input_layernorm", "rms", conv, False, [_attn_linears(L, bias)]),
        _rule(L + "post_attention_layernorm", "rms", conv, False, [_mlp_linears(L, mlp_bias)]),
    ]
    if q_k_norm:
        rules += [_rule(L + f"self_attn.{x}_norm", "rms", conv, False, structural=False, why_not=_QK_NORM) for x in "qk"]
    rules.append(_final_norm(prefix + "norm", "lm_head", tied, conv=conv))
    return rules


# ---- configs ----------------------------------------------------------------------------------------
def _base(**kw):
    d = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.05,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    d.update(kw)
    return d


def _make_archs() -> dict[str, ArchSpec]:
    A: dict[str, ArchSpec] = {}

    def add(name, model_type, cfg, rules, *, model_class, auto="AutoModelForCausalLM", strict_exact=True,
            notes="", vision=False, load_renames=(), save_renames=()):
        tied = bool(cfg.get("tie_word_embeddings", False))
        A[name] = ArchSpec(name, model_type, cfg, auto, model_class, tied, tuple(rules), strict_exact, notes, vision,
                           tuple(load_renames), tuple(save_renames))

    # -- Llama family -----------------------------------------------------------------------------------
    c = _base()
    add("llama", "llama", c, _llama_like(c), model_class="LlamaForCausalLM")
    c = _base(tie_word_embeddings=True)
    add("llama_tied", "llama", c, _llama_like(c), model_class="LlamaForCausalLM")
    c = _base(sliding_window=None)
    add("mistral", "mistral", c, _llama_like(c), model_class="MistralForCausalLM")
    c = _base()  # Qwen2Attention hard-codes bias=True on q/k/v (o_proj has none)
    add("qwen2", "qwen2", c, _llama_like(dict(c, attention_bias=True)), model_class="Qwen2ForCausalLM")
    c = _base(head_dim=16)
    add("qwen3", "qwen3", c, _llama_like(c, q_k_norm=True), model_class="Qwen3ForCausalLM")
    c = _base(head_dim=16, tie_word_embeddings=True)
    add("qwen3_tied", "qwen3", c, _llama_like(c, q_k_norm=True), model_class="Qwen3ForCausalLM")
    c = _base(num_hidden_layers=4, no_rope_layer_interval=4, tie_word_embeddings=True)  # layer 3 is NoPE
    add("smollm3", "smollm3", c, _llama_like(c), model_class="SmolLM3ForCausalLM")
    c = _base(embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.0625, logits_scaling=8.0)
    add("granite", "granite", c, _llama_like(c), model_class="GraniteForCausalLM",
        notes="embedding_multiplier, residual_multiplier, attention_multiplier, logits_scaling are config scalars")

    # -- Phi-3: fused qkv_proj / gate_up_proj -------------------------------------------------------------
    c = _base()
    L = "model.layers.{n}."
    add("phi3", "phi3", c, [
        _rule(L + "input_layernorm", "rms", "w", False, [[lin(L + "self_attn.qkv_proj")]]),
        _rule(L + "post_attention_layernorm", "rms", "w", False, [[lin(L + "mlp.gate_up_proj")]]),
        _final_norm("model.norm", "lm_head", False),
    ], model_class="Phi3ForCausalLM")

    # -- Gemma family (1 + w) -----------------------------------------------------------------------------
    c = _base(head_dim=16, num_key_value_heads=1, tie_word_embeddings=True)
    add("gemma", "gemma", c, _llama_like(c, conv="1+w"), model_class="GemmaForCausalLM",
        notes="embeddings scaled by sqrt(hidden_size) (non-persistent buffer)")

    def gemma2_rules(cfg, prefix="model.", q_k_norm=False):
        L = prefix + "layers.{n}."
        tied = bool(cfg.get("tie_word_embeddings", True))
        r = [
            _rule(L + "input_layernorm", "rms", "1+w", False, [_attn_linears(L, False)]),
            _rule(L + "post_attention_layernorm", "rms", "1+w", False, structural=False, why_not=_POST_NORM),
            _rule(L + "pre_feedforward_layernorm", "rms", "1+w", False, [_mlp_linears(L)]),
            _rule(L + "post_feedforward_layernorm", "rms", "1+w", False, structural=False, why_not=_POST_NORM),
        ]
        if q_k_norm:
            r += [_rule(L + f"self_attn.{x}_norm", "rms", "1+w", False, structural=False, why_not=_QK_NORM) for x in "qk"]
        r.append(_final_norm(prefix + "norm", "lm_head", tied, conv="1+w"))
        return r

    c = _base(head_dim=16, query_pre_attn_scalar=16, sliding_window=8, final_logit_softcapping=30.0,
              attn_logit_softcapping=50.0, tie_word_embeddings=True)
    add("gemma2", "gemma2", c, gemma2_rules(c), model_class="Gemma2ForCausalLM",
        notes="sandwich norms; attention and final logit soft-capping")
    g3 = _base(head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
               layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=True)
    add("gemma3_text", "gemma3_text", g3, gemma2_rules(g3, q_k_norm=True), model_class="Gemma3ForCausalLM")

    # Gemma3 multimodal.  In memory: model.language_model.*, model.vision_tower.*, model.multi_modal_projector.*;
    # save_pretrained (5.24) writes the legacy layout language_model.model.*, vision_tower.* (no
    # ".vision_model." level), multi_modal_projector.*, and no lm_head (tied).
    g3_text = dict(g3)
    vis = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=2, image_size=32, patch_size=8, vision_use_head=False, layer_norm_eps=1e-6)
    c = dict(text_config=g3_text, vision_config=vis, mm_tokens_per_image=4, boi_token_index=253,
             eoi_token_index=254, image_token_index=255, tie_word_embeddings=True, initializer_range=0.05)
    vision_scope = "vision side: outside FlashNorm's language-model scope (FLASHNORM.md folds the text decoder)"

    def gemma3_rules(V):
        VL = V + "encoder.layers.{n}."
        return gemma2_rules(g3_text, prefix="language_model.model.", q_k_norm=True) + [
        _rule(VL + "layer_norm1", "layernorm", "w", True,
              [[lin(VL + f"self_attn.{p}_proj", True) for p in "qkv"]], scope=False, why_not=vision_scope),
        _rule(VL + "layer_norm2", "layernorm", "w", True, [[lin(VL + "mlp.fc1", True)]], scope=False,
              why_not=vision_scope),
        _rule(V + "post_layernorm", "layernorm", "w", True, structural=False,
              why_not="output is average-pooled into mm_soft_emb_norm (another norm), not a linear"),
        _rule("multi_modal_projector.mm_soft_emb_norm", "rms", "1+w", False,
              [[Consumer("multi_modal_projector.mm_input_projection_weight", 0, None)]], scope=False,
              why_not=vision_scope + "; consumer is a raw [in, out] matmul weight (input axis 0)"),
        ]

    g3_load = ((r"^language_model\.model\.", "model.language_model."), (r"^vision_tower\.(vision_model\.)?", "model.vision_tower."),
               (r"^multi_modal_projector\.", "model.multi_modal_projector."))
    add("gemma3", "gemma3", c, gemma3_rules("vision_tower."), model_class="Gemma3ForConditionalGeneration",
        auto="AutoModelForImageTextToText", vision=True, load_renames=g3_load,
        notes="tied lm_head -> language_model.model.embed_tokens.weight (not saved)")
    add("gemma3_hub", "gemma3", c, gemma3_rules("vision_tower.vision_model."),
        model_class="Gemma3ForConditionalGeneration", auto="AutoModelForImageTextToText", vision=True,
        load_renames=g3_load, save_renames=((r"^vision_tower\.", "vision_tower.vision_model."),),
        notes="extra variant: the published google/gemma-3-*-it layout (vision_tower.vision_model.*), which 5.24 "
              "loads and re-saves as is, but a freshly built model saves without '.vision_model.'")

    # -- MoE ------------------------------------------------------------------------------------------------
    c = _base(num_local_experts=4, num_experts_per_tok=2, sliding_window=None)
    L = "model.layers.{n}."
    add("mixtral", "mixtral", c, [
        _rule(L + "input_layernorm", "rms", "w", False, [_attn_linears(L, False)]),
        _rule(L + "post_attention_layernorm", "rms", "w", False, [[
            lin(L + "block_sparse_moe.gate"),
            lin(L + "block_sparse_moe.experts.{e}.w1"), lin(L + "block_sparse_moe.experts.{e}.w3"),
        ]]),
        _final_norm("model.norm", "lm_head", False),
    ], model_class="MixtralForCausalLM", load_renames=((r"\.block_sparse_moe\.", ".mlp."),),
        notes="saved with legacy names block_sparse_moe.gate / experts.N.w1,w2,w3 (fused in memory)")

    c = _base(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64,
              decoder_sparse_step=1, mlp_only_layers=[0], qkv_bias=True)
    add("qwen2_moe", "qwen2_moe", c, [
        _rule(L + "input_layernorm", "rms", "w", False, [_attn_linears(L, True)]),
        _rule(L + "post_attention_layernorm", "rms", "w", False, [
            _mlp_linears(L),  # dense layers (mlp_only_layers)
            [lin(L + "mlp.gate"), lin(L + "mlp.experts.{e}.gate_proj"), lin(L + "mlp.experts.{e}.up_proj"),
             lin(L + "mlp.shared_expert.gate_proj"), lin(L + "mlp.shared_expert.up_proj"),
             lin(L + "mlp.shared_expert_gate")],
        ]),
        _final_norm("model.norm", "lm_head", False),
    ], model_class="Qwen2MoeForCausalLM", notes="layer 0 dense (mlp_only_layers=[0]), layer 1 MoE")

    c = _base(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1,
              mlp_only_layers=[0], norm_topk_prob=True)  # head_dim = hidden/heads = 16 (not a config field)
    add("qwen3_moe", "qwen3_moe", c, [
        _rule(L + "input_layernorm", "rms", "w", False, [_attn_linears(L, False)]),
        *[_rule(L + f"self_attn.{x}_norm", "rms", "w", False, structural=False, why_not=_QK_NORM) for x in "qk"],
        _rule(L + "post_attention_layernorm", "rms", "w", False, [
            _mlp_linears(L),
            [lin(L + "mlp.gate"), lin(L + "mlp.experts.{e}.gate_proj"), lin(L + "mlp.experts.{e}.up_proj")],
        ]),
        _final_norm("model.norm", "lm_head", False),
    ], model_class="Qwen3MoeForCausalLM", notes="layer 0 dense (mlp_only_layers=[0]), layer 1 MoE")

    c = _base(num_local_experts=4, num_experts_per_tok=2, intermediate_size=32, head_dim=16, sliding_window=8,
              layer_types=["sliding_attention", "full_attention"], max_position_embeddings=131072,
              attention_bias=True)
    add("gpt_oss", "gpt_oss", c, [
        _rule(L + "input_layernorm", "rms", "w", False, [_attn_linears(L, True)]),
        _rule(L + "post_attention_layernorm", "rms", "w", False, [[
            lin(L + "mlp.router", True),
            Consumer(L + "mlp.experts.gate_up_proj", 1, L + "mlp.experts.gate_up_proj_bias"),
        ]]),
        _final_norm("model.norm", "lm_head", False),
    ], model_class="GptOssForCausalLM",
        notes="experts fused+transposed: gate_up_proj [E, in, out] (input axis 1), gate/up interleaved on out")

    def ds_post(L):
        return [
            _mlp_linears(L),  # first_k_dense_replace dense layers
            [lin(L + "mlp.gate"), lin(L + "mlp.experts.{e}.gate_proj"), lin(L + "mlp.experts.{e}.up_proj"),
             lin(L + "mlp.shared_experts.gate_proj"), lin(L + "mlp.shared_experts.up_proj")],
        ]

    mla = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, num_key_value_heads=4,
               n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=32,
               first_k_dense_replace=1)
    c = _base(**mla, q_lora_rank=None, topk_method="greedy")
    add("deepseek_v2", "deepseek_v2", c, [
        _rule(L + "input_layernorm", "rms", "w", False,
              [[lin(L + "self_attn.q_proj"), lin(L + "self_attn.kv_a_proj_with_mqa")]]),
        _rule(L + "self_attn.kv_a_layernorm", "rms", "w", False, [[lin(L + "self_attn.kv_b_proj")]],
              why="MLA latent norm: kv_b_proj reads it (it normalizes only the kv_lora_rank slice of kv_a_proj_with_mqa's output)"),
        _rule(L + "post_attention_layernorm", "rms", "w", False, ds_post(L)),
        _final_norm("model.norm", "lm_head", False),
    ], model_class="DeepseekV2ForCausalLM",
        notes="q_lora_rank=None (V2-Lite layout: q_proj, no q_a_layernorm); layer 0 dense, layer 1 MoE; "
              "mlp.gate.weight kept float32 in bf16 checkpoints")
    c = _base(**mla, q_lora_rank=32, n_group=2, topk_group=1, num_hidden_layers=3)
    add("deepseek_v3", "deepseek_v3", c, [
        _rule(L + "input_layernorm", "rms", "w", False,
              [[lin(L + "self_attn.q_a_proj"), lin(L + "self_attn.kv_a_proj_with_mqa")]]),
        _rule(L + "self_attn.q_a_layernorm", "rms", "w", False, [[lin(L + "self_attn.q_b_proj")]],
              why="MLA latent norm: q_b_proj reads it"),
        _rule(L + "self_attn.kv_a_layernorm", "rms", "w", False, [[lin(L + "self_attn.kv_b_proj")]],
              why="MLA latent norm: kv_b_proj reads it (kv_lora_rank slice only)"),
        _rule(L + "post_attention_layernorm", "rms", "w", False, ds_post(L)),
        _final_norm("model.norm", "lm_head", False),
    ], model_class="DeepseekV3ForCausalLM",
        notes="layer 0 dense, layers 1-2 MoE; mlp.gate.weight and mlp.gate.e_score_correction_bias float32 "
              "in bf16 checkpoints")

    # -- OLMo2, GLM4, Cohere ---------------------------------------------------------------------------
    c = _base()
    add("olmo2", "olmo2", c, [
        _rule(L + "post_attention_layernorm", "rms", "w", False, structural=False, why_not=_POST_NORM),
        _rule(L + "post_feedforward_layernorm", "rms", "w", False, structural=False, why_not=_POST_NORM),
        *[_rule(L + f"self_attn.{x}_norm", "rms", "w", False, structural=False,
                why_not="acts on the full q/k projection output (heads*head_dim) before RoPE") for x in "qk"],
        _final_norm("model.norm", "lm_head", False),
    ], model_class="Olmo2ForCausalLM")

    c = _base(head_dim=16, attention_bias=True)
    add("glm4", "glm4", c, [
        _rule(L + "input_layernorm", "rms", "w", False, [_attn_linears(L, True)]),
        _rule(L + "post_self_attn_layernorm", "rms", "w", False, structural=False, why_not=_POST_NORM),
        _rule(L + "post_attention_layernorm", "rms", "w", False, [[lin(L + "mlp.gate_up_proj")]]),
        _rule(L + "post_mlp_layernorm", "rms", "w", False, structural=False, why_not=_POST_NORM),
        _final_norm("model.norm", "lm_head", False),
    ], model_class="Glm4ForCausalLM")

    c = _base(use_qk_norm=True, logit_scale=0.0625, layer_norm_eps=1e-5, tie_word_embeddings=True)
    add("cohere", "cohere", c, [
        _rule(L + "input_layernorm", "layernorm", "w", False,
              [_attn_linears(L, False) + _mlp_linears(L)],
              why="parallel block: attention and MLP both read input_layernorm"),
        *[_rule(L + f"self_attn.{x}_norm", "layernorm", "w", False, structural=False,
                why_not=_QK_NORM + "; weight is 2-D [heads, head_dim]") for x in "qk"],
        _final_norm("model.norm", "lm_head", True, kind="layernorm"),
    ], model_class="CohereForCausalLM", notes="logit_scale (config scalar) multiplies logits; LayerNorm without bias")

    # -- LayerNorm + bias families ----------------------------------------------------------------------
    c = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=256, initializer_range=0.05, bos_token_id=1, eos_token_id=2, pad_token_id=0,
             tie_word_embeddings=False, use_parallel_residual=True, attention_bias=True)
    G = "gpt_neox.layers.{n}."
    add("gpt_neox", "gpt_neox", c, [
        _rule(G + "input_layernorm", "layernorm", "w", True, [[lin(G + "attention.query_key_value", True)]]),
        _rule(G + "post_attention_layernorm", "layernorm", "w", True, [[lin(G + "mlp.dense_h_to_4h", True)]]),
        _final_norm("gpt_neox.final_layer_norm", "embed_out", False, kind="layernorm", has_bias=True,
                    embed="gpt_neox.embed_in"),
    ], model_class="GPTNeoXForCausalLM", load_renames=((r"^embed_out\.", "lm_head."),),
        notes="use_parallel_residual=True; lm_head saved as embed_out.weight; query_key_value is per-head interleaved")

    c = _base(num_key_value_heads=4, partial_rotary_factor=0.5, hidden_act="gelu_new", layer_norm_eps=1e-5)
    add("phi", "phi", c, [
        _rule(L + "input_layernorm", "layernorm", "w", True,
              [[*_attn_linears(L, True), lin(L + "mlp.fc1", True)]],
              why="parallel block: attention and MLP both read input_layernorm"),
        _final_norm("model.final_layernorm", "lm_head", False, kind="layernorm", has_bias=True, lm_bias=True),
    ], model_class="PhiForCausalLM", notes="lm_head has a bias; attention output proj is self_attn.dense")

    c = _base(use_bias=True, norm_epsilon=1e-5, sliding_window=None, tie_word_embeddings=True)
    add("starcoder2", "starcoder2", c, [
        _rule(L + "input_layernorm", "layernorm", "w", True, [_attn_linears(L, True)]),
        _rule(L + "post_attention_layernorm", "layernorm", "w", True, [[lin(L + "mlp.c_fc", True)]]),
        _final_norm("model.norm", "lm_head", True, kind="layernorm", has_bias=True),
    ], model_class="Starcoder2ForCausalLM")

    def stablelm_rules(parallel):
        r = []
        if parallel:
            r.append(_rule(L + "input_layernorm", "layernorm", "w", True, [_attn_linears(L, True) + _mlp_linears(L)]))
        else:
            r.append(_rule(L + "input_layernorm", "layernorm", "w", True, [_attn_linears(L, True)]))
            r.append(_rule(L + "post_attention_layernorm", "layernorm", "w", True, [_mlp_linears(L)]))
        r += [_rule(L + f"self_attn.{x}_layernorm.norms.{{h}}", "layernorm", "w", False, structural=False,
                    why_not=_QK_NORM + " (one bias-free LayerNorm per head)") for x in "qk"]
        r.append(_final_norm("model.norm", "lm_head", False, kind="layernorm", has_bias=True))
        return r

    c = _base(use_qkv_bias=True, qk_layernorm=True, use_parallel_residual=False, partial_rotary_factor=0.25,
              layer_norm_eps=1e-5)
    add("stablelm", "stablelm", c, stablelm_rules(False), model_class="StableLmForCausalLM")
    c = dict(c, use_parallel_residual=True)
    add("stablelm_parallel", "stablelm", c, stablelm_rules(True), model_class="StableLmForCausalLM",
        notes="extra variant: parallel residual, no post_attention_layernorm")

    def nemotron_rules(bias):
        return [
            _rule(L + "input_layernorm", "layernorm", "1+w", True, [_attn_linears(L, bias)]),
            _rule(L + "post_attention_layernorm", "layernorm", "1+w", True, [[lin(L + "mlp.up_proj", bias)]]),
            _final_norm("model.norm", "lm_head", False, kind="layernorm", conv="1+w", has_bias=True),
        ]

    nem_note = ("NemotronLayerNorm1P: F.layer_norm(x, weight + 1, bias); _init_weights sets weight to ONES, so a "
                "missing weight loads as scale 2, not the identity")
    c = _base(attention_bias=True, mlp_bias=True, partial_rotary_factor=0.5, hidden_act="relu2", norm_eps=1e-5)
    add("nemotron", "nemotron", c, nemotron_rules(True), model_class="NemotronForCausalLM", strict_exact=False,
        notes="attention_bias/mlp_bias on so both decoder LayerNorm1Ps fold; " + nem_note)
    c = dict(c, attention_bias=False, mlp_bias=False)
    add("nemotron_nobias", "nemotron", c, nemotron_rules(False), model_class="NemotronForCausalLM",
        strict_exact=False, notes="extra variant, Minitron-like (no linear biases): no norm can fold; " + nem_note)
    return A


ARCHS: dict[str, ArchSpec] = _make_archs()
# The architectures named in the brief (ARCHS also holds a few extra variants).
PRIMARY_ARCHS = tuple(n for n in ARCHS if n not in ("stablelm_parallel", "nemotron_nobias", "gemma3_hub"))


# --------------------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------------------
def _transformers():
    import transformers

    return transformers


class _quiet_progress:
    """Silence transformers' tqdm bars (shard writing/loading) for the duration of a block."""

    def __enter__(self):
        lu = _transformers().utils.logging
        self._was = lu.is_progress_bar_enabled()
        lu.disable_progress_bar()

    def __exit__(self, *exc):
        if self._was:
            _transformers().utils.logging.enable_progress_bar()


def make_config(name: str):
    """The transformers config of ``name``; every key given must be a declared field of the config class."""
    tf = _transformers()
    spec = ARCHS[name]
    kw = copy.deepcopy(spec.config)
    classes = tf.CONFIG_MAPPING
    _check_config_keys(classes[spec.model_type], kw, spec.name)
    if "text_config" in kw:
        _check_config_keys(classes["gemma3_text"], kw["text_config"], spec.name + ".text_config")
        vc = dict(kw["vision_config"])
        _check_config_keys(classes[vc.pop("model_type")], vc, spec.name + ".vision_config")
    return tf.AutoConfig.for_model(spec.model_type, **kw)


# Keys some configs accept through **kwargs for backward compatibility (moved into rope_parameters).
_BC_ROPE_KEYS = {"partial_rotary_factor"}


def _check_config_keys(cls, kw, where):
    known = {f.name for f in dataclasses.fields(cls)} | set(getattr(cls, "attribute_map", {}) or {})
    known |= {"model_type"} | _BC_ROPE_KEYS
    bad = sorted(k for k in kw if k not in known)
    if bad:
        raise ValueError(f"{where}: config keys not declared by {cls.__name__}: {bad}")


def _is_norm(mod) -> bool:
    return "Norm" in type(mod).__name__ and isinstance(getattr(mod, "weight", None), torch.nn.Parameter)


def _norm_convention(mod) -> str:
    cls = type(mod).__name__
    if cls in ONE_PLUS_W_NORM_CLASSES:
        return "1+w"
    if cls in PLAIN_NORM_CLASSES:
        return "w"
    raise AssertionError(f"unknown norm class {cls}: add it to PLAIN_NORM_CLASSES or ONE_PLUS_W_NORM_CLASSES")


def far_scales(shape, gen: torch.Generator) -> torch.Tensor:
    """Effective per-channel scales with |s| in [0.5, 0.8] U [1.25, 2.0], a quarter of them negative:
    every channel is at least 20% away from the identity (1) and well away from 0."""
    lo = 0.5 + 0.3 * torch.rand(shape, generator=gen)
    hi = 1.25 + 0.75 * torch.rand(shape, generator=gen)
    mag = torch.where(torch.rand(shape, generator=gen) < 0.5, lo, hi)
    sign = torch.where(torch.rand(shape, generator=gen) < 0.25, -1.0, 1.0)
    return mag * sign


def _nonzero(shape, gen, lo, hi) -> torch.Tensor:
    mag = lo + (hi - lo) * torch.rand(shape, generator=gen)
    return mag * torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)


@torch.no_grad()
def _randomize(model, seed: int) -> list[str]:
    """Norm weights far from identity, LayerNorm and linear biases non-zero, no constant tensor left.

    Returns the qualified names of the norm modules."""
    gen = torch.Generator().manual_seed(10_007 + seed)
    norm_modules = []
    norm_params = set()
    for mname, mod in model.named_modules():
        if not _is_norm(mod):
            continue
        conv = _norm_convention(mod)
        s = far_scales(tuple(mod.weight.shape), gen)
        mod.weight.copy_(s - 1.0 if conv == "1+w" else s)
        norm_params.add(id(mod.weight))
        b = getattr(mod, "bias", None)
        if isinstance(b, torch.nn.Parameter):
            b.copy_(_nonzero(tuple(b.shape), gen, 0.1, 0.5))
            norm_params.add(id(b))
        norm_modules.append(mname)
    std = 0.05
    for pname, p in model.named_parameters():
        if id(p) in norm_params or not p.is_floating_point():
            continue
        if pname.endswith("bias"):  # nn.Linear biases, GPT-OSS router/expert biases
            p.copy_(_nonzero(tuple(p.shape), gen, 0.05, 0.3))
        elif p.numel() > 1 and bool((p == p.reshape(-1)[0]).all()):  # e.g. Gemma3 mm_input_projection_weight
            p.copy_(torch.randn(tuple(p.shape), generator=gen) * std)
    for bname, buf in model.named_buffers():
        if bname.endswith("e_score_correction_bias"):
            buf.copy_(_nonzero(tuple(buf.shape), gen, 0.01, 0.1))
    return norm_modules


def build_model(name: str, dtype: str = "float32", seed: int = 0):
    """The in-memory random model of ``name`` (eager attention, eval mode) exactly as build_checkpoint saves it.

    ``dtype="bfloat16"`` gives a bf16 model (router tensors that transformers keeps in float32 stay float32);
    the values are the float32 model's rounded once."""
    tf = _transformers()
    spec = ARCHS[name]
    config = make_config(name)
    auto = getattr(tf, spec.auto_class)
    with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG state alone
        torch.manual_seed(seed)
        model = auto.from_config(config, dtype=torch.float32, attn_implementation="eager")
        if dtype == "bfloat16":
            target = auto.from_config(make_config(name), dtype=torch.bfloat16, attn_implementation="eager")
    if type(model).__name__ != spec.model_class:
        raise AssertionError(f"{name}: {spec.auto_class} built {type(model).__name__}, expected {spec.model_class}")
    norm_modules = _randomize(model, seed)
    if dtype == "bfloat16":
        with torch.no_grad():
            src = dict(model.named_parameters())
            src.update(dict(model.named_buffers()))
            for n, t in list(target.named_parameters()) + list(target.named_buffers()):
                t.copy_(src[n])  # casts to the target's dtype (bf16, or float32 for keep-in-fp32 tensors)
        model = target
    elif dtype != "float32":
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', not {dtype!r}")
    model.eval()
    model._factory_norm_modules = norm_modules
    model._factory_name = name
    return model


def build_checkpoint(name: str, out_dir, dtype: str = "bfloat16", seed: int = 0, return_model: bool = False):
    """Write the random checkpoint of ``name`` into ``out_dir`` (created; must be empty) and return its Path.

    Files: config.json, generation_config.json, model-0000{1,2,3}-of-00003.safetensors (shard 1 holds every
    norm tensor), model.safetensors.index.json.  No tokenizer.  With ``return_model`` returns (path, model)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty")
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(name, dtype, seed)
    norm_modules = model._factory_norm_modules

    with tempfile.TemporaryDirectory(prefix="sf_factory_") as td, _quiet_progress():
        model.save_pretrained(td, max_shard_size="10GB")
        files = sorted(p.name for p in Path(td).iterdir())
        if "model.safetensors" not in files:
            raise AssertionError(f"{name}: save_pretrained wrote {files}")
        tensors = {}
        with safe_open(str(Path(td) / "model.safetensors"), "pt") as f:
            st_meta = f.metadata() or {"format": "pt"}
            for k in f.keys():
                tensors[k] = f.get_tensor(k)
        for aux in ("config.json", "generation_config.json"):
            if (Path(td) / aux).exists():
                shutil.copyfile(Path(td) / aux, out / aux)

    saved_of = _saved_names_of(model, norm_modules, tensors, name)
    for rx, rep in ARCHS[name].save_renames:
        tensors = {re.sub(rx, rep, k): v for k, v in tensors.items()}
        saved_of = {mp: re.sub(rx, rep, k) for mp, k in saved_of.items()}
    _check_rules_match_modules(name, model, saved_of)
    norm_names = set(saved_of.values())
    assigned: dict[str, str] = {}
    shards: dict[str, dict[str, torch.Tensor]] = {s: {} for s in SHARD_NAMES}
    i = 0
    for k in sorted(tensors):
        if k in norm_names:
            shard = SHARD_NAMES[0]
        else:
            shard = SHARD_NAMES[1 + (i % (SAFE_SHARDS - 1))]
            i += 1
        shards[shard][k] = tensors[k].contiguous()
        assigned[k] = shard
    for sname, content in shards.items():
        save_file(content, str(out / sname), metadata=st_meta)
    total_size = sum(t.numel() * t.element_size() for t in tensors.values())
    total_params = sum(t.numel() for t in tensors.values())
    index = {"metadata": {"total_parameters": total_params, "total_size": total_size},
             "weight_map": dict(sorted(assigned.items()))}
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return (out, model) if return_model else out


def _check_rules_match_modules(name, model, saved_of) -> None:
    """Every norm module must be matched by exactly one NormRule whose kind/convention/bias agree with the
    module's class (so the spec data cannot drift from the modeling code)."""
    mods = dict(model.named_modules())
    for (mname, pn), saved in saved_of.items():
        if pn != "weight":
            continue
        mod = mods[mname]
        rules = [r for r in ARCHS[name].norms if _pattern_regex(r.module + ".weight").match(saved)]
        if len(rules) != 1:
            raise AssertionError(f"{name}: {saved} matched by {len(rules)} norm rules")
        r = rules[0]
        kind = "rms" if "RMSNorm" in type(mod).__name__ else "layernorm"
        has_bias = isinstance(getattr(mod, "bias", None), torch.nn.Parameter)
        got = (kind, _norm_convention(mod), has_bias)
        if (r.kind, r.convention, r.has_bias) != got:
            raise AssertionError(f"{name}: rule {r.module} says {(r.kind, r.convention, r.has_bias)}, "
                                 f"{type(mod).__name__} at {mname} is {got}")


def _saved_names_of(model, modules, tensors, name) -> dict[tuple[str, str], str]:
    """(module, "weight"|"bias") -> saved tensor name.  save_pretrained may rename keys (legacy layouts), so
    each in-memory tensor is matched to the unique saved tensor with identical dtype, shape and values
    (norm values are random, so a match is unambiguous; ambiguity is an error)."""
    by_shape: dict[tuple, list[str]] = {}
    for k, t in tensors.items():
        by_shape.setdefault((t.dtype, tuple(t.shape)), []).append(k)
    mods = dict(model.named_modules())
    out: dict[tuple[str, str], str] = {}
    for m in modules:
        for pn in ("weight", "bias"):
            p = getattr(mods[m], pn, None)
            if not isinstance(p, torch.nn.Parameter):
                continue
            hits = [k for k in by_shape.get((p.dtype, tuple(p.shape)), []) if torch.equal(tensors[k], p.detach())]
            if len(hits) != 1:
                raise AssertionError(f"{name}: {m}.{pn} matches {len(hits)} saved tensors: {hits[:4]}")
            out[(m, pn)] = hits[0]
    return out


def checkpoint_tensor_names(path) -> dict[str, str]:
    """tensor name -> shard file, from the checkpoint's index (or its single model.safetensors)."""
    path = Path(path)
    idx = path / INDEX_NAME
    if idx.exists():
        return dict(json.loads(idx.read_text())["weight_map"])
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: "model.safetensors" for k in f.keys()}


def read_tensors(path, names=None) -> dict[str, torch.Tensor]:
    """Load (some of) a checkpoint's tensors as torch tensors in their stored dtype."""
    from safetensors import safe_open

    path = Path(path)
    wm = checkpoint_tensor_names(path)
    want = set(wm) if names is None else set(names)
    out = {}
    by_file: dict[str, list[str]] = {}
    for k in want:
        by_file.setdefault(wm[k], []).append(k)
    for fname, keys in by_file.items():
        with safe_open(str(path / fname), "pt") as f:
            for k in keys:
                out[k] = f.get_tensor(k)
    return out


# --------------------------------------------------------------------------------------------------------
# Norm metadata expanded against a checkpoint
# --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ConsumerTensor:
    weight: str
    input_axis: int
    bias: str | None


@dataclass(frozen=True)
class NormTensors:
    """One concrete norm module of a checkpoint."""

    module: str
    weight: str
    bias: str | None
    kind: str
    convention: str
    identity: float  # identity value of the weight (bias identity is 0)
    fold: bool
    foldable: bool
    reason: str
    consumers: tuple[ConsumerTensor, ...]
    rule: NormRule = field(repr=False, compare=False, default=None)


def _pattern_regex(pat: str) -> re.Pattern:
    out, pos = [], 0
    for m in _PLACEHOLDER.finditer(pat):
        out.append(re.escape(pat[pos:m.start()]))
        out.append(f"(?P<{m.group(1)}>\\d+)")
        pos = m.end()
    out.append(re.escape(pat[pos:]))
    return re.compile("^" + "".join(out) + "$")


def _expand(pat: str, names, fixed: dict[str, str]) -> list[str]:
    for k, v in fixed.items():
        pat = pat.replace("{" + k + "}", v)
    if not _PLACEHOLDER.search(pat):
        return [pat] if pat in names else []
    rx = _pattern_regex(pat)
    return sorted((n for n in names if rx.match(n)), key=_natural_key)


def _natural_key(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def norm_tensor_names(name: str, path) -> list[NormTensors]:
    """Every norm module of the checkpoint at ``path`` (built for arch ``name``) with its fold decision,
    identity value and concrete consumer tensors.  Raises if the checkpoint disagrees with the spec
    (missing consumer, undeclared/missing bias, a norm shard tensor no rule covers)."""
    spec = ARCHS[name]
    wm = checkpoint_tensor_names(path)
    names = set(wm)
    result: list[NormTensors] = []
    covered: set[str] = set()
    for rule in spec.norms:
        rx = _pattern_regex(rule.module + ".weight")
        matches = sorted((n for n in names if rx.match(n)), key=_natural_key)
        if not matches:
            raise AssertionError(f"{name}: no tensor matches norm pattern {rule.module}.weight")
        for wname in matches:
            fixed = {k: v for k, v in rx.match(wname).groupdict().items()}
            module = wname[: -len(".weight")]
            bname = module + ".bias"
            if rule.has_bias != (bname in names):
                raise AssertionError(f"{name}: {bname} presence disagrees with spec (has_bias={rule.has_bias})")
            consumers: tuple[ConsumerTensor, ...] = ()
            if rule.consumers:
                found = []
                for alt in rule.consumers:
                    cts, ok = [], True
                    for c in alt:
                        ws = _expand(c.weight, names, fixed)
                        if not ws:
                            ok = False
                            break
                        for w in ws:
                            sub = dict(fixed)
                            if "{e}" in c.weight:
                                sub.update(_pattern_regex(c.weight.replace("{n}", fixed.get("n", "{n}"))).match(w).groupdict())
                            b = None
                            if c.bias is not None:
                                b = c.bias
                                for k, v in sub.items():
                                    b = b.replace("{" + k + "}", v)
                                if b not in names:
                                    raise AssertionError(f"{name}: declared consumer bias {b} missing")
                            elif w.endswith(".weight") and w[: -len(".weight")] + ".bias" in names:
                                raise AssertionError(f"{name}: consumer {w} has an undeclared bias")
                            cts.append(ConsumerTensor(w, c.input_axis, b))
                    if ok:
                        found.append(tuple(cts))
                if len(found) != 1:
                    raise AssertionError(f"{name}: {module}: {len(found)} consumer alternatives present (need 1)")
                consumers = found[0]
            covered.add(wname)
            if rule.has_bias:
                covered.add(bname)
            result.append(NormTensors(module, wname, bname if rule.has_bias else None, rule.kind, rule.convention,
                                      rule.identity, rule.fold, rule.foldable, rule.reason, consumers, rule))
    in_norm_shard = {n for n, s in wm.items() if s == NORM_SHARD}
    if in_norm_shard and in_norm_shard != covered:
        raise AssertionError(
            f"{name}: norm rules cover {sorted(covered - in_norm_shard)[:5]} outside the norm shard and miss "
            f"{sorted(in_norm_shard - covered)[:5]}")
    return result


def model_param_name(name: str, ckpt_key: str) -> str:
    """In-memory parameter name (as in from_pretrained's loading info) of checkpoint tensor ``ckpt_key``."""
    for rx, rep in ARCHS[name].load_renames:
        ckpt_key = re.sub(rx, rep, ckpt_key)
    return ckpt_key


def folded_norms(name: str, path) -> list[NormTensors]:
    return [n for n in norm_tensor_names(name, path) if n.fold]


def untouched_norms(name: str, path) -> list[NormTensors]:
    return [n for n in norm_tensor_names(name, path) if not n.fold]


# --------------------------------------------------------------------------------------------------------
# Inference helpers
# --------------------------------------------------------------------------------------------------------
class _LogCapture(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.records: list[str] = []

    def emit(self, record):
        self.records.append(record.getMessage())


def auto_class_for(path) -> str:
    cfg = json.loads((Path(path) / "config.json").read_text())
    mt = cfg.get("model_type")
    for spec in ARCHS.values():
        if spec.model_type == mt:
            return spec.auto_class
    return "AutoModelForCausalLM"


def load_model(path, dtype=torch.float32, with_info: bool = False):
    """from_pretrained with the right Auto class, eager attention, eval mode.

    The loading info (dict with missing_keys, unexpected_keys, mismatched_keys, error_msgs) plus the
    transformers warnings logged while loading (key "log") is attached as ``model.loading_info`` and also
    returned when ``with_info`` is true: ``(model, info)``."""
    tf = _transformers()
    auto = getattr(tf, auto_class_for(path))
    cap = _LogCapture()
    lg = logging.getLogger("transformers")
    lg.addHandler(cap)
    try:
        with _quiet_progress():
            model, info = auto.from_pretrained(str(path), dtype=dtype, attn_implementation="eager",
                                               output_loading_info=True)
    finally:
        lg.removeHandler(cap)
    info = {k: (sorted(v) if isinstance(v, (set, list)) else v) for k, v in dict(info).items()}
    info["log"] = list(cap.records)
    model.eval()
    model.loading_info = info
    return (model, info) if with_info else model


def test_input_ids(name: str, batch: int = 2, seq: int = 12, seed: int = 1234) -> torch.Tensor:
    """Deterministic [batch, seq] token ids in [3, min(vocab, 250)) (no pad/bos/eos/image tokens)."""
    hi = min(ARCHS[name].vocab_size, 250)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, hi, (batch, seq), generator=g)


def test_inputs(name: str, batch: int = 2, seq: int = 12, seed: int = 1234) -> dict[str, torch.Tensor]:
    """Model inputs: ``input_ids`` and, for multimodal specs, image tokens + ``pixel_values``."""
    ids = test_input_ids(name, batch, seq, seed)
    spec = ARCHS[name]
    if not spec.vision:
        return {"input_ids": ids}
    cfg = spec.config
    n_img = int(cfg["mm_tokens_per_image"])
    ids = ids.clone()
    ids[:, 1:1 + n_img] = int(cfg["image_token_index"])
    vc = cfg["vision_config"]
    g = torch.Generator().manual_seed(seed + 1)
    pixels = torch.rand((batch, 3, vc["image_size"], vc["image_size"]), generator=g) * 2 - 1
    return {"input_ids": ids, "pixel_values": pixels}


# Helpers whose names start with "test_": keep pytest from collecting them when a test module imports them.
test_input_ids.__test__ = False
test_inputs.__test__ = False


def _as_model(path_or_model):
    if isinstance(path_or_model, (str, Path)):
        return load_model(path_or_model)
    return path_or_model


def _as_inputs(inputs) -> dict[str, torch.Tensor]:
    if isinstance(inputs, torch.Tensor):
        return {"input_ids": inputs}
    return dict(inputs)


@torch.no_grad()
def logits(path_or_model, inputs) -> torch.Tensor:
    """float32 logits [batch, seq, vocab] of a checkpoint path or a loaded model; ``inputs`` is an id tensor or
    a dict from test_inputs()."""
    model = _as_model(path_or_model)
    kw = _as_inputs(inputs)
    if next(model.parameters()).dtype != torch.float32:
        raise ValueError("logits() expects a float32 model (use load_model(path) or model.float())")
    if "pixel_values" in kw:
        kw["pixel_values"] = kw["pixel_values"].to(torch.float32)
    return model(**kw, use_cache=False).logits.float()


@torch.no_grad()
def greedy(path_or_model, inputs, n: int) -> torch.Tensor:
    """``n`` greedily generated tokens per row ([batch, n]); EOS is suppressed so exactly ``n`` come out."""
    model = _as_model(path_or_model)
    kw = _as_inputs(inputs)
    ids = kw["input_ids"]
    kw.setdefault("attention_mask", torch.ones_like(ids))
    out = model.generate(**kw, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[:, ids.shape[1]:]
