"""Regenerate streamfold/sample/: a tiny random Llama checkpoint (bf16, 3 shards, learned-looking norms).

Pure numpy, deterministic. Norms sit in the first shard and their linears in the others, and every
norm weight is far from 1, so a wrong or missing fold shows in the demo's check.
"""
import json
import sys
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

H, I, L, HEADS, KV, V = 64, 160, 2, 4, 2, 256
HD = H // HEADS


def main(out: Path) -> None:
    rng = np.random.default_rng(2407_09577)
    bf = ml_dtypes.bfloat16

    def w(*shape, scale=0.08):
        return (rng.standard_normal(shape) * scale).astype(np.float32).astype(bf)

    def norm():
        return (rng.uniform(0.5, 2.0, H) * rng.choice([-1.0, 1.0], H)).astype(np.float32).astype(bf)

    norms, attn, mlp = {}, {}, {}
    for n in range(L):
        p = f"model.layers.{n}."
        norms[p + "input_layernorm.weight"] = norm()
        norms[p + "post_attention_layernorm.weight"] = norm()
        attn[p + "self_attn.q_proj.weight"] = w(HEADS * HD, H)
        attn[p + "self_attn.k_proj.weight"] = w(KV * HD, H)
        attn[p + "self_attn.v_proj.weight"] = w(KV * HD, H)
        attn[p + "self_attn.o_proj.weight"] = w(H, HEADS * HD)
        mlp[p + "mlp.gate_proj.weight"] = w(I, H)
        mlp[p + "mlp.up_proj.weight"] = w(I, H)
        mlp[p + "mlp.down_proj.weight"] = w(H, I)
    norms["model.norm.weight"] = norm()
    attn["model.embed_tokens.weight"] = w(V, H, scale=1.0)
    mlp["lm_head.weight"] = w(V, H)
    out.mkdir(parents=True, exist_ok=True)
    shards = [norms, attn, mlp]
    weight_map, total = {}, 0
    for i, tensors in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, out / name, metadata={"format": "pt"})
        for k, v in tensors.items():
            weight_map[k] = name
            total += v.nbytes
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H,
        "intermediate_size": I, "num_hidden_layers": L, "num_attention_heads": HEADS,
        "num_key_value_heads": KV, "head_dim": HD, "vocab_size": V, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu", "tie_word_embeddings": False,
        "attention_bias": False, "mlp_bias": False, "dtype": "bfloat16",
        "bos_token_id": 1, "eos_token_id": 2,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "do_sample": False}, indent=2) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "streamfold" / "sample")
