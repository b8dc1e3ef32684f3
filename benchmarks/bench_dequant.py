"""``--dequantize`` end to end on a synthetic FP8 block checkpoint, against ``cp`` of the output bytes.

    PYTHONPATH=. python benchmarks/bench_dequant.py WORK_DIR [--layers 4] [--hidden 4096] [--inter 12288]
                                                   [--workers 2] [--repeat 2] [--format fp8|mxfp4]
                                                   [--experts 16] [--before OTHER_CHECKOUT] [--cold]
                                                   [--verify]

``--format mxfp4``: a gpt-oss-shaped checkpoint instead (``--hidden``/``--inter`` default 2880 as in
gpt-oss-20b/120b; ``--experts`` experts per layer, every expert's ``gate_up_proj``/``down_proj`` as
``_blocks`` U8 with E8M0 ``_scales``; bf16 attention, router, biases, embeddings; vocab 8192), converted
with ``--dequantize`` (gate_up folded, down widened, written as bf16 ``[E, in, out]``).

Writes a Qwen3-shaped checkpoint (every projection F8_E4M3 with 128x128 F32 ``weight_scale_inv``,
``quantization_config`` fp8; norms random in [0.5, 2]; bf16 embeddings and an untied ``lm_head``) into
``WORK_DIR/src`` (norms, codes and scales in three shards), converts it with ``--dequantize`` (q/k/v and
gate/up of every layer widened and folded to bf16, o/down copied) and reports wall time, peak RSS of
the converter (``ru_maxrss`` of the child; the source is written by another child first, so this
process stays small: a forked child's high-water mark starts at its parent's size) and the time of ``cp -r`` of the OUTPUT folder (the bytes a
plain copy of the result would move), best of ``--repeat``. Random codes exclude the NaN bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def _write(path: Path, tensors: dict[str, tuple[str, tuple[int, ...], np.ndarray | None]], rng) -> None:
    """A safetensors file; ``None`` data: random FP8 codes (no NaN) of that shape, streamed."""
    header, off = {}, 0
    for name, (dtype, shape, data) in tensors.items():
        n = int(np.prod(shape)) * {"F8_E4M3": 1, "F32": 4, "BF16": 2, "U8": 1}[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    block = rng.integers(0, 256, 16 << 20, dtype=np.uint8)
    block[(block & 0x7F) == 0x7F] = 0x3F
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name, (dtype, shape, data) in tensors.items():
            if data is not None:
                f.write(np.ascontiguousarray(data).tobytes())
                continue
            left = int(np.prod(shape))
            while left:
                k = min(left, block.size)
                start = int(rng.integers(0, block.size - k + 1))
                f.write(block[start:start + k].tobytes())
                left -= k


def make(src: Path, layers: int, hidden: int, inter: int, rng) -> None:
    src.mkdir(parents=True, exist_ok=True)
    heads, kv, hd, vocab = hidden // 128, max(1, hidden // 512), 128, 32000
    bf = lambda a: (np.asarray(a, np.float32).view(np.uint32) >> 16).astype(np.uint16)  # noqa: E731
    norms, codes, rest = {}, {}, {}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("input_layernorm", "post_attention_layernorm"):
            norms[p + n + ".weight"] = ("BF16", (hidden,), bf(rng.uniform(0.5, 2, hidden)))
        for n in ("q_norm", "k_norm"):
            norms[p + f"self_attn.{n}.weight"] = ("BF16", (hd,), bf(rng.uniform(0.5, 2, hd)))
        for n, (o, k) in {"self_attn.q_proj": (heads * hd, hidden), "self_attn.k_proj": (kv * hd, hidden),
                          "self_attn.v_proj": (kv * hd, hidden), "self_attn.o_proj": (hidden, heads * hd),
                          "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
                          "mlp.down_proj": (hidden, inter)}.items():
            codes[p + n + ".weight"] = ("F8_E4M3", (o, k), None)
            grid = (-(-o // 128), -(-k // 128))
            rest[p + n + ".weight_scale_inv"] = ("F32", grid, rng.uniform(1e-4, 1e-2, grid).astype(np.float32))
    norms["model.norm.weight"] = ("BF16", (hidden,), bf(rng.uniform(0.5, 2, hidden)))
    rest["model.embed_tokens.weight"] = ("BF16", (vocab, hidden), bf(rng.normal(0, 0.02, (vocab, hidden))))
    rest["lm_head.weight"] = ("BF16", (vocab, hidden), bf(rng.normal(0, 0.02, (vocab, hidden))))
    shards = {"model-00001-of-00003.safetensors": norms, "model-00002-of-00003.safetensors": codes,
              "model-00003-of-00003.safetensors": rest}
    wm = {}
    for fname, ts in shards.items():
        _write(src / fname, dict(sorted(ts.items())), rng)
        wm.update({k: fname for k in ts})
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    (src / "config.json").write_text(json.dumps({
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "head_dim": hd, "vocab_size": vocab, "tie_word_embeddings": False,
        "rms_norm_eps": 1e-6, "torch_dtype": "bfloat16",
        "quantization_config": {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                "weight_block_size": [128, 128]}}))


def make_mxfp4(src: Path, layers: int, hidden: int, inter: int, experts: int, rng) -> None:
    src.mkdir(parents=True, exist_ok=True)
    heads, kv, hd, vocab = 64, 8, 64, 8192
    bf = lambda a: (np.asarray(a, np.float32).view(np.uint32) >> 16).astype(np.uint16)  # noqa: E731
    rnd = lambda *shape: ("BF16", shape, bf(rng.normal(0, 0.02, shape)))  # noqa: E731
    norms, codes, rest = {}, {}, {}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("input_layernorm", "post_attention_layernorm"):
            norms[p + n + ".weight"] = ("BF16", (hidden,), bf(rng.uniform(0.5, 2, hidden)))
        for n, o in (("q_proj", heads * hd), ("k_proj", kv * hd), ("v_proj", kv * hd)):
            rest[p + f"self_attn.{n}.weight"], rest[p + f"self_attn.{n}.bias"] = rnd(o, hidden), rnd(o)
        rest[p + "self_attn.o_proj.weight"], rest[p + "self_attn.o_proj.bias"] = rnd(hidden, heads * hd), rnd(hidden)
        rest[p + "self_attn.sinks"] = rnd(heads)
        rest[p + "mlp.router.weight"], rest[p + "mlp.router.bias"] = rnd(experts, hidden), rnd(experts)
        for n, (o, k) in (("gate_up_proj", (2 * inter, hidden)), ("down_proj", (hidden, inter))):
            codes[p + f"mlp.experts.{n}_blocks"] = ("U8", (experts, o, k // 32, 16), None)
            rest[p + f"mlp.experts.{n}_scales"] = ("U8", (experts, o, k // 32),
                                                   rng.integers(118, 126, (experts, o, k // 32), dtype=np.uint8))
            rest[p + f"mlp.experts.{n}_bias"] = rnd(experts, o)
    norms["model.norm.weight"] = ("BF16", (hidden,), bf(rng.uniform(0.5, 2, hidden)))
    rest["model.embed_tokens.weight"], rest["lm_head.weight"] = rnd(vocab, hidden), rnd(vocab, hidden)
    _shards(src, norms, codes, rest, rng)
    (src / "config.json").write_text(json.dumps({
        "architectures": ["GptOssForCausalLM"], "model_type": "gpt_oss", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": kv, "head_dim": hd, "vocab_size": vocab, "num_local_experts": experts,
        "num_experts_per_tok": 4, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "quantization_config": {"quant_method": "mxfp4", "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}}))


def _shards(src: Path, norms: dict, codes: dict, rest: dict, rng) -> None:
    shards = {"model-00001-of-00003.safetensors": norms, "model-00002-of-00003.safetensors": codes,
              "model-00003-of-00003.safetensors": rest}
    wm = {}
    for fname, ts in shards.items():
        _write(src / fname, dict(sorted(ts.items())), rng)
        wm.update({k: fname for k in ts})
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))


def evict(*folders: Path) -> None:
    """Drop these folders' files from the page cache (``sync``, then ``POSIX_FADV_DONTNEED`` per file:
    only these files, not the whole machine's cache as ``drop_caches`` would)."""
    os.sync()
    for folder in folders:
        for f in folder.glob("*") if folder.exists() else ():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


