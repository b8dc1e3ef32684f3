"""Image inputs for tiny multimodal wrappers (development time only; torch).

``image_inputs(model, seed)``: a batch of prompts with one generated image each, in the form the
wrapper's forward takes (pixel values plus the wrapper's own side inputs: grid sizes, aspect ratios,
attention masks), with exactly as many image tokens in the text as the model makes image features
(counted by running the model's own ``get_image_features``, never computed here). Tracing and the
family tests run it so that the language model sees image features (Llama 3.2 Vision's
cross-attention layers run only with an image).

``PIXELS`` is the data: model type -> how its pixel inputs are shaped. A wrapper with no entry has no
image check (``image_inputs`` returns None).
"""
from __future__ import annotations

import inspect

import torch

# model type -> pixel layout:
#   "bchw"      [batch, 3, H, W] (CLIP/SigLIP towers)
#   "bnchw"     [batch, 1 image, 3, H, W] plus a pixel attention mask (Idefics 2/3, SmolVLM)
#   "anyres"    [batch, views, 3, H, W] plus image_sizes (LLaVA-NeXT family: the base view and its tiles)
#   "patches"   flattened [patches, 3 * temporal * P * P] plus image_grid_thw (Qwen2-VL family, GLM-4V)
#   "tiles"     [batch, 1 image, tiles, 3, H, W] plus aspect ratio ids/mask and a cross-attention mask (Mllama)
#   "naflex"    [batch, patches, 3 * P * P] plus spatial_shapes and pixel_attention_mask (Siglip2: LFM2-VL)
#   "patches2d" [patches, 3, P, P] plus image_grid_thw (Kimi K2.5's MoonViT)
#   "posids"    [batch, patches, 3 * M * M] raw merged patches plus image_position_ids (Gemma 4 unified)
#   "positions" [batch, patches, 3 * P * P] plus image_position_ids, each patch's (x, y) (Gemma 4)
PIXELS: dict[str, str] = {
    "llava": "bchw", "vipllava": "bchw", "paligemma": "bchw", "aya_vision": "bchw", "internvl": "bchw",
    "cohere2_vision": "bchw", "mistral3": "bchw", "mistral_large4": "bchw", "gemma3": "bchw",
    "janus": "bchw", "llama4": "bchw",
    "llava_next": "anyres", "llava_next_video": "anyres", "llava_onevision": "anyres",
    "idefics2": "bnchw", "idefics3": "bnchw", "smolvlm": "bnchw",
    "qwen2_vl": "patches", "qwen2_5_vl": "patches", "glm4v": "patches", "glm4v_moe": "patches", "glm46v": "patches",
    "qwen3_vl": "patches", "qwen3_vl_moe": "patches", "qwen3_5": "patches", "qwen3_5_moe": "patches",
    "mllama": "tiles",
    "lfm2_vl": "naflex",
    "kimi_k25": "patches2d", "ernie4_5_vl_moe": "patches",
    "gemma4_unified": "posids", "qwen2_5_omni_thinker": "patches", "qwen3_omni_moe_thinker": "patches",
    "gemma4": "positions",
}
_IMAGE_SIZES = ("mistral3", "mistral_large4")  # "bchw" wrappers that also take image_sizes
_FLAT_2D = ("ernie4_5_vl_moe",)  # "patches" wrappers whose patches have no temporal axis (3 * P * P each)


