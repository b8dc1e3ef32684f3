"""Regenerate streamfold/rules/families/*.toml from transformers' computation, or check them for drift.

    python tools/derive_rules.py                 # derive + check every family, rewrite the data files
    python tools/derive_rules.py --check         # derive + check, report families whose rules differ (exit 1)
    python tools/derive_rules.py --check --rules-only   # drift of the rules alone, no numerical check (fast)
    python tools/derive_rules.py --only llama    # just these families
    python tools/derive_rules.py --readme        # rewrite README.md's architecture table from the files

Each model type is derived from a tiny random model (streamfold.derive.tiny) under the config variants
below, checked numerically (convert with streamfold, load in transformers, float32-merged logits within
1e-5), and model types whose derived rules are identical share a file. A rule that fails its check is
not written (exit 1 with the reason). What is hand-written here is only data: which model types a file
groups, the config variants worth deriving under (switches that change which tensors exist), a
description for the README, and norms transformers never instantiates (DeepSeek's MTP layer).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
FAMILY_DIR = ROOT / "streamfold" / "rules" / "families"
README = ROOT / "README.md"

# file name -> (description, model types)
FAMILIES: dict[str, tuple[str, list[str]]] = {
    "llama": ("Llama, Mistral, Qwen2/2.5, SmolLM/2/3, Granite, Ernie 4.5, Helium, InternLM3, DiffLlama, Granite SWA, CWM",
              ["llama", "mistral", "qwen2", "smollm3", "granite", "ernie4_5", "helium", "internlm3", "diffllama",
               "granite_swa", "cwm"]),
    "qwen3": ("Qwen3", ["qwen3"]),
    "phi3": ("Phi-3 (fused projections)", ["phi3"]),
    "gemma": ("Gemma (1 + w)", ["gemma"]),
    "gemma2": ("Gemma2, Gemma3 text (1 + w, sandwich norms)", ["gemma2", "gemma3_text"]),
    "gemma3": ("Gemma3 multimodal (language model nested; vision tower folded with --fold-vision)", ["gemma3"]),
    "mixtral": ("Mixtral", ["mixtral"]),
    "qwen2_moe": ("Qwen2-MoE (shared expert and its gate)", ["qwen2_moe"]),
    "qwen3_moe": ("Qwen3-MoE", ["qwen3_moe"]),
    "gpt_oss": ("GPT-OSS (fused [experts, in, out] expert tensors, router bias)", ["gpt_oss"]),
    "deepseek": ("DeepSeek-V2/V3 (MLA latent norms; dense and MoE layers; shared experts)",
                 ["deepseek_v2", "deepseek_v3"]),
    "olmo2": ("OLMo2 (post-norms)", ["olmo2"]),
    "glm4": ("GLM4 (fused gate_up_proj, sandwich post-norms)", ["glm4"]),
    "cohere": ("Cohere / Command-R (bias-free LayerNorm, parallel block)", ["cohere"]),
    "gpt_neox": ("GPT-NeoX / Pythia (LayerNorm with bias)", ["gpt_neox"]),
    "phi": ("Phi-1/1.5/2 (LayerNorm with bias, parallel block, lm_head bias)", ["phi"]),
    "starcoder2": ("StarCoder2 (LayerNorm with bias)", ["starcoder2"]),
    "stablelm": ("StableLM (LayerNorm with bias; sequential or parallel residual)", ["stablelm"]),
    "nemotron": ("Nemotron / Minitron (1 + w LayerNorm with bias)", ["nemotron"]),
    # -- derived from the start (issue 10) --
    "gemma4_text": ("Gemma 4 text (plain w norms, sandwich and per-layer-input norms)", ["gemma4_text"]),
    "gemma4": ("Gemma 4 multimodal (language model nested; vision tower folded with --fold-vision, audio tower "
               "untouched)", ["gemma4"]),
    "gemma3n": ("Gemma 3n multimodal (language model nested; vision and audio towers untouched; derived and "
                "tested with a stand-in vision tower)", ["gemma3n"]),
    "gemma3n_text": ("Gemma 3n text (AltUp, per-layer inputs)", ["gemma3n_text"]),
    "llama4_text": ("Llama 4 text (fused experts and a shared expert)", ["llama4_text"]),
    "llama4": ("Llama 4 multimodal (language model nested; vision tower folded with --fold-vision)", ["llama4"]),
    "qwen3_next": ("Qwen3-Next (1 + w; hybrid Gated DeltaNet / attention layers; MoE)", ["qwen3_next"]),
    "qwen3_5_text": ("Qwen3.5 text (1 + w; hybrid Gated DeltaNet / attention layers)", ["qwen3_5_text"]),
    "qwen3_5": ("Qwen3.5 multimodal (language model nested; vision tower folded with --fold-vision)", ["qwen3_5"]),
    "qwen3_5_moe_text": ("Qwen3.5-MoE text (1 + w; hybrid layers; MoE with shared expert)", ["qwen3_5_moe_text"]),
    "qwen3_5_moe": ("Qwen3.5-MoE multimodal (language model nested; vision tower folded with --fold-vision)",
                    ["qwen3_5_moe"]),
    "qwen3_vl": ("Qwen3-VL (language model nested; vision tower folded with --fold-vision)", ["qwen3_vl"]),
    "qwen3_vl_moe": ("Qwen3-VL-MoE (language model nested; vision tower folded with --fold-vision)",
                     ["qwen3_vl_moe"]),
    "olmo3": ("OLMo 3 (post-norms)", ["olmo3"]),
    "olmoe": ("OLMoE (q/k norms over the full projection, MoE)", ["olmoe"]),
    "glm4_moe": ("GLM-4.5 / GLM4-MoE", ["glm4_moe"]),
    "deepseek_v32": ("DeepSeek-V3.2, GLM-MoE-DSA (MLA, sparse-attention indexer)", ["deepseek_v32", "glm_moe_dsa"]),
    "exaone4": ("EXAONE 4 (post-norms)", ["exaone4"]),
    "seed_oss": ("Seed-OSS", ["seed_oss"]),
    "hunyuan_v1_dense": ("Hunyuan v1 dense", ["hunyuan_v1_dense"]),
    "hunyuan_v1_moe": ("Hunyuan v1 MoE", ["hunyuan_v1_moe"]),
    "apertus": ("Apertus (attention_layernorm / feedforward_layernorm, xIELU MLP)", ["apertus"]),
    "arcee": ("Arcee AFM (ReLU² MLP, no gate)", ["arcee"]),
    "granitemoe": ("Granite MoE", ["granitemoe"]),
    "granitemoeshared": ("Granite MoE with shared experts", ["granitemoeshared"]),
    "granitemoehybrid": ("Granite 4 hybrid (Mamba2 / attention layers, MoE)", ["granitemoehybrid"]),
    "ernie4_5_moe": ("Ernie 4.5 MoE", ["ernie4_5_moe"]),
    "ministral": ("Ministral", ["ministral"]),
    "ministral3": ("Ministral 3", ["ministral3"]),
    "mistral3": ("Mistral 3 multimodal (language model nested; vision tower folded with --fold-vision)",
                 ["mistral3"]),
    "minimax": ("MiniMax-01 (lightning attention hybrid)", ["minimax"]),
    "minimax_m2": ("MiniMax-M2", ["minimax_m2"]),
    "phimoe": ("Phi-3.5-MoE (LayerNorm with bias)", ["phimoe"]),
    "cohere2": ("Cohere2 / Command-R7B (LayerNorm, parallel block)", ["cohere2"]),
    "lfm2": ("LFM2 (hybrid short-conv / attention layers)", ["lfm2"]),
    "falcon_h1": ("Falcon-H1 (attention and Mamba2 in parallel)", ["falcon_h1"]),
    # -- decoder-only batch 2: derived from the start --
    "dbrx": ("DBRX (fused Wqkv, bias-free LayerNorm; MoE input norm kept: experts are matmuls of fused weights)", ["dbrx"]),
    "jetmoe": ("JetMoE (mixture of attention heads and MoE MLP; routers folded)", ["jetmoe"]),
    "jamba": ("Jamba (hybrid Mamba / attention layers, dense and MoE MLPs)", ["jamba"]),
    "bamba": ("Bamba (hybrid Mamba2 / attention layers)", ["bamba"]),
    "nemotron_h": ("Nemotron-H (hybrid Mamba2 / attention / MLP / MoE layers)", ["nemotron_h"]),
    "lfm2_moe": ("LFM2-MoE (hybrid short-conv / attention layers, dense and MoE)", ["lfm2_moe"]),
    "afmoe": ("AFMoE (Arcee; gated attention, q/k norms, post-norms; dense and MoE layers)", ["afmoe"]),
    "cohere2_moe": ("Cohere2 MoE (LayerNorm, parallel attention / MoE block)", ["cohere2_moe"]),
    "kimi_linear": ("Kimi Linear (hybrid Kimi Delta Attention / MLA layers, MoE)", ["kimi_linear"]),
    "falcon_mamba": ("Falcon Mamba (Mamba; weightless B/C/dt RMS norms)", ["falcon_mamba"]),
    "mamba": ("Mamba", ["mamba"]),
    "mamba2": ("Mamba2 (gated RMSNorm before out_proj)", ["mamba2"]),
    "recurrent_gemma": ("RecurrentGemma / Griffin (1 + w; RG-LRU recurrent and attention layers)", ["recurrent_gemma"]),
    "solar_open": ("Solar Open (MoE with shared experts)", ["solar_open"]),
    "mimo_v2_flash": ("MiMo-V2-Flash (dense and MoE layers)", ["mimo_v2_flash"]),
    "hy_v3": ("Hunyuan v3 (q/k norms kept; dense and MoE layers, shared MLP)", ["hy_v3"]),
    "mpt": ("MPT (LayerNorm)", ["mpt"]),
    "opt": ("OPT (LayerNorm with bias; pre-norm layout)", ["opt"]),
    "deepseek_v4": ("DeepSeek-V4 (compressed sparse attention: compressor and indexer; MoE, shared experts)", ["deepseek_v4"]),
    "jais2": ("Jais 2 (LayerNorm, non-gated MLP)", ["jais2"]),
    "persimmon": ("Persimmon (LayerNorm with bias, q/k LayerNorm)", ["persimmon"]),
    "gpt_bigcode": ("GPT-BigCode / StarCoder (LayerNorm with bias, multi-query)", ["gpt_bigcode"]),
    "bloom": ("BLOOM (LayerNorm with bias, embedding LayerNorm)", ["bloom"]),
    "gptj": ("GPT-J (LayerNorm with bias, parallel block)", ["gptj"]),
    "gpt_neo": ("GPT-Neo (LayerNorm with bias)", ["gpt_neo"]),
    "falcon": ("Falcon (LayerNorm with bias; parallel, sequential and 40B/180B ln_attn/ln_mlp layouts)", ["falcon"]),
    "codegen": ("CodeGen (LayerNorm with bias, parallel block, fused qkv)", ["codegen"]),
    "gpt2": ("GPT-2 (LayerNorm with bias; Conv1D weights stored [in, out])", ["gpt2"]),
    "flex_olmo": ("FlexOlmo (post-norms, MoE)", ["flex_olmo"]),
    "glm": ("GLM (fused gate_up_proj)", ["glm"]),
    "vaultgemma": ("VaultGemma (1 + w; no post-norms)", ["vaultgemma"]),
    "bitnet": ("BitNet, unquantized weights (attn/ffn sub-norms fold into o_proj / down_proj)", ["bitnet"]),
    "exaone": ("EXAONE 3 / 3.5 (checkpoint names transformer.h.*)", ["exaone"]),
    "minicpm3": ("MiniCPM3 (MLA latent norms)", ["minicpm3"]),
    "exaone_moe": ("EXAONE MoE, dots.llm1 (q/k norms; dense and MoE layers; shared experts)", ["exaone_moe", "dots1"]),
    "granitemoe_swa": ("Granite MoE SWA (fused experts, shared MLP)", ["granitemoe_swa"]),
    "glm4_moe_lite": ("GLM4-MoE-Lite (MLA latent norms; dense and MoE layers; shared experts)", ["glm4_moe_lite"]),
    # -- vision-language wrappers (issue 20): derived through the wrapper, traced and checked on a prompt
    # with an image (streamfold/derive/pixels.py); towers kept whole by prefix, folded with --fold-vision
    # where they have vision_folds --
    "qwen2_vl": ("Qwen2-VL (language model nested; vision tower folded with --fold-vision)", ["qwen2_vl"]),
    "llava": ("LLaVA 1.5 (language model nested; vision tower folded with --fold-vision)", ["llava"]),
    "qwen2_5_vl": ("Qwen2.5-VL (language model nested; vision tower folded with --fold-vision)", ["qwen2_5_vl"]),
    "llava_next": ("LLaVA-NeXT (language model nested; vision tower folded with --fold-vision)", ["llava_next"]),
    "llava_onevision": ("LLaVA-OneVision (language model nested; vision tower folded with --fold-vision)",
                        ["llava_onevision"]),
    "llava_next_video": ("LLaVA-NeXT-Video (language model nested; vision tower folded with --fold-vision)",
                         ["llava_next_video"]),
    "vipllava": ("ViP-LLaVA (language model nested; vision tower and projector folded with --fold-vision)",
                 ["vipllava"]),
    "mllama": ("Llama 3.2 Vision (cross-attention layers; vision model folded with --fold-vision)", ["mllama"]),
    "idefics2": ("Idefics2 (language model nested; vision model and perceiver connector folded with --fold-vision)",
                 ["idefics2"]),
    "idefics3": ("Idefics3, SmolVLM (language model nested; vision model folded with --fold-vision)",
                 ["idefics3", "smolvlm"]),
    "paligemma": ("PaliGemma 1 and 2 (Gemma or Gemma 2 language model; vision tower folded with --fold-vision)",
                  ["paligemma"]),
    "aya_vision": ("Aya Vision (Cohere2 language model, parallel block; vision tower folded with --fold-vision)",
                   ["aya_vision"]),
    "internvl": ("InternVL (Qwen2, Qwen3 or Llama language model; vision tower folded with --fold-vision)",
                 ["internvl"]),
    "glm4v": ("GLM-4V, GLM-4.6V (language model nested; vision tower folded with --fold-vision)",
              ["glm4v", "glm46v"]),
    "glm4v_moe": ("GLM-4.5V (MoE language model nested; vision tower folded with --fold-vision)", ["glm4v_moe"]),
    "lfm2_vl": ("LFM2-VL (hybrid short-conv / attention language model; vision tower untouched, --fold-vision refused)",
                ["lfm2_vl"]),
    "cohere2_vision": ("Command A Vision (Cohere2 language model; vision tower folded with --fold-vision)",
                       ["cohere2_vision"]),
    "doge": ("Doge (dynamic mask attention, q/k norms kept)", ["doge"]),
    "olmo_hybrid": ("OLMo hybrid (Gated DeltaNet / attention layers; post-norm attention layers)", ["olmo_hybrid"]),
    "zamba": ("Zamba (Mamba layers and a shared attention block)", ["zamba"]),
    "hy_v4": ("Hunyuan v4 (MLA with an indexer and a gated attention output; MoE with shared experts)", ["hy_v4"]),
    "laguna": ("Laguna (gated attention, q/k norms; MoE with shared expert)", ["laguna"]),
    "biogpt": ("BioGPT (LayerNorm with bias)", ["biogpt"]),
    "longcat_flash": ("LongCat-Flash (two attention / MLP blocks per layer, MLA, shortcut MoE)", ["longcat_flash"]),
    "lfm3": ("LFM3 (hybrid short-conv / gated attention layers, post-norms)", ["lfm3"]),
    "zamba2": ("Zamba2 (Mamba2 layers and shared attention blocks)", ["zamba2"]),
    # -- issue 20, items 1 and 4: the remaining types (tools/triage_types.py lists what no file claims) --
    "mistral4": ("Mistral 4 (MLA latent norms; MoE with shared experts)", ["mistral4"]),
    "mistral_large4": ("Mistral Large 4 (language model nested; vision tower folded with --fold-vision)", ["mistral_large4"]),
    "kimi_k25": ("Kimi K2.5 (DeepSeek-V3 language model nested; vision tower and projector folded with --fold-vision)",
                 ["kimi_k25"]),
    "xglm": ("XGLM (LayerNorm with bias)", ["xglm"]),
    "ernie4_5_vl_moe": ("Ernie 4.5 VL MoE (text and vision experts; language model nested; vision tower untouched, "
                        "--fold-vision refused)", ["ernie4_5_vl_moe"]),
    "apertus1p5_text": ("Apertus 1.5 text (attention_layernorm / feedforward_layernorm; q/k norms kept)", ["apertus1p5_text"]),
    "aria_text": ("Aria text", ["aria_text"]),
    "axk1": ("A.X K1 (MLA latent norms; post-MLP norms kept)", ["axk1"]),
    "axk2": ("A.X K2 (MLA; q_a and k norms kept)", ["axk2"]),
    "bailing_hybrid": ("Bailing hybrid (Kimi Delta Attention / MLA layers; output norm kept)", ["bailing_hybrid"]),
    "beam": ("Beam (sandwich norms; q/k norms kept)", ["beam"]),
    "cpmant": ("CPM-Ant (layernorm_before_attention / layernorm_before_ffn)", ["cpmant"]),
    "flint": ("Flint (q/k norms kept)", ["flint"]),
    "gpt_sw3": ("GPT-SW3 (LayerNorm with bias; Conv1D weights)", ["gpt-sw3"]),
    "gpt_neox_japanese": ("GPT-NeoX Japanese (LayerNorm with bias)", ["gpt_neox_japanese"]),
    "hyperclovax": ("HyperCLOVA X (post-norms kept)", ["hyperclovax"]),
    "inkling_text": ("Inkling text (embedding and q/k norms kept)", ["inkling_text"]),
    "iquestcoder": ("IQuest-Coder", ["iquestcoder"]),
    "kolibri1": ("Kolibri 1 (MoE; q/k and post-norms kept)", ["kolibri1"]),
    "mellum": ("Mellum (q/k norms kept)", ["mellum"]),
    "minicpm5_moe": ("MiniCPM5 MoE", ["minicpm5_moe"]),
    "minimax_m3_vl_text": ("MiniMax-M3 VL text (q/k norms kept)", ["minimax_m3_vl_text"]),
    # nothing to fold (the reason is the trace's: streamfold.derive.api.nothing_to_fold_reason)
    "olmo": ("OLMo 1 (weightless LayerNorms: nothing to fold)", ["olmo"]),
    "nanochat": ("nanochat (weightless RMS norms: nothing to fold)", ["nanochat"]),
    "hrm_text": ("HRM text (weightless norms: nothing to fold)", ["hrm_text"]),
    "dory": ("Dory (weightless norms: nothing to fold)", ["dory"]),
    "qwen4_exp_text": ("Qwen4-exp text (hyper-connection norms mixed across streams, q/k and gated norms: nothing to fold)",
                       ["qwen4_exp_text"]),
    "qwen4_exp": ("Qwen4-exp multimodal (nothing to fold in its language model)", ["qwen4_exp"]),
    "openai_gpt": ("GPT-1 (post-norm LayerNorms: nothing to fold)", ["openai-gpt"]),
    "param2moe": ("Param2 MoE (attention input norm kept; q/k norms kept)", ["param2moe"]),
    "rwkv": ("RWKV (final norm into the untied head only)", ["rwkv"]),
    "sarvam_mla": ("Sarvam MLA (MLA latent norms; MoE with shared experts)", ["sarvam_mla"]),
    "sarvam_moe": ("Sarvam MoE (attention input norm kept: its v_proj is not saved under the traced name; q/k norms kept)", ["sarvam_moe"]),
    "youtu": ("Youtu (MLA latent norms)", ["youtu"]),
    "aria": ("Aria (MoE language model nested; vision tower and projector untouched)", ["aria"]),
    "video_llava": ("Video-LLaVA (Llama language model nested; image and video towers untouched)", ["video_llava"]),
    "video_llama_3": ("VideoLLaMA 3 (Qwen2 language model nested; vision model untouched)", ["video_llama_3"]),
    "llava_onevision1_5": ("LLaVA-OneVision-1.5 (Qwen3 language model nested; vision tower untouched)", ["llava_onevision1_5"]),
    "exaone4_5": ("EXAONE 4.5 (exaone4 language model nested; other towers untouched)", ["exaone4_5"]),
    "fuyu": ("Fuyu (persimmon language model nested; other towers untouched)", ["fuyu"]),
    "glmga": ("GLM-GA (glm4v_text language model nested; other towers untouched)", ["glmga"]),
    "granite_docling": ("Granite Docling (language model nested; vision model untouched)", ["granite_docling"]),
    "hyperclovax_vision_v2": ("HyperCLOVA X Vision v2 (hyperclovax language model nested; other towers untouched)", ["hyperclovax_vision_v2"]),
    "lfm3_vl": ("LFM3-VL (lfm3 language model nested; other towers untouched)", ["lfm3_vl"]),
    "lighton_ocr": ("LightOnOCR (qwen3 language model nested; other towers untouched)", ["lighton_ocr"]),
    "minicpm_ocr": ("MiniCPM OCR (qwen3_5_text language model nested; other towers untouched)", ["minicpm_ocr"]),
    "minicpmv4_6": ("MiniCPM-V 4.6 (qwen3_5_text language model nested; other towers untouched)", ["minicpmv4_6"]),
    "minicpmv4_7": ("MiniCPM-V 4.7 (qwen3_5_text language model nested; other towers untouched)", ["minicpmv4_7"]),
    "minimax_m3_vl": ("MiniMax-M3 VL (language model nested; vision tower untouched)", ["minimax_m3_vl"]),
    "moss_transcribe_diarize": ("MOSS transcribe-diarize (qwen3 language model nested; other towers untouched)", ["moss_transcribe_diarize"]),
    "muse_glimmer": ("Muse Glimmer (language model nested; towers untouched)", ["muse_glimmer"]),
    "zaya": ("ZAYA (top-1 MoE)", ["zaya"]),
    "cosmos3_edge": ("Cosmos 3 Edge (language model nested; vision tower untouched)", ["cosmos3_edge"]),
    "glm5_next": ("GLM-5 Next (DSA language model nested; vision tower untouched)", ["glm5_next"]),
    "chameleon": ("Chameleon (q/k LayerNorms kept; VQ image model untouched)", ["chameleon"]),
    "emu3": ("Emu3 (language model nested; VQ image model untouched)", ["emu3"]),
    "glm_ocr": ("GLM-OCR (language model nested; vision tower untouched)", ["glm_ocr"]),
    "cohere_compass_text": ("Cohere Compass text (LayerNorm, parallel block)", ["cohere_compass_text"]),
    "cohere_compass": ("Cohere Compass / North vision (language model nested; vision tower untouched)", ["cohere_compass"]),
    "deepseek_vl": ("DeepSeek-VL (Llama language model nested; vision model and aligner untouched)", ["deepseek_vl"]),
    "janus": ("Janus (Llama language model nested; vision model folded with --fold-vision, aligner and VQ image "
              "model untouched)", ["janus"]),
    "qwen2_5_omni_thinker": ("Qwen2.5-Omni thinker (language model nested; vision tower folded with --fold-vision, audio tower untouched)",
                             ["qwen2_5_omni_thinker"]),
    "qwen3_omni_moe_thinker": ("Qwen3-Omni MoE thinker (language model nested; vision tower folded with --fold-vision, audio tower untouched)",
                               ["qwen3_omni_moe_thinker"]),
    "phi4_multimodal": ("Phi-4 multimodal (vision and audio embedders untouched)", ["phi4_multimodal"]),
}

# multimodal wrappers whose language model can be of several types (their text_config is any
# AutoConfig): the language model types each is derived and checked with, besides its default; the
# family records them as text_model_types and the planner refuses any other (published checkpoints'
# text models; Gemma inside LLaVA would multiply by 1 + w where Llama's norms multiply by w)
TEXT_MODELS: dict[str, list[str]] = {
    "llava": ["llama", "mistral", "qwen2"],
    "llava_next": ["llama", "mistral", "qwen2", "granite"],
    "llava_onevision": ["qwen2"],
    "llava_next_video": ["llama", "mistral", "qwen2"],
    "vipllava": ["llama"],
    "idefics2": ["mistral"],
    "idefics3": ["llama"],
    "smolvlm": ["llama"],
    "paligemma": ["gemma", "gemma2"],  # PaliGemma 2: Gemma 2's post_attention_layernorm is a post-norm
    "aya_vision": ["cohere2"],
    "internvl": ["qwen2", "qwen3", "llama"],
    "cohere2_vision": ["cohere2"],
    "kimi_k25": ["deepseek_v3"],
    "video_llava": ["llama"],
    "video_llama_3": ["qwen2"],
    "llava_onevision1_5": ["qwen3"],
    "janus": ["llama"],
    "deepseek_vl": ["llama"],
    "exaone4_5": ["exaone4"],
    "fuyu": ["persimmon"],
    "glmga": ["glm4v_text"],
    "hyperclovax_vision_v2": ["hyperclovax"],
    "lfm3_vl": ["lfm3"],
    "lighton_ocr": ["qwen3"],
    "minicpm_ocr": ["qwen3_5_text"],
    "minicpmv4_6": ["qwen3_5_text"],
    "minicpmv4_7": ["qwen3_5_text"],
    "moss_transcribe_diarize": ["qwen3"],
    "ovis2_5": ["qwen3"],
}

# data files of model types out of scope (streamfold.derive.scope): refused with the reason, nothing derived
SCOPE_FILES = ("encoders", "encoder_decoders")

# config switches that change which tensors exist or where a norm's output goes: derive under each
VARIANTS: dict[str, list[dict]] = {
    # Falcon: linear biases (off by default, so no LayerNorm bias could fold), the 40B/180B layout
    # (ln_attn / ln_mlp) and Falcon-RW's sequential block (post_attention_layernorm)
    "falcon": [{"bias": True}, {"new_decoder_architecture": True, "bias": True},
               {"parallel_attn": False, "bias": True}],
    # biased consumers let a LayerNorm with bias fold, so its strict mode is tried for real
    "stablelm": [{"use_parallel_residual": True}, {"qk_layernorm": True}, {"use_qkv_bias": True}],
    "nemotron": [{"attention_bias": True, "mlp_bias": True}],
    "phimoe": [{"attention_bias": True, "lm_head_bias": True}],
    "phi": [{"qk_layernorm": True}],
    "cohere": [{"use_qk_norm": True}],
    "qwen2_moe": [{"mlp_only_layers": [0]}],
    "qwen3_moe": [{"mlp_only_layers": [0]}],
    "deepseek_v2": [{"q_lora_rank": None}],
    "deepseek_v3": [{"q_lora_rank": None}],
    "glm4_moe_lite": [{"q_lora_rank": None}],
    "minicpm3": [{"q_lora_rank": None}],
    "chameleon": [{"swin_norm": True}],  # Chameleon-30B: norms after attention / MLP (post-norms)
    # Gemma 4's vision linears can clamp their input (use_clipped_linears): the tower's norms fold only
    # into unclipped ones
    "gemma4": [{"vision_config.use_clipped_linears": True}],
}

_MTP_WHY = ("multi-token-prediction module: eh_proj reads the concatenation of two norms; transformers does "
            "not instantiate it, so this rule is hand-written")
# norms of checkpoints that transformers never builds (so no trace can see them)
EXTRA_KEEP: dict[str, list[dict]] = {
    "deepseek_v2": [{"norm": f"model.layers.{{n}}.{x}", "why": _MTP_WHY} for x in ("enorm", "hnorm", "shared_head.norm")],
    "deepseek_v3": [{"norm": f"model.layers.{{n}}.{x}", "why": _MTP_WHY} for x in ("enorm", "hnorm", "shared_head.norm")],
}

# appended to the why of a wrapper's `keep {under}` rule (data the trace cannot see)
_STANDIN_WHY = ("; transformers builds it with timm (MobileNetV5), which cannot be imported here, so the tiny "
                "model derived and tested has a small stand-in tower in its place (streamfold/derive/standin.py); "
                "kept whole by prefix, its contents are never inspected")
UNDER_NOTES: dict[str, dict[str, str]] = {"gemma3n": {"model.vision_tower.": _STANDIN_WHY}}


def _rules_only(fam: dict, skip: tuple[str, ...] = ()) -> dict:
    """What drift compares: everything but the description and the measurement record."""
    return {k: v for k, v in fam.items() if k not in ("description", "derived", *skip)}


def _vision_record(derived: dict, mt: str, results) -> None:
    """The tower-folded check's errors (streamfold.derive.vision), text and image prompts."""
    for key, attr in (("vision_max_rel_err", "vision_rel"), ("vision_strict_max_rel_err", "vision_strict_rel")):
        got = [getattr(r, attr) for r in results if getattr(r, attr) is not None]
        if got:
            derived.setdefault(key, {})[mt] = float(f"{max(got):.2e}")


