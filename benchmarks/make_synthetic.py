"""Generate synthetic bf16 checkpoints shaped exactly like real Hugging Face models.

    python benchmarks/make_synthetic.py {llama-1b,llama-8b,qwen3-8b,llama-405b} OUT_DIR [--seed N] [--force]
                                        [--sparse]

The output has the tensor names, shapes, dtype (bf16), shard file names and
tensor-to-shard layout of the real repositories:

* llama-1b  -> meta-llama/Llama-3.2-1B: one ``model.safetensors`` (no index), tied embeddings.
* llama-8b  -> meta-llama/Llama-3.1-8B: ``model-0000X-of-00004.safetensors`` + index.
* qwen3-8b  -> Qwen/Qwen3-8B: ``model-0000X-of-00005.safetensors`` + index.
* llama-405b -> meta-llama/Llama-3.1-405B shapes (810 GB), shards cut at 5 GB; use ``--sparse``.

``--sparse`` writes headers and norm vectors only and leaves every other tensor's bytes a hole
(zeros that take no disk): a 400B-class checkpoint to plan, inspect or run single tasks on, in a few
MB of real disk. Its weights are all zero, so it is for planning and I/O, not for checking values.

Shard layout: tensors are taken in the model's state-dict order and a new shard is
started when the next tensor would push the current one past ``max_shard_size``
(the algorithm of transformers' ``save_pretrained`` when these checkpoints were
published).  For Llama-3.1-8B (5 GB) this reproduces the published
``model.safetensors.index.json`` entry for entry (checked against a public copy of it,
see README.md); for Qwen3-8B (4 GB) the published index was not available here, and
the layout is the reproduction (its shard sizes are 4.00/3.99/3.96/3.19/1.24 GB).
Inside a file, tensors are stored sorted by name, as ``safetensors`` writes them.

Values are random: linear/embedding weights ~ N(0, 0.02), every norm weight
(including Qwen3's q_norm/k_norm) uniform in [0.5, 2] so a missing or wrong fold is
visible.  Files are streamed: header first, then data in chunks cut from a 16 MiB
block of random bf16 values at random offsets, so memory stays ~70 MB whatever the
checkpoint size.  A small word-level tokenizer (not the real one) is written so
that tools that insist on loading a tokenizer can run.

Only numpy is needed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

# --------------------------------------------------------------------------- specs

_LLAMA_ROPE_1B = {
    "factor": 32.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}
_LLAMA_ROPE_8B = {
    "factor": 8.0,
    "high_freq_factor": 4.0,
    "low_freq_factor": 1.0,
    "original_max_position_embeddings": 8192,
    "rope_type": "llama3",
}

SPECS = {
    "llama-1b": {
        "repo": "meta-llama/Llama-3.2-1B",
        "layers": 16, "hidden": 2048, "inter": 8192, "heads": 32, "kv_heads": 8,
        "head_dim": 64, "vocab": 128256, "tied": True, "qk_norm": False,
        "max_shard_bytes": None,  # single model.safetensors, no index
        "config": {
            "architectures": ["LlamaForCausalLM"],
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": 128000,
            "eos_token_id": 128001,
            "head_dim": 64,
            "hidden_act": "silu",
            "hidden_size": 2048,
            "initializer_range": 0.02,
            "intermediate_size": 8192,
            "max_position_embeddings": 131072,
            "mlp_bias": False,
            "model_type": "llama",
            "num_attention_heads": 32,
            "num_hidden_layers": 16,
            "num_key_value_heads": 8,
            "pretraining_tp": 1,
            "rms_norm_eps": 1e-05,
            "rope_scaling": _LLAMA_ROPE_1B,
            "rope_theta": 500000.0,
            "tie_word_embeddings": True,
            "torch_dtype": "bfloat16",
            "transformers_version": "4.45.0.dev0",
            "use_cache": True,
            "vocab_size": 128256,
        },
        "generation_config": {"_from_model_config": True, "bos_token_id": 128000,
                              "do_sample": True, "eos_token_id": 128001,
                              "temperature": 0.6, "top_p": 0.9,
                              "transformers_version": "4.45.0.dev0"},
    },
    "llama-8b": {
        "repo": "meta-llama/Llama-3.1-8B",
        "layers": 32, "hidden": 4096, "inter": 14336, "heads": 32, "kv_heads": 8,
        "head_dim": 128, "vocab": 128256, "tied": False, "qk_norm": False,
        "max_shard_bytes": 5 * 10**9,
        "config": {
            "architectures": ["LlamaForCausalLM"],
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": 128000,
            "eos_token_id": 128001,
            "hidden_act": "silu",
            "hidden_size": 4096,
            "initializer_range": 0.02,
            "intermediate_size": 14336,
            "max_position_embeddings": 131072,
            "mlp_bias": False,
            "model_type": "llama",
            "num_attention_heads": 32,
            "num_hidden_layers": 32,
            "num_key_value_heads": 8,
            "pretraining_tp": 1,
            "rms_norm_eps": 1e-05,
            "rope_scaling": _LLAMA_ROPE_8B,
            "rope_theta": 500000.0,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "transformers_version": "4.43.0.dev0",
            "use_cache": True,
            "vocab_size": 128256,
        },
        "generation_config": {"bos_token_id": 128000, "do_sample": True,
                              "eos_token_id": 128001, "temperature": 0.6,
                              "top_p": 0.9, "transformers_version": "4.43.0.dev0"},
    },
    "qwen3-8b": {
        "repo": "Qwen/Qwen3-8B",
        "layers": 36, "hidden": 4096, "inter": 12288, "heads": 32, "kv_heads": 8,
        "head_dim": 128, "vocab": 151936, "tied": False, "qk_norm": True,
        "max_shard_bytes": 4 * 10**9,
        "config": {
            "architectures": ["Qwen3ForCausalLM"],
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": 151643,
            "eos_token_id": 151645,
            "head_dim": 128,
            "hidden_act": "silu",
            "hidden_size": 4096,
            "initializer_range": 0.02,
            "intermediate_size": 12288,
            "max_position_embeddings": 40960,
            "max_window_layers": 36,
            "model_type": "qwen3",
            "num_attention_heads": 32,
            "num_hidden_layers": 36,
            "num_key_value_heads": 8,
            "rms_norm_eps": 1e-06,
            "rope_scaling": None,
            "rope_theta": 1000000,
            "sliding_window": None,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "transformers_version": "4.51.0",
            "use_cache": True,
            "use_sliding_window": False,
            "vocab_size": 151936,
        },
        "generation_config": {"bos_token_id": 151643, "do_sample": True,
                              "eos_token_id": [151645, 151643], "pad_token_id": 151643,
                              "temperature": 0.6, "top_k": 20, "top_p": 0.95,
                              "transformers_version": "4.51.0"},
    },
}

# meta-llama/Llama-3.1-405B: the 8B's config with the 405B's sizes (810 GB of bf16). Shards are cut by
# the save_pretrained rule at 5 GB (191 files, as published; the published index was not checked).
# Meant for --sparse: planning a 400B-class conversion without 810 GB of disk.
SPECS["llama-405b"] = {
    **SPECS["llama-8b"],
    "repo": "meta-llama/Llama-3.1-405B",
    "layers": 126, "hidden": 16384, "inter": 53248, "heads": 128, "kv_heads": 8,
    "config": {**SPECS["llama-8b"]["config"], "hidden_size": 16384, "intermediate_size": 53248,
               "num_attention_heads": 128, "num_hidden_layers": 126},
}


def tensor_list(spec: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) in the model's state-dict (module registration) order."""
    h, inter, hd = spec["hidden"], spec["inter"], spec["head_dim"]
    q_out, kv_out = spec["heads"] * hd, spec["kv_heads"] * hd
    out = [("model.embed_tokens.weight", (spec["vocab"], h))]
    for i in range(spec["layers"]):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (q_out, h)),
            (p + "self_attn.k_proj.weight", (kv_out, h)),
            (p + "self_attn.v_proj.weight", (kv_out, h)),
            (p + "self_attn.o_proj.weight", (h, q_out)),
        ]
        if spec["qk_norm"]:
            out += [(p + "self_attn.q_norm.weight", (hd,)),
                    (p + "self_attn.k_norm.weight", (hd,))]
        out += [
            (p + "mlp.gate_proj.weight", (inter, h)),
            (p + "mlp.up_proj.weight", (inter, h)),
            (p + "mlp.down_proj.weight", (h, inter)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    out.append(("model.norm.weight", (h,)))
    if not spec["tied"]:
        out.append(("lm_head.weight", (spec["vocab"], h)))
    return out


def nbytes(shape: tuple[int, ...]) -> int:
    return math.prod(shape) * 2  # bf16


def shard_layout(spec: dict) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """file name -> tensors, with transformers' (pre-2025) sequential sharding."""
    tensors = tensor_list(spec)
    limit = spec["max_shard_bytes"]
    if limit is None:
        return {"model.safetensors": tensors}
    blocks: list[list] = [[]]
    size = 0
    for name, shape in tensors:
        b = nbytes(shape)
        if size + b > limit and blocks[-1]:
            blocks.append([])
            size = 0
        blocks[-1].append((name, shape))
        size += b
    n = len(blocks)
    return {f"model-{i + 1:05d}-of-{n:05d}.safetensors": blk for i, blk in enumerate(blocks)}


# ------------------------------------------------------------------------ writing

POOL_ELEMS = 8 * 1024 * 1024  # 16 MiB of bf16
CHUNK_ELEMS = 4 * 1024 * 1024  # 8 MiB per write


def f32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bit patterns (uint16), round to nearest even."""
    u = x.astype(np.float32).view(np.uint32)
    u = u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))
    return (u >> np.uint32(16)).astype(np.uint16)


def is_norm(name: str) -> bool:
    return name.endswith("norm.weight")


def safetensors_header(tensors: list[tuple[str, tuple[int, ...]]]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, shape in tensors:
        b = nbytes(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + b]}
        off += b
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data section 8-byte aligned, as safetensors does
    return len(raw).to_bytes(8, "little") + raw


def write_shard(path: str, tensors, rng: np.random.Generator, pool2: np.ndarray, sparse: bool = False) -> int:
    tensors = sorted(tensors, key=lambda t: t[0])  # safetensors stores by name
    written = 0
    with open(path, "wb", buffering=0) as f:
        f.write(safetensors_header(tensors))
        for name, shape in tensors:
            n = math.prod(shape)
            if is_norm(name):
                vals = f32_to_bf16_bits(rng.uniform(0.5, 2.0, size=n).astype(np.float32))
                f.write(memoryview(vals).cast("B"))
            elif sparse:
                f.seek(n * 2, os.SEEK_CUR)  # a hole: reads as zeros, takes no disk
            else:
                left = n
                while left:
                    k = min(left, CHUNK_ELEMS)
                    r = int(rng.integers(0, POOL_ELEMS))
                    f.write(memoryview(pool2[r:r + k]).cast("B"))
                    left -= k
            written += n * 2
        f.truncate()  # a trailing hole still counts in the file size
    return written


def tokenizer_files() -> dict[str, dict]:
    words = ["<unk>", "<s>", "</s>", "hello", "world", "the", "a", "of", "and", "to",
             "is", "in", "it", "that", "flash", "norm", "fold", "weight", "model", "."]
    vocab = {w: i for i, w in enumerate(words)}
    tok = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": w, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": True}
            for i, w in enumerate(words[:3])
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>",
           "eos_token": "</s>", "unk_token": "<unk>", "model_max_length": 131072}
    return {"tokenizer.json": tok, "tokenizer_config.json": cfg}


def make(model: str, out_dir: str, seed: int = 0, force: bool = False, quiet: bool = False,
         sparse: bool = False) -> dict:
    spec = SPECS[model]
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not force:
        raise SystemExit(f"{out_dir} exists and is not empty (use --force)")
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    # pool2 = pool twice, so any rotation of the pool is one contiguous slice
    pool2 = np.empty(2 * POOL_ELEMS, dtype=np.uint16)
    step = 1 << 20
    for i in range(0, POOL_ELEMS, step):
        pool2[i:i + step] = f32_to_bf16_bits(
            rng.standard_normal(step, dtype=np.float32) * np.float32(0.02))
    pool2[POOL_ELEMS:] = pool2[:POOL_ELEMS]

    layout = shard_layout(spec)
    t0 = time.perf_counter()
    total = 0
    for fname, tensors in layout.items():
        t = time.perf_counter()
        b = write_shard(os.path.join(out_dir, fname), tensors, rng, pool2, sparse)
        total += b
        if not quiet:
            dt = time.perf_counter() - t
            print(f"  {fname}: {len(tensors)} tensors, {b / 1e9:.3f} GB, {dt:.1f} s", file=sys.stderr)
    if len(layout) > 1:
        index = {
            "metadata": {"total_size": total},
            "weight_map": {name: fname for fname, ts in layout.items() for name, _ in ts},
        }
        index["weight_map"] = dict(sorted(index["weight_map"].items()))
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
            f.write("\n")
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(spec["config"], f, indent=2, sort_keys=True)
        f.write("\n")
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(spec["generation_config"], f, indent=2, sort_keys=True)
        f.write("\n")
    for fname, obj in tokenizer_files().items():
        with open(os.path.join(out_dir, fname), "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
    dt = time.perf_counter() - t0
    info = {"model": model, "shape_of": spec["repo"], "out_dir": out_dir,
            "shards": list(layout), "tensor_bytes": total, "seconds": round(dt, 2)}
    if not quiet:
        print(f"{model} ({spec['repo']} shapes): {total / 1e9:.3f} GB in {len(layout)} file(s), "
              f"{dt:.1f} s -> {out_dir}", file=sys.stderr)
    return info


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", choices=sorted(SPECS))
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true", help="write into a non-empty OUT_DIR")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--sparse", action="store_true", help="headers and norms only; other tensors are holes")
    args = ap.parse_args(argv)
    info = make(args.model, args.out_dir, seed=args.seed, force=args.force, quiet=args.quiet, sparse=args.sparse)
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