def _size(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _pixel_kwargs(model, layout: str, batch: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    vc = model.config.vision_config
    p = _size(getattr(vc, "patch_size", 8))[0]
    if layout == "patches":
        t = 1 if model.config.model_type in _FLAT_2D else getattr(vc, "temporal_patch_size", 2)
        side = 4 * getattr(vc, "spatial_merge_size", 2) // 2  # a 4 x 4 patch grid merges to 2 x 2 tokens
        px = torch.randn(batch * side * side, 3 * t * p * p, generator=g)
        return {"pixel_values": px, "image_grid_thw": torch.tensor([[1, side, side]] * batch)}
    if layout == "patches2d":
        side = 4  # a 4 x 4 patch grid merges to 2 x 2 tokens
        px = torch.randn(batch * side * side, 3, p, p, generator=g)
        return {"pixel_values": px, "image_grid_thw": torch.tensor([[1, side, side]] * batch)}
    if layout == "posids":
        side, m = 3, vc.model_patch_size  # a 3 x 3 grid of merged patches, one token each
        xy = torch.tensor([[x, y] for y in range(side) for x in range(side)])
        return {"pixel_values": torch.randn(batch, side * side, 3 * m * m, generator=g),
                "image_position_ids": xy.expand(batch, -1, -1).clone()}
    if layout == "naflex":
        side = 4
        px = torch.randn(batch, side * side, 3 * p * p, generator=g)
        return {"pixel_values": px, "spatial_shapes": torch.tensor([[side, side]] * batch),
                "pixel_attention_mask": torch.ones(batch, side * side, dtype=torch.bool)}
    if layout == "positions":
        side = 2 * vc.pooling_kernel_size  # pooled k x k: 2 x 2 soft tokens per image
        xy = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="xy"), dim=-1)
        return {"pixel_values": torch.rand(batch, side * side, 3 * p * p, generator=g),
                "image_position_ids": xy.reshape(1, side * side, 2).repeat(batch, 1, 1)}
    h, w = _size(getattr(vc, "image_size", 32))
    if layout == "bchw":
        kw = {"pixel_values": torch.randn(batch, 3, h, w, generator=g)}
        if model.config.model_type in _IMAGE_SIZES:
            kw["image_sizes"] = torch.tensor([[h, w]] * batch)
        return kw
    if layout == "anyres":
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
        n = image_size_to_num_patches((h, w), model.config.image_grid_pinpoints, h)
        return {"pixel_values": torch.randn(batch, n, 3, h, w, generator=g), "image_sizes": torch.tensor([[h, w]] * batch)}
    if layout == "bnchw":
        return {"pixel_values": torch.randn(batch, 1, 3, h, w, generator=g),
                "pixel_attention_mask": torch.ones(batch, 1, h, w, dtype=torch.bool)}
    if layout == "tiles":
        tiles = vc.max_num_tiles
        return {"pixel_values": torch.randn(batch, 1, tiles, 3, h, w, generator=g),
                "aspect_ratio_ids": torch.ones(batch, 1, dtype=torch.long),  # ratio 1 x 1: the first tile
                "aspect_ratio_mask": torch.tensor([[[1] + [0] * (tiles - 1)]] * batch)}
    raise ValueError(f"unknown pixel layout {layout!r}")


def _rows(x) -> int:
    """Feature vectors in a ``get_image_features`` result (a tensor, a list of them, or a model output)."""
    if isinstance(x, torch.Tensor):
        return x.numel() // x.shape[-1]
    if isinstance(x, (list, tuple)):
        return sum(_rows(t) for t in x)
    pooled = getattr(x, "pooler_output", None)
    return _rows(pooled if pooled is not None else x.last_hidden_state)


def _image_token(cfg) -> int:
    for k in ("image_token_id", "image_token_index"):
        v = getattr(cfg, k, None)
        if isinstance(v, int):
            return v
    raise ValueError(f"{cfg.model_type}: no image token id in its config")


@torch.no_grad()
def image_inputs(model, seed: int = 0, batch: int = 2, text: int = 8) -> dict[str, torch.Tensor] | None:
    """Prompts with one random image each: ``text`` random ids (in [3, 250)) around the image's tokens,
    as many image tokens per row as ``get_image_features`` returns features for one image (one token for
    Mllama, whose images enter through cross-attention). None when ``PIXELS`` has no entry."""
    layout = PIXELS.get(model.config.model_type)
    if layout is None:
        return None
    g = torch.Generator().manual_seed(4321 + seed)
    kw = _pixel_kwargs(model, layout, batch, g)
    tok = _image_token(model.config)
    if layout == "tiles":
        n = 1
    else:
        n = _rows(getattr(model, "model", model).get_image_features(**kw))  # Llama 4: no .model
        if n % batch:
            raise AssertionError(f"{model.config.model_type}: {n} image features for {batch} images")
        n //= batch
    vocab = getattr(model.config.get_text_config(), "vocab_size", 256)
    pre = torch.randint(3, min(vocab, 250), (batch, 3), generator=g)
    post = torch.randint(3, min(vocab, 250), (batch, text - 3), generator=g)
    ids = torch.cat([pre, torch.full((batch, n), tok), post], dim=1)
    if model.config.model_type == "paligemma":  # PaliGemma: image tokens first, then the prompt
        ids = torch.cat([torch.full((batch, n), tok), pre, post], dim=1)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), **kw}
    if layout == "patches" and "mm_token_type_ids" in inspect.signature(model.forward).parameters:
        out["mm_token_type_ids"] = (ids == tok).long()  # M-RoPE: which tokens are image tokens
        if "moe_mm_token_type_ids" in inspect.signature(model.forward).parameters:
            # Ernie 4.5 VL: image tokens go to the vision experts only when this says which they are
            out["moe_mm_token_type_ids"] = out["mm_token_type_ids"]
    if layout == "tiles":
        tiles = model.config.vision_config.max_num_tiles
        cam = torch.zeros(batch, ids.shape[1], 1, tiles, dtype=torch.long)
        cam[:, 3:, :, 0] = 1  # every token from the image on attends to its first tile
        out["cross_attention_mask"] = cam
    return out