class DeriveError(Exception):
    """A model type whose rules could not be derived or failed their check."""


def derive_group(name: str, description: str, model_types: list[str], log, check: bool = True) -> dict[str, dict]:
    """{file name: family} for one group: members with identical rules share a file. ``check=False``
    derives without the numerical check (no error record: for drift of the rules only)."""
    import transformers

    from streamfold.derive.api import derive_family, tie_default
    from streamfold.derive.pixels import PIXELS
    out: dict[str, dict] = {}
    for mt in model_types:
        try:
            fam, results = derive_family(mt, VARIANTS.get(mt), check=check, text_models=TEXT_MODELS.get(mt),
                                         vision=mt in PIXELS)  # wrappers: the tower too (--fold-vision)
        except Exception as e:  # a model transformers cannot build or run tiny: reported, not written
            raise DeriveError(f"{mt}: cannot derive: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        for r in results:
            if not r.ok:
                raise DeriveError(f"{mt}: check failed, not written: {'; '.join(r.errors)}")
        if mt in EXTRA_KEEP:
            fam.setdefault("keep", []).extend(EXTRA_KEEP[mt])
        for k in fam.get("keep", []):
            if k.get("under") in UNDER_NOTES.get(mt, {}):
                k["why"] += UNDER_NOTES[mt][k["under"]]
        if fam.get("nothing_to_fold"):  # no numbers: nothing converts (refused with the reason, exit 5)
            log(f"{mt}: nothing to fold: {fam['nothing_to_fold']}")
            out[name] = {**fam, "description": description, "model_types": [mt],
                         "derived": {"transformers": transformers.__version__}}
            continue
        rel = max((r.compat_rel for r in results), default=float("nan"))
        strict = [r.strict_rel for r in results if r.strict_rel is not None]
        log(f"{mt}: compat {rel:.1e}" + (f", strict {max(strict):.1e}" if strict else "")
            + (" (strict refused)" if fam.get("strict_refused") else ""))
        fam.pop("tie_default", None)
        key = json.dumps(_rules_only({**fam, "model_types": []}), sort_keys=True)
        target = next((n for n, f in out.items() if f["_key"] == key), None)
        if target is None:
            target = name if not out else mt
            out[target] = {"_key": key, "description": description if not out else mt, **fam,
                           "model_types": [], "derived": {"transformers": transformers.__version__,
                                                          "compat_max_rel_err": {}, "strict_max_rel_err": {}}}
        f = out[target]
        f["model_types"].append(mt)
        lay_rel = {k: v for r in results for k, v in r.layouts_rel.items()}
        if lay_rel:  # errors of the other name layouts transformers loads (streamfold.derive.layouts)
            f["derived"].setdefault("layouts_max_rel_err", {})[mt] = lay_rel
        f["derived"]["compat_max_rel_err"][mt] = float(f"{rel:.2e}")
        _vision_record(f["derived"], mt, results)
        if strict:
            f["derived"]["strict_max_rel_err"][mt] = float(f"{max(strict):.2e}")
    for f in out.values():
        if f.get("nothing_to_fold"):
            continue
        del f["_key"]
        tied = [m for m in f["model_types"] if tie_default(m)]
        if tied:
            f["tie_default"] = True if tied == f["model_types"] else tied
        if not f["derived"]["strict_max_rel_err"]:
            del f["derived"]["strict_max_rel_err"]
    return out


def _stored(folder: Path = FAMILY_DIR) -> dict[str, dict]:
    from streamfold.rules.schema import load_rules_file
    return {p.stem: load_rules_file(p)[p.stem] for p in sorted(folder.glob("*.toml"))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="report drift against the stored files; write nothing")
    ap.add_argument("--rules-only", action="store_true",
                    help="with --check: derive without the numerical check (tests/test_families.py checks the "
                         "stored rules numerically)")
    ap.add_argument("--readme", action="store_true", help="only regenerate README.md's table from the files")
    ap.add_argument("--only", nargs="+", metavar="FAMILY", help="just these families (encoders and "
                    "encoder_decoders: the out-of-scope files)")
    ap.add_argument("--families-dir", type=Path, default=FAMILY_DIR, help="the data files (default: streamfold's)")
    args = ap.parse_args(argv)
    if args.rules_only and not args.check:
        ap.error("--rules-only needs --check (files are written only from checked derivations)")
    folder = args.families_dir
    if args.readme:
        from streamfold.derive.readme import update_readme
        update_readme(README, _stored(folder))
        return 0
    from streamfold.derive.tomlout import family_toml
    names = args.only or list(FAMILIES) + list(SCOPE_FILES)
    stored = _stored(folder)
    drift, failed, produced = [], [], set()
    if any(n in SCOPE_FILES for n in names):  # out-of-scope types, from transformers' mappings
        from streamfold.derive.scope import out_of_scope
        known = {m for n, f in stored.items() if n not in SCOPE_FILES for m in f["model_types"]}
        for fname, fam in out_of_scope(known).items():
            if fname not in names:
                continue
            produced.add(fname)
            if args.check:
                if fname not in stored or _rules_only(stored[fname]) != _rules_only(fam):
                    drift.append(fname)
                    print(f"DRIFT {fname}: derived model types differ from {folder / (fname + '.toml')}",
                          file=sys.stderr)
                continue
            header = ("Generated by tools/derive_rules.py from transformers' model mappings; review like code.\n"
                      "Regenerate with `python tools/derive_rules.py --only " + fname + "`.")
            (folder / f"{fname}.toml").write_text(family_toml(fam, header))
            print(f"wrote {folder / (fname + '.toml')}", file=sys.stderr)
    total = len(names)
    names = [n for n in names if n not in SCOPE_FILES]
    for name in names:
        desc, mts = FAMILIES[name]
        try:
            got = derive_group(name, desc, mts, lambda m: print(f"  {m}", file=sys.stderr), check=not args.rules_only)
        except DeriveError as e:
            failed.append(name)
            print(f"FAILED {e}", file=sys.stderr)
            continue
        for fname, fam in got.items():
            produced.add(fname)
            if args.check:
                # strict_refused is the numerical check's finding: --rules-only cannot compare it
                skip = ("strict_refused",) if args.rules_only else ()
                if fname not in stored or _rules_only(stored[fname], skip) != _rules_only(fam, skip):
                    drift.append(fname)
                    print(f"DRIFT {fname}: derived rules differ from {folder / (fname + '.toml')}", file=sys.stderr)
                continue
            header = ("Generated by tools/derive_rules.py from transformers' computation; review like code.\n"
                      "Regenerate with `python tools/derive_rules.py --only " + name + "`.")
            (folder / f"{fname}.toml").write_text(family_toml(fam, header))
            print(f"wrote {folder / (fname + '.toml')}", file=sys.stderr)
    if args.check and not args.only and not failed:
        for fname in sorted(set(stored) - produced):  # a data file no family of this tool writes
            drift.append(fname)
            print(f"DRIFT {fname}: {folder / (fname + '.toml')} is derived by no family here", file=sys.stderr)
    if failed:
        print(f"{len(failed)} families not derived: {', '.join(failed)}")
    if args.check:
        print(f"{len(drift)} of {total} families drifted" + (f": {', '.join(drift)}" if drift else ""))
        return 1 if drift or failed else 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
