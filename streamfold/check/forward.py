"""A float32 numpy forward pass of Llama-style decoders, streaming weights from the checkpoint.

Used by ``streamfold verify --forward`` to compare a converted checkpoint's logits with its source's
without torch. Covers the decoder families streamfold folds whose computation is the Llama block:
RMSNorm (missing norm weights, as in strict FlashNorm checkpoints, are the identity), grouped-query
attention with RoPE (``default``, ``linear``, ``dynamic``, ``llama3``, ``yarn``, ``longrope``; partial
rotary; SmolLM3 NoPE layers; sliding windows), optional q/k/v/o biases, Qwen3 q/k norms, SwiGLU MLPs
(separate or Phi-3 fused ``qkv_proj``/``gate_up_proj``), Granite's multipliers, tied or untied heads,
Gemma's ``1 + w`` norms and scaled embeddings, and Mixtral / Qwen2-MoE / Qwen3-MoE sparse MoE
layers (top-k routing, shared experts).

Memory stays bounded: every weight matrix is read in row blocks (``os.preadv`` into reused buffers,
never memory-mapped; :mod:`streamfold.check.forward_weights`), converted to float32 and multiplied block by
block, and only the experts a token is routed to are read. So an 8B checkpoint runs in a few hundred
MB plus the logits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..core.errors import StreamfoldError
from .forward_weights import DEFAULT_BLOCK, Weights, fp8_block_of
from ..core.reader import read_config

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "smollm3", "granite", "phi3", "gemma",
             "mixtral", "qwen2_moe", "qwen3_moe")


class ForwardUnsupported(StreamfoldError):
    """The checkpoint's architecture or a config option is outside what the forward pass implements."""


# --------------------------------------------------------------------------------------------------------
@dataclass
class Rope:
    inv_freq: np.ndarray  # float32 [rotary_dim / 2]
    attention_factor: float
    rotary_dim: int

    def cos_sin(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        freqs = positions.astype(np.float32)[:, None] * self.inv_freq[None, :]
        emb = np.concatenate([freqs, freqs], axis=-1)
        return ((np.cos(emb) * self.attention_factor).astype(np.float32),
                (np.sin(emb) * self.attention_factor).astype(np.float32))

    def apply(self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
        """``x`` [heads, T, head_dim]; rotates the first ``rotary_dim`` channels (rotate_half layout)."""
        d = self.rotary_dim
        rot, rest = x[..., :d], x[..., d:]
        half = d // 2
        rotated = np.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
        out = rot * cos[None] + rotated * sin[None]
        return np.concatenate([out, rest], axis=-1) if rest.shape[-1] else out


def _rope(cfg: dict, head_dim: int, seq_len: int) -> Rope:
    rp = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(rp, dict):
        raise ForwardUnsupported("config.json: rope_parameters must be an object")
    if any(isinstance(v, dict) for v in rp.values()):
        raise ForwardUnsupported("config.json: per-layer-type rope_parameters are not supported by the forward pass")
    base = float(rp.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = rp.get("rope_type", rp.get("type", "default"))
    partial = float(rp.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)) or 1.0)
    dim = int(head_dim * partial)
    max_pos = cfg.get("max_position_embeddings")
    if "original_max_position_embeddings" in cfg:  # Phi-3 keeps it beside rope_parameters; it wins
        orig = cfg["original_max_position_embeddings"]
    else:
        orig = rp.get("original_max_position_embeddings", max_pos)
    exps = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    inv = (1.0 / (base ** exps.astype(np.float64))).astype(np.float32)
    attention_factor = 1.0
    if rope_type in ("default", None):
        pass
    elif rope_type == "linear":
        inv = (inv / np.float32(rp["factor"])).astype(np.float32)
    elif rope_type == "dynamic":
        factor = float(rp["factor"])
        if seq_len > max_pos:
            b = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
            inv = (1.0 / (b ** exps.astype(np.float64))).astype(np.float32)
    elif rope_type == "llama3":
        factor, lo, hi = float(rp["factor"]), float(rp["low_freq_factor"]), float(rp["high_freq_factor"])
        old = float(orig)
        lo_wavelen, hi_wavelen = old / lo, old / hi
        wavelen = 2 * math.pi / inv.astype(np.float64)
        scaled = np.where(wavelen > lo_wavelen, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < hi_wavelen) & ~(wavelen > lo_wavelen)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    elif rope_type == "yarn":
        factor = rp.get("factor")
        factor = float(factor) if factor is not None else max_pos / orig
        af, mscale, mscale_all = rp.get("attention_factor"), rp.get("mscale"), rp.get("mscale_all_dim")

        def get_mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0
        if af is None:
            af = (get_mscale(factor, mscale) / get_mscale(factor, mscale_all)) if mscale and mscale_all \
                else get_mscale(factor)
        attention_factor = float(af)
        beta_fast, beta_slow = rp.get("beta_fast") or 32, rp.get("beta_slow") or 1

        def corr_dim(rot):
            return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))
        low, high = corr_dim(beta_fast), corr_dim(beta_slow)
        if rp.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
        pos_freqs = base ** exps.astype(np.float64)
        extra = 1 - ramp
        inv = ((1.0 / (factor * pos_freqs)) * (1 - extra) + (1.0 / pos_freqs) * extra).astype(np.float32)
    elif rope_type == "longrope":
        factor = rp.get("factor")
        factor = float(factor) if factor is not None else max_pos / orig
        af = rp.get("attention_factor")
        if af is None:
            af = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
        attention_factor = float(af)
        ext = np.asarray(rp["long_factor"] if seq_len > orig else rp["short_factor"], dtype=np.float32)
        inv = (1.0 / (ext.astype(np.float64) * base ** exps.astype(np.float64))).astype(np.float32)
    else:
        raise ForwardUnsupported(f"config.json: rope type {rope_type!r} is not supported by the forward pass")
    return Rope(inv.astype(np.float32), attention_factor, dim)


