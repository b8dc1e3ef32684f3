"""Tiny random transformers models for deriving and testing FlashNorm rules (development time only).

Imports torch and transformers: only ``tools/``, ``derive-rules`` (the ``derive`` extra) and the tests use it;
streamfold's runtime core never imports this module.

- ``tiny_config(model_type, **overrides)``: the config class's own defaults shrunk to tiny dimensions
  (hidden 64, 2-4 layers, 4 heads, vocab 256, 4 experts), eager attention, torch fallbacks for kernels
  that need CUDA or optional packages, every layer kind of a hybrid present, tiny vision/audio towers for
  multimodal wrappers.  Per-type overrides live in ``_PER_TYPE`` (data).
- ``build_tiny_model(model_type, seed)`` / ``build_tiny_model(config=...)``: float32, random weights;
  every norm's effective scale is far from the identity (plain ``w``: |g| in [0.5, 0.8] U [1.25, 2],
  ``1 + w``: the same for ``1 + w``), LayerNorm and linear biases non-zero.
- ``find_norms(model)``: norm modules found by structure and checked numerically (see its docstring);
  the ``w`` vs ``1 + w`` convention is measured, never read from a class name.
- ``save_sharded(model, out_dir, dtype)``: ``save_pretrained`` names, re-sharded so every norm tensor is
  in shard 1 and everything else alternates between shards 2 and 3.
- ``auto_class(model_type)``, ``example_inputs(model, seed)``.
"""
from __future__ import annotations

import copy
import inspect
import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoConfig
from transformers.models.auto import configuration_auto, modeling_auto