CPU: dict[str, float] = {}  # label -> the CPU seconds (user + sys) of the last timed run


def timed(argv: list[str], code: Path = ROOT, label: str = "") -> tuple[float, int]:
    """Wall seconds and the child's peak RSS (bytes); ``code``: the checkout whose streamfold runs; its
    CPU seconds (user + sys, less sensitive than wall time to a shared machine's load) in ``CPU[label]``."""
    t0 = time.perf_counter()
    # cwd too: ``python -m`` puts the working directory first on sys.path, ahead of PYTHONPATH
    pid = subprocess.Popen(argv, env={**os.environ, "PYTHONPATH": str(code)}, cwd=code).pid
    _, status, ru = os.wait4(pid, 0)
    if status:
        sys.exit(f"{argv[:4]} failed ({status})")
    CPU[label] = ru.ru_utime + ru.ru_stime
    return time.perf_counter() - t0, ru.ru_maxrss * 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=None, help="default 4096 (fp8), 2880 (mxfp4)")
    ap.add_argument("--inter", type=int, default=None, help="default 12288 (fp8), 2880 (mxfp4)")
    ap.add_argument("--format", choices=("fp8", "mxfp4"), default="fp8")
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--before", type=Path, default=None,
                    help="another checkout (e.g. `git worktree add /tmp/before main`) timed in the same run")
    ap.add_argument("--cold", action="store_true", help="evict the source (and, for cp, the output) first")
    ap.add_argument("--verify", action="store_true", help="also time `streamfold verify` of the output")
    ap.add_argument("--make-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    mx = args.format == "mxfp4"
    args.hidden = args.hidden or (2880 if mx else 4096)
    args.inter = args.inter or (2880 if mx else 12288)
    args.work = args.work.resolve()
    src, dst, cp = args.work / "src", args.work / "out", args.work / "cp"
    if args.make_only:
        if mx:
            make_mxfp4(src, args.layers, args.hidden, args.inter, args.experts, np.random.default_rng(0))
        else:
            make(src, args.layers, args.hidden, args.inter, np.random.default_rng(0))
        return
    if not (src / "config.json").exists():
        timed([sys.executable, str(Path(__file__).resolve()), str(args.work), "--make-only", "--layers", str(args.layers),
               "--hidden", str(args.hidden), "--inter", str(args.inter), "--format", args.format,
               "--experts", str(args.experts)])
    codes = {"after": ROOT} if args.before is None else {"before": args.before.resolve(), "after": ROOT}
    best = dict.fromkeys(codes, float("inf"))
    rss = dict.fromkeys(codes, 0)
    vbest, vrss = dict.fromkeys(codes, float("inf")), dict.fromkeys(codes, 0)
    cp_best = float("inf")
    cpu: dict[str, float] = {}
    for _ in range(args.repeat):
        for label, code in codes.items():  # interleaved: the load of the moment hits both alike
            shutil.rmtree(dst, ignore_errors=True)
            if args.cold:
                evict(src)
            t, r = timed([sys.executable, "-m", "streamfold", str(src), str(dst), "--dequantize", "-q",
                          "--workers", str(args.workers)], code, label)
            if t < best[label]:
                cpu[label] = CPU[label]
            best[label], rss[label] = min(best[label], t), max(rss[label], r)
            if args.verify:
                if args.cold:
                    evict(src, dst)
                t, r = timed([sys.executable, "-m", "streamfold", "verify", str(src), str(dst), "-q"], code)
                vbest[label], vrss[label] = min(vbest[label], t), max(vrss[label], r)
        shutil.rmtree(cp, ignore_errors=True)
        if args.cold:
            evict(dst)
        t = timed(["cp", "-r", str(dst), str(cp)], label="cp")[0]
        if t < cp_best:
            cp_best, cpu["cp"] = t, CPU["cp"]
        shutil.rmtree(cp, ignore_errors=True)
    size = lambda p: sum(f.stat().st_size for f in p.glob("*.safetensors"))  # noqa: E731
    out = size(dst)
    print(f"source {size(src) / 1e9:.2f} GB -> output {out / 1e9:.2f} GB ({'cold' if args.cold else 'warm'} "
          f"cache, load average {os.getloadavg()[0]:.1f}); cp -r of the output best {cp_best:.2f} s "
          f"(CPU {cpu['cp']:.2f} s)")
    for label in codes:
        line = (f"  {label}: --dequantize (workers {args.workers}) best {best[label]:.2f} s "
                f"({out / best[label] / 1e9:.2f} GB/s of output), peak RSS {rss[label] / 2**20:.0f} MB, "
                f"ratio {best[label] / cp_best:.2f}x, CPU {cpu[label]:.2f} s")
        if args.verify:
            line += f"; verify best {vbest[label]:.2f} s, peak RSS {vrss[label] / 2**20:.0f} MB"
        print(line)
    shutil.rmtree(dst, ignore_errors=True)

if __name__ == "__main__":
    main()