# --------------------------------------------------------------------------------------------------------
def _act(name: str):
    if name in ("silu", "swish"):
        def f(x):
            with np.errstate(over="ignore"):
                return x / (np.float32(1) + np.exp(-x))
        return f
    if name in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
        c = np.float32(math.sqrt(2 / math.pi))
        return lambda x: np.float32(0.5) * x * (1 + np.tanh(c * (x + np.float32(0.044715) * x * x * x)))
    if name == "relu":
        return lambda x: np.maximum(x, 0)
    raise ForwardUnsupported(f"config.json: hidden_act {name!r} is not supported by the forward pass")


def _rms(x: np.ndarray, w: np.ndarray | None, eps: float) -> np.ndarray:
    var = np.mean(x * x, axis=-1, keepdims=True)
    y = x * (np.float32(1) / np.sqrt(var + np.float32(eps)))
    return y * w if w is not None else y


def _softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x, axis=-1, keepdims=True)
    e = np.exp(x - m)
    return e / np.sum(e, axis=-1, keepdims=True)


class Decoder:
    """One checkpoint's decoder, run on a single token sequence: ``logits(ids) -> [T, vocab]`` float32."""

    def __init__(self, root, block_bytes: int = DEFAULT_BLOCK) -> None:
        from pathlib import Path
        self.root = Path(root)
        raw = read_config(self.root)
        self.model_type = raw.get("model_type")
        if self.model_type not in SUPPORTED:
            raise ForwardUnsupported(f"config.json: the forward pass supports model_type "
                                  f"{', '.join(SUPPORTED)}, not {self.model_type!r}")
        self.cfg = raw.get("text_config", raw) if "text_config" in raw else raw
        q = raw.get("quantization_config") or self.cfg.get("quantization_config")
        if q and fp8_block_of(q) is None:
            raise ForwardUnsupported("config.json: a quantized checkpoint (quantization_config); the forward "
                                     "pass reads unquantized and FP8 block-quantized (fp8) weights only")
        c = self.cfg
        self.hidden = int(c["hidden_size"])
        self.heads = int(c["num_attention_heads"])
        self.kv_heads = int(c.get("num_key_value_heads") or self.heads)
        self.head_dim = int(c.get("head_dim") or self.hidden // self.heads)
        self.layers = int(c["num_hidden_layers"])
        self.eps = float(c.get("rms_norm_eps", 1e-6))
        gemma = self.model_type == "gemma"
        act = c.get("hidden_act", "gelu_pytorch_tanh" if gemma else "silu")
        self.act = _act("gelu_pytorch_tanh" if gemma and act in ("gelu", None) else act)
        self.norm_offset = np.float32(1.0) if gemma else None  # Gemma norms multiply by 1 + w
        self.embed_scale = np.float32(self.hidden ** 0.5) if gemma else None
        self.tied = bool(c.get("tie_word_embeddings", False))
        gran = self.model_type == "granite"
        self.embedding_multiplier = float(c.get("embedding_multiplier", 1.0)) if gran else 1.0
        self.residual_multiplier = float(c.get("residual_multiplier", 1.0)) if gran else 1.0
        self.logits_scaling = float(c.get("logits_scaling", 1.0)) if gran else 1.0
        self.scaling = float(c["attention_multiplier"]) if gran and c.get("attention_multiplier") \
            else self.head_dim ** -0.5
        self.w = Weights(self.root, block_bytes, fp8_block_of(q))

    def close(self) -> None:
        self.w.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _norm_w(self, name: str) -> np.ndarray | None:
        """A norm's multiplier: ``w`` (or ``1 + w`` for Gemma); None (the identity) when the tensor is absent,
        as in strict FlashNorm checkpoints."""
        w = self.w.optional_vector(name)
        if w is None or self.norm_offset is None:
            return w
        return w + self.norm_offset

    # -- per-layer configuration --------------------------------------------------------------------------
    def _uses_rope(self, i: int) -> bool:
        if self.model_type == "smollm3":
            nope = self.cfg.get("no_rope_layers")
            if nope is None:
                interval = int(self.cfg.get("no_rope_layer_interval", 4))
                return (i + 1) % interval != 0
            return bool(nope[i])
        return True

    def _window(self, i: int) -> int | None:
        c = self.cfg
        win = c.get("sliding_window")
        if not win:
            return None
        types = c.get("layer_types")
        if types:
            if types[i] != "sliding_attention":
                return None
            if self.model_type == "smollm3" and not c.get("use_sliding_window", False):
                return None
            return int(win)
        if self.model_type in ("mistral", "mixtral", "phi3"):
            return int(win)
        if self.model_type in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe"):
            return int(win) if c.get("use_sliding_window", False) else None
        return None

    # -- blocks ---------------------------------------------------------------------------------------------
    def _attention(self, i: int, x: np.ndarray, cos, sin, rope: Rope) -> np.ndarray:
        p = f"model.layers.{i}.self_attn."
        T = x.shape[0]
        hq, hk, d = self.heads, self.kv_heads, self.head_dim
        if self.w.has(p + "qkv_proj.weight"):
            qkv = self.w.linear(x, p + "qkv_proj.weight", bias=p + "qkv_proj.bias")
            q, k, v = qkv[:, :hq * d], qkv[:, hq * d:(hq + hk) * d], qkv[:, (hq + hk) * d:]
        else:
            q = self.w.linear(x, p + "q_proj.weight", bias=p + "q_proj.bias")
            k = self.w.linear(x, p + "k_proj.weight", bias=p + "k_proj.bias")
            v = self.w.linear(x, p + "v_proj.weight", bias=p + "v_proj.bias")
        q = q.reshape(T, hq, d)
        k = k.reshape(T, hk, d)
        v = v.reshape(T, hk, d).transpose(1, 0, 2)
        if self.w.has(p + "q_norm.weight") or self.w.has(p + "k_norm.weight") or self.model_type in (
                "qwen3", "qwen3_moe"):
            q = _rms(q, self._norm_w(p + "q_norm.weight"), self.eps)
            k = _rms(k, self._norm_w(p + "k_norm.weight"), self.eps)
        q = q.transpose(1, 0, 2)
        k = k.transpose(1, 0, 2)
        if self._uses_rope(i):
            q, k = rope.apply(q, cos, sin), rope.apply(k, cos, sin)
        rep = hq // hk
        k = np.repeat(k, rep, axis=0)
        v = np.repeat(v, rep, axis=0)
        scores = np.matmul(q, k.transpose(0, 2, 1)) * np.float32(self.scaling)
        qi, ki = np.arange(T)[:, None], np.arange(T)[None, :]
        allowed = ki <= qi
        win = self._window(i)
        if win:
            allowed &= ki > qi - win
        scores = np.where(allowed[None], scores, np.float32(-np.inf))
        out = np.matmul(_softmax(scores), v)  # [heads, T, d]
        out = out.transpose(1, 0, 2).reshape(T, hq * d)
        return self.w.linear(out, p + "o_proj.weight", bias=p + "o_proj.bias")

    def _mlp(self, x: np.ndarray, p: str, gate="gate_proj", up="up_proj", down="down_proj") -> np.ndarray:
        if self.w.has(p + "gate_up_proj.weight"):
            inter = self.w.info(p + "gate_up_proj.weight").shape[0] // 2
            g = self.w.linear(x, p + "gate_up_proj.weight", 0, inter)
            u = self.w.linear(x, p + "gate_up_proj.weight", inter, 2 * inter)
        else:
            g = self.w.linear(x, p + gate + ".weight", bias=p + gate + ".bias")
            u = self.w.linear(x, p + up + ".weight", bias=p + up + ".bias")
        return self.w.linear(self.act(g) * u, p + down + ".weight", bias=p + down + ".bias")

    def _moe(self, x: np.ndarray, i: int) -> np.ndarray | None:
        c = self.cfg
        if self.w.has(f"model.layers.{i}.block_sparse_moe.gate.weight"):  # Mixtral (legacy names)
            p = f"model.layers.{i}.block_sparse_moe."
            names, norm_topk = ("w1", "w3", "w2"), True
        elif self.w.has(f"model.layers.{i}.mlp.gate.weight"):
            p = f"model.layers.{i}.mlp."
            names, norm_topk = ("gate_proj", "up_proj", "down_proj"), bool(c.get("norm_topk_prob", False))
        else:
            return None
        top_k = int(c["num_experts_per_tok"])
        logits = self.w.linear(x, p + "gate.weight")
        probs = _softmax(logits.astype(np.float32))
        top = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
        weights = np.take_along_axis(probs, top, axis=-1)
        if norm_topk:
            weights = weights / weights.sum(axis=-1, keepdims=True)
        out = np.zeros_like(x)
        for e in np.unique(top):
            tok, slot = np.nonzero(top == e)
            ep = f"{p}experts.{int(e)}."
            if not self.w.has(ep + names[0] + ".weight"):
                raise StreamfoldError(f"{self.root}: expert tensors like {ep + names[0] + '.weight'!r} are missing "
                                      "(fused expert layouts are not supported by the forward pass)")
            y = self._mlp(x[tok], ep, *names)
            out[tok] += y * weights[tok, slot][:, None]
        if self.w.has(p + "shared_expert.gate_proj.weight"):
            shared = self._mlp(x, p + "shared_expert.")
            if self.w.has(p + "shared_expert_gate.weight"):
                gate = self.w.linear(x, p + "shared_expert_gate.weight")
                shared = shared * (np.float32(1) / (np.float32(1) + np.exp(-gate)))
            out += shared
        return out

    def logits(self, ids) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        T = len(ids)
        rope = _rope(self.cfg, self.head_dim, T)
        cos, sin = rope.cos_sin(np.arange(T))
        h = self.w.rows("model.embed_tokens.weight", ids)
        if self.embed_scale is not None:
            h = h * self.embed_scale
        if self.embedding_multiplier != 1.0:
            h = h * np.float32(self.embedding_multiplier)
        rm = np.float32(self.residual_multiplier)
        for i in range(self.layers):
            p = f"model.layers.{i}."
            x = _rms(h, self._norm_w(p + "input_layernorm.weight"), self.eps)
            a = self._attention(i, x, cos, sin, rope)
            h = h + (a * rm if rm != 1 else a)
            x = _rms(h, self._norm_w(p + "post_attention_layernorm.weight"), self.eps)
            m = self._moe(x, i)
            if m is None:
                m = self._mlp(x, p + "mlp.")
            h = h + (m * rm if rm != 1 else m)
        h = _rms(h, self._norm_w("model.norm.weight"), self.eps)
        head = "lm_head.weight" if self.w.has("lm_head.weight") else "model.embed_tokens.weight"
        out = self.w.linear(h, head)
        if self.logits_scaling != 1.0:
            out = out / np.float32(self.logits_scaling)
        return out


def logits(root, ids, block_bytes: int = DEFAULT_BLOCK) -> np.ndarray:
    """float32 logits ``[len(ids), vocab]`` of checkpoint ``root`` for one token sequence."""
    with Decoder(root, block_bytes) as d:
        return d.logits(ids)


def default_tokens(vocab: int, n: int = 16, seed: int = 0) -> np.ndarray:
    """A fixed pseudo-random token sequence (ids 3.. to skip the usual special tokens)."""
    lo = 3 if vocab > 16 else 0
    return np.random.default_rng(seed).integers(lo, vocab, size=n).astype(np.int64)


def compare_logits(ref: np.ndarray, got: np.ndarray) -> dict:
    """How far ``got`` is from ``ref`` (both ``[T, vocab]``): the numbers ``verify --forward`` reports."""
    ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
    diff = np.abs(got64 - ref64)
    scale = float(np.max(np.abs(ref64))) or 1.0
    num = np.sum(ref64 * got64, axis=-1)
    den = np.linalg.norm(ref64, axis=-1) * np.linalg.norm(got64, axis=-1)
    cos = np.where(den > 0, num / np.where(den > 0, den, 1), 1.0)
    agree = np.argmax(ref64, axis=-1) == np.argmax(got64, axis=-1)
    return {
        "tokens": int(ref.shape[0]),
        "max_abs_error": float(diff.max()),
        "max_rel_error": float(diff.max() / scale),
        "rms_rel_error": float(np.linalg.norm(got64 - ref64) / (np.linalg.norm(ref64) or 1.0)),
        "min_cosine": float(cos.min()),
        "argmax_agreement": float(agree.mean()),
        "all_finite": bool(np.isfinite(got64).all() and np.isfinite(ref64).all()),
    }