SHARDS = 3
SHARD_NAMES = tuple(f"model-{i:05d}-of-{SHARDS:05d}.safetensors" for i in range(1, SHARDS + 1))
NORM_SHARD = SHARD_NAMES[0]
INDEX_NAME = "model.safetensors.index.json"

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
    "glm4_moe": {"num_hidden_layers": 2},
    "ernie4_5_moe": {"moe_layer_end_index": 1},
    "hunyuan_v1_moe": {"num_experts": 4},
    "gemma3": {"mm_tokens_per_image": 4},  # 32x32 image, 8x8 patches: 16 patches pooled to 4 tokens
    "gemma3.vision_config": {"vision_use_head": False},  # as published Gemma 3 checkpoints
    # Conditioning (values only, no effect on which tensors exist or how they are used): Gemma 4 uses
    # attention scaling 1, so scores grow like sqrt(head_dim) and the default global_head_dim 512 saturates
    # a random model's softmax, amplifying bf16 rounding of folded weights (min bf16-merged cosine 0.990).
    # Head dims 8 / 16 keep the real 1:2 sliding/global ratio; with init 0.02 the cosine is >= 0.99993.
    "gemma4_text": {"head_dim": 8, "global_head_dim": 16, "initializer_range": 0.02},
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
    overrides (``_PER_TYPE``), then ``overrides``; sub-configs of multimodal wrappers shrunk too."""
    cls = configuration_auto.CONFIG_MAPPING[model_type]
    subs = dict(getattr(cls, "sub_configs", {}) or {})
    if not subs:
        kw = _shrunk(cls, _TEXT_SHRINK, _PER_TYPE.get(model_type, {}))
        kw.update(overrides)
        return _finish(_with_all_layer_kinds(cls, kw, cls(**kw)))
    kw: dict[str, Any] = {}
    default = cls()
    for key in subs:
        sub_mt = getattr(getattr(default, key, None), "model_type", None) or _sub_model_type(cls, key)
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
    kw = {k: v for k, v in kw.items() if k in fields or k.endswith("_config")}
    return _finish(cls(**kw))


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
    if model_type in modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES and \
            configuration_auto.CONFIG_MAPPING[model_type].sub_configs.get("vision_config") is not None:
        return transformers.AutoModelForImageTextToText
    if model_type in modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return transformers.AutoModelForCausalLM
    if model_type in modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return transformers.AutoModelForImageTextToText
    raise ValueError(f"{model_type}: no causal-LM or image-text-to-text Auto class in transformers "
                     f"{transformers.__version__}")


# -------------------------------------------------------------------------------------------------------
# norms: found by structure, confirmed and classified numerically
# -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NormInfo:
    """A norm module: ``offset`` is 0 (scales by w) or 1 (by 1 + w); ``mean`` if it subtracts the mean."""

    name: str
    offset: int
    mean: bool
    has_bias: bool


def _call(mod, x, gate):
    """``mod(x)``, or ``mod(x, gate)`` for gated norms (Mamba, Gated DeltaNet: ``norm(x, gate)``)."""
    params = [p for p in inspect.signature(mod.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return mod(x, gate) if len(params) >= 2 else mod(x)


@torch.no_grad()
def _probe(mod) -> NormInfo | None:
    """Numerically: is ``mod`` a norm (output invariant to scaling the input), which convention, mean?"""
    w = mod.weight
    g = torch.Generator().manual_seed(0)
    x = torch.randn((3, 5, *w.shape), generator=g, dtype=w.dtype) * 3 + 0.5
    gate = torch.randn(x.shape, generator=g, dtype=w.dtype)
    saved = {n: p.detach().clone() for n, p in mod.named_parameters(recurse=False)}
    try:
        for p in mod.parameters(recurse=False):
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3 + 1.2)
        try:
            y1, y2 = _call(mod, x, gate), _call(mod, 7.0 * x, gate)
        except Exception:
            return None
        if not isinstance(y1, torch.Tensor) or y1.shape != x.shape or not torch.allclose(y1, y2, rtol=1e-3, atol=1e-4):
            return None  # not scale-invariant: not a norm
        b = getattr(mod, "bias", None)
        has_bias = isinstance(b, torch.nn.Parameter)
        if has_bias:
            b.zero_()
        offset = None
        for off in (0, 1):
            w.fill_(-float(off))
            if torch.all(_call(mod, x, gate).abs() < 1e-6):
                offset = off
                break
        if offset is None:
            raise AssertionError(f"{type(mod).__name__}: norm-like module is neither w nor 1 + w "
                                 "(zero scale does not zero its output)")
        w.fill_(1.0 - offset)
        y = _call(mod, x, gate)
        mean = bool(torch.allclose(y.mean(-1), torch.zeros(()), atol=1e-4))
        return NormInfo("", offset, mean, has_bias)
    finally:
        for n, p in mod.named_parameters(recurse=False):
            p.copy_(saved[n])


def find_norms(model) -> dict[str, NormInfo]:
    """Qualified module name -> NormInfo for every norm with a weight.

    Candidates are leaf modules whose own parameters are a 1-D ``weight`` (2-D for per-head norms) and
    optionally a ``bias`` of the same shape; a candidate is a norm when its output does not change if the
    input is scaled by 7 (every normalization has that property, no linear/scale layer does).  The
    convention is measured: the offset o in {0, 1} with ``weight = -o`` zeroing the output.  A candidate
    whose class name says norm but fails the probe is an error (a new kind of norm to look at)."""
    out: dict[str, NormInfo] = {}
    for name, mod in model.named_modules():
        params = dict(mod.named_parameters(recurse=False))
        w = params.get("weight")
        if w is None or not w.is_floating_point() or w.dim() not in (1, 2) or set(params) - {"weight", "bias"}:
            continue
        if any(True for _ in mod.children()) or isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)):
            continue
        if w.dim() == 2 and "norm" not in type(mod).__name__.lower():
            continue
        info = _probe(mod)
        if info is None:
            if "norm" in type(mod).__name__.lower():
                raise AssertionError(f"{name}: {type(mod).__name__} looks like a norm but is not scale-invariant")
            continue
        out[name] = NormInfo(name, info.offset, info.mean, info.has_bias)
    return out


def far_scales(shape, gen: torch.Generator) -> torch.Tensor:
    """|s| in [0.5, 0.8] U [1.25, 2.0], a quarter negative: every channel far from 1 and from 0."""
    lo = 0.5 + 0.3 * torch.rand(shape, generator=gen)
    hi = 1.25 + 0.75 * torch.rand(shape, generator=gen)
    mag = torch.where(torch.rand(shape, generator=gen) < 0.5, lo, hi)
    return mag * torch.where(torch.rand(shape, generator=gen) < 0.25, -1.0, 1.0)


def mild_scales(shape, gen: torch.Generator) -> torch.Tensor:
    """|s| in [0.8, 0.95] U [1.05, 1.25], all positive: random, every channel >= 5% from the identity,
    but mild enough that kept norms (q/k norms, post-norms) do not saturate attention or gates."""
    lo = 0.8 + 0.15 * torch.rand(shape, generator=gen)
    hi = 1.05 + 0.2 * torch.rand(shape, generator=gen)
    return torch.where(torch.rand(shape, generator=gen) < 0.5, lo, hi)


@torch.no_grad()
def calm_norms(model, modules, seed: int = 0) -> None:
    """Give the norms ``modules`` (names in ``model.tiny_norms``) ``mild_scales`` instead of far ones.

    For norms that a conversion KEEPS (never folded, so their values never touch a fold): far-from-identity
    q/k norm scales saturate attention's softmax (Gemma 4 has attention scaling 1), which makes the model
    amplify bf16 rounding of the folded weights far beyond what a real model does.  Folded norms must stay
    far (``far_scales``): those are what catch folding errors."""
    gen = torch.Generator().manual_seed(20_011 + seed)
    mods = dict(model.named_modules())
    for name in sorted(modules):
        info = model.tiny_norms[name]
        w = mods[name].weight
        w.copy_(mild_scales(tuple(w.shape), gen) - info.offset)


def _nonzero(shape, gen, lo, hi) -> torch.Tensor:
    mag = lo + (hi - lo) * torch.rand(shape, generator=gen)
    return mag * torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)


@torch.no_grad()
def randomize(model, seed: int = 0) -> dict[str, NormInfo]:
    """Norm scales far from identity, norm and linear biases non-zero, constant tensors made random."""
    gen = torch.Generator().manual_seed(10_007 + seed)
    norms = find_norms(model)
    mods = dict(model.named_modules())
    done = set()
    for name, info in norms.items():
        mod = mods[name]
        mod.weight.copy_(far_scales(tuple(mod.weight.shape), gen) - info.offset)
        done.add(id(mod.weight))
        if info.has_bias:
            mod.bias.copy_(_nonzero(tuple(mod.bias.shape), gen, 0.1, 0.5))
            done.add(id(mod.bias))
    for pname, p in model.named_parameters():
        if id(p) in done or not p.is_floating_point():
            continue
        if pname.endswith("bias"):
            p.copy_(_nonzero(tuple(p.shape), gen, 0.05, 0.3))
        elif p.numel() > 1 and bool((p == p.reshape(-1)[0]).all()):
            p.add_(torch.randn(tuple(p.shape), generator=gen) * 0.05)  # zero/one-initialised scalars, gates
    for bname, buf in model.named_buffers():
        if bname.endswith("e_score_correction_bias"):
            buf.copy_(_nonzero(tuple(buf.shape), gen, 0.01, 0.1))
    return norms


def build_tiny_model(model_type: str | None = None, seed: int = 0, *, config=None):
    """A float32 random tiny model (eval mode, eager attention), deterministic in ``seed``.

    Give ``model_type`` (uses ``tiny_config``) or ``config`` (e.g. a local model's config, used as is).
    The norms found are attached as ``model.tiny_norms`` (name -> NormInfo)."""
    if config is None:
        if model_type is None:
            raise TypeError("build_tiny_model needs a model_type or a config")
        config = tiny_config(model_type)
    config._attn_implementation = "eager"
    auto = auto_class(config.model_type)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = auto.from_config(config, dtype=torch.float32, attn_implementation="eager")
    model.tiny_norms = randomize(model, seed)
    model.eval()
    return model


def example_inputs(model, seed: int = 0, batch: int = 2, seq: int = 12) -> dict[str, torch.Tensor]:
    """Text-only inputs: ``input_ids`` in [3, min(vocab, 250)) (no special or multimodal token) and an
    all-ones ``attention_mask``."""
    cfg = model.config
    vocab = getattr(cfg.get_text_config(), "vocab_size", 256)
    g = torch.Generator().manual_seed(1234 + seed)
    ids = torch.randint(3, min(vocab, 250), (batch, seq), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


# -------------------------------------------------------------------------------------------------------
# saving
# -------------------------------------------------------------------------------------------------------
class _quiet:
    def __enter__(self):
        lu = transformers.utils.logging
        self._was = lu.is_progress_bar_enabled()
        lu.disable_progress_bar()

    def __exit__(self, *exc):
        if self._was:
            transformers.utils.logging.enable_progress_bar()


def _as_dtype(model, dtype: str):
    """The model in ``dtype`` as transformers would hold it (keep-in-float32 modules stay float32)."""
    if dtype == "float32":
        return model
    if dtype != "bfloat16":
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', not {dtype!r}")
    with torch.random.fork_rng(devices=[]):
        target = type(model)._from_config(copy.deepcopy(model.config), dtype=torch.bfloat16)
    src = dict(model.named_parameters())
    src.update(dict(model.named_buffers()))
    with torch.no_grad():
        for n, t in list(target.named_parameters()) + list(target.named_buffers()):
            if n in src:
                t.copy_(src[n])
    target.tiny_norms = getattr(model, "tiny_norms", {})
    return target.eval()


def saved_norm_names(model, tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """Norm parameter name -> the name save_pretrained wrote it under, matched by exact value (norm
    values are random, so the match is unique; anything else is an error)."""
    params = dict(model.named_parameters())
    out = {}
    for mname, info in getattr(model, "tiny_norms", {}).items():
        for pn in ("weight", "bias") if info.has_bias else ("weight",):
            key = f"{mname}.{pn}"
            p = params[key].detach()
            direct = tensors.get(key)
            if direct is not None and direct.shape == p.shape and torch.equal(direct, p):
                out[key] = key
                continue
            hits = [k for k, t in tensors.items() if t.shape == p.shape and t.dtype == p.dtype and torch.equal(t, p)]
            if len(hits) != 1:
                raise AssertionError(f"{key}: matches {len(hits)} saved tensors {hits[:3]}")
            out[key] = hits[0]
    return out


def save_sharded(model, out_dir, dtype: str = "bfloat16") -> Path:
    """save_pretrained, then re-shard: every norm tensor in shard 1, the rest alternating 2/3, plus index.

    ``out_dir`` is created (it must not hold files).  Returns its Path.  Records on ``model``
    ``tiny_saved_names``: norm parameter name -> the saved tensor name (save-time key conversions)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty")
    out.mkdir(parents=True, exist_ok=True)
    m = _as_dtype(model, dtype)
    with tempfile.TemporaryDirectory(prefix="sf_tiny_") as td, _quiet():
        m.save_pretrained(td, max_shard_size="10GB")
        files = sorted(p.name for p in Path(td).iterdir())
        if "model.safetensors" not in files:
            raise AssertionError(f"save_pretrained wrote {files}")
        with safe_open(str(Path(td) / "model.safetensors"), "pt") as f:
            meta = f.metadata() or {"format": "pt"}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        for aux in files:
            if aux.endswith(".json") and aux != INDEX_NAME:
                shutil.copyfile(Path(td) / aux, out / aux)
    model.tiny_saved_names = saved_norm_names(m, tensors)  # norm parameter -> saved tensor name
    norm_names = set(model.tiny_saved_names.values())
    shards: dict[str, dict[str, torch.Tensor]] = {s: {} for s in SHARD_NAMES}
    wm, i = {}, 0
    for k in sorted(tensors):
        if k in norm_names:
            s = NORM_SHARD
        else:
            s = SHARD_NAMES[1 + i % (SHARDS - 1)]
            i += 1
        shards[s][k] = tensors[k].contiguous()
        wm[k] = s
    for s, content in shards.items():
        save_file(content, str(out / s), metadata=meta)
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values())},
             "weight_map": dict(sorted(wm.items()))}
    (out / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return out


def text_forward_module(model) -> torch.nn.Module:
    """The module whose forward is ``model``'s text-only forward (``model`` itself, except below).

    ``Llama4ForConditionalGeneration.forward`` is broken in transformers 5.24 (it reads
    ``outputs.image_outputs`` from its language model's output, which has no such field), so for it the
    text path it would take is called directly: its ``language_model`` (a Llama4ForCausalLM owning the
    embedding and lm_head) on the same ids; without pixel values the wrapper adds nothing else. The
    tracer (``trace.trace``) and the check (``check.check_family``) run this module too, so the
    wrapper's rules are derived and proven through the same path."""
    if type(model).__name__ == "Llama4ForConditionalGeneration":
        return model.language_model
    return model


@torch.no_grad()
def forward_logits(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """float32 logits of a text-only forward (``text_forward_module``), without a cache."""
    return text_forward_module(model)(**inputs, use_cache=False).logits.float()


@torch.no_grad()
def greedy_tokens(model, inputs: dict[str, torch.Tensor], steps: int) -> torch.Tensor:
    """``steps`` greedy tokens per row ([batch, steps]) by repeated full forwards (no cache, no EOS stop)."""
    ids, mask = inputs["input_ids"], inputs.get("attention_mask")
    new = []
    for _ in range(steps):
        kw = {"input_ids": ids, **({"attention_mask": torch.ones_like(ids)} if mask is not None else {})}
        nxt = forward_logits(model, kw)[:, -1].argmax(-1, keepdim=True)
        new.append(nxt)
        ids = torch.cat([ids, nxt], dim=1)
    return torch.cat(new, dim=1)
