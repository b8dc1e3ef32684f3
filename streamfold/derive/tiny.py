"""Tiny random transformers models for deriving and testing FlashNorm rules (development time only).

Imports torch and transformers: only ``tools/``, ``derive-rules`` (the ``derive`` extra) and the tests use it;
streamfold's runtime core never imports this module.  Three jobs, three modules:

- ``tinyconfig``: ``tiny_config(model_type, **overrides)`` (class defaults shrunk to tiny sizes) and
  ``auto_class(model_type)``; re-exported here.
- ``normprobe``: ``find_norms`` (norms found by structure, convention measured numerically),
  ``randomize`` / ``calm_norms`` (scales far from / mildly off the identity); re-exported here.
- this module: ``build_tiny_model(model_type, seed)`` / ``build_tiny_model(config=...)`` (float32, random
  weights; every norm's effective scale far from the identity, LayerNorm and linear biases non-zero),
  ``load_pretrained``, ``example_inputs``, ``save_sharded`` (``save_pretrained`` names, re-sharded so every
  norm tensor is in shard 1 and everything else alternates between shards 2 and 3), the text forward.

Towers transformers cannot build here get a stand-in (``standin``: Gemma 3n's timm vision tower); every
construction and load in this module runs under ``standin.towers``.
"""
from __future__ import annotations

import copy
import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch
import transformers

from . import standin
from .normprobe import NormInfo, calm_norms, far_scales, find_norms, mild_scales, randomize  # noqa: F401
from .tinyconfig import auto_class, tiny_config  # noqa: F401

SHARDS = 3
SHARD_NAMES = tuple(f"model-{i:05d}-of-{SHARDS:05d}.safetensors" for i in range(1, SHARDS + 1))
NORM_SHARD = SHARD_NAMES[0]
INDEX_NAME = "model.safetensors.index.json"


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
    with torch.random.fork_rng(devices=[]), standin.towers(config.model_type):
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


def load_pretrained(path, model_type: str, dtype=torch.float32):
    """(model in eval mode, loading info with sorted lists) from ``from_pretrained`` with ``model_type``'s
    Auto class, eager attention, its stand-in towers (``standin.towers``), progress bars and warnings off."""
    lg = logging.getLogger("transformers")
    was = lg.level
    lg.setLevel(logging.ERROR)
    try:
        with _quiet(), standin.towers(model_type):
            model, info = auto_class(model_type).from_pretrained(
                str(path), dtype=dtype, attn_implementation="eager", output_loading_info=True)
    finally:
        lg.setLevel(was)
    return model.eval(), {k: sorted(v) if isinstance(v, (set, list)) else v for k, v in dict(info).items()}


def _as_dtype(model, dtype: str):
    """The model in ``dtype`` as transformers would hold it (keep-in-float32 modules stay float32)."""
    if dtype == "float32":
        return model
    if dtype != "bfloat16":
        raise ValueError(f"dtype must be 'float32' or 'bfloat16', not {dtype!r}")
    with torch.random.fork_rng(devices=[]), standin.towers(model.config.model_type):
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
    values are random, so the match is unique; anything else is an error). A norm tied across layers
    (Zamba's shared attention block) is found under each of its names; all map to the one saved tensor."""
    params = dict(model.named_parameters(remove_duplicate=False))
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


def text_forward_module(model, inputs: dict | None = None) -> torch.nn.Module:
    """The module whose forward is ``model``'s forward on ``inputs`` (``model`` itself, except below).

    ``Llama4ForConditionalGeneration.forward`` is broken in transformers 5.24 (it reads
    ``outputs.image_outputs`` from its language model's output, which has no such field), so for a text
    prompt the path it would take is called directly: its ``language_model`` (a Llama4ForCausalLM owning
    the embedding and lm_head) on the same ids; without pixel values the wrapper adds nothing else. A
    prompt with an image (``pixel_values``) runs the wrapper (5.25 fixed it): the language model alone
    would ignore the pixels and the image check would be blind. The tracer (``trace.trace``) and the
    check (``check.check_family``) run this module too, so the wrapper's rules are derived and proven
    through the same path."""
    if type(model).__name__ == "Llama4ForConditionalGeneration" and "pixel_values" not in (inputs or {}):
        return model.language_model
    return model


@torch.no_grad()
def forward_logits(model, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """float32 logits of a text-only forward (``text_forward_module``), without a cache."""
    return text_forward_module(model, inputs)(**inputs, use_cache=False).logits.float()


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
