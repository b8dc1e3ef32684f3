"""Time the fold kernel (fold.scale_chunk) on one ~64 MB bf16 tensor, in the engine's 8 MB row chunks.

    PYTHONPATH=. python benchmarks/time_kernel.py [--repeat 5]

Prints GB/s of source bytes per core (thread CPU time, so a busy machine skews it less) for: a bf16 norm
(the exact-in-float32 path), a float32 norm with full 24-bit values, and ``1 + w`` formed in float32
from a bf16 ``w`` (Gemma, Qwen3-Next/3.5, Nemotron), each to bf16 and to float32 output. Into bf16, the
last two take the float32 midpoint kernel (before it: the float64 path).
"""
from __future__ import annotations

import argparse
import time

import ml_dtypes
import numpy as np

from streamfold.core.fold import Scratch, scale_chunk


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--cols", type=int, default=4096)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    w = rng.standard_normal((args.rows, args.cols), dtype=np.float32).astype(ml_dtypes.bfloat16)
    g_bf16 = rng.uniform(0.5, 2, args.cols).astype(ml_dtypes.bfloat16).astype(np.float32).reshape(1, -1)
    g_f32 = rng.uniform(0.5, 2, args.cols).astype(np.float32).reshape(1, -1)
    w_norm = (rng.standard_normal(args.cols) * 0.3).astype(ml_dtypes.bfloat16).astype(np.float32)
    g_one_plus = (np.float32(1) + w_norm).reshape(1, -1)  # 1 + w in float32, as the models compute it
    step = (8 << 20) // (args.cols * 4)  # rows per chunk as the engine makes them (8 MB chunks)
    for label, g in (("bf16 norm", g_bf16), ("f32 norm", g_f32), ("f32 1+w", g_one_plus)):
        for out_dtype, np_out in (("BF16", ml_dtypes.bfloat16), ("F32", np.float32)):
            s = Scratch()
            out = np.empty((step, args.cols), np_out)
            best = float("inf")
            for _ in range(args.repeat):
                t0 = time.thread_time()
                for r in range(0, args.rows, step):
                    n = min(step, args.rows - r)
                    scale_chunk(w[r:r + n], g, "BF16", out_dtype, out[:n], s)
                best = min(best, time.thread_time() - t0)
            print(f"{label} x bf16 weight -> {out_dtype}: {w.nbytes / best / 1e9:.2f} GB/s "
                  f"({w.nbytes / 2**20:.0f} MB in {best * 1e3:.1f} ms, best of {args.repeat})")


if __name__ == "__main__":
    main()
