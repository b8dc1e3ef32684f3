"""Time the dequantize-and-fold kernel (quant.decode + quant.kernel) per format, one band at a time.

    PYTHONPATH=. python benchmarks/time_dequant.py [--repeat 3] [--rows 2048] [--cols 7168]

For each format (FP8 block 128x128 with F32 scales, the same with ue8m0 scales, MXFP4, compressed-
tensors INT4 group 32) and each multiplier (none: widen only; a bf16 norm; a float32 ``1 + w``), decodes
and folds a ``rows x cols`` weight in 128-row bands (MXFP4: 128 rows of one expert) to bf16 through the
float64 kernel, and FP8 and MXFP4 also through :mod:`streamfold.quant.fast32` (MXFP4 there as the engine
writes it: 128 inputs of the transposed ``[in, out]`` at a time), and prints
GB/s of OUTPUT bytes per core (thread CPU time, best of --repeat) and the process's peak RSS after all
runs (it does not grow with --rows: the work is per band).
"""
from __future__ import annotations

import argparse
import resource
import time

import ml_dtypes
import numpy as np

from streamfold.core.fold import Scratch
from streamfold.quant import decode as D
from streamfold.quant import fast32 as F
from streamfold.quant.kernel import code_bits, dequant_fold, sig_bits

BAND = 128


def _formats(rows: int, cols: int, rng):
    codes = rng.integers(0, 256, (rows, cols), dtype=np.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0  # no NaN codes
    grid = D.block_grid(rows, cols, (128, 128))
    s_f32 = rng.uniform(1e-4, 1e-2, grid).astype(np.float32).astype(np.float64)
    s_pow2 = np.exp2(np.ceil(np.log2(s_f32)))
    blocks = rng.integers(0, 256, (rows, cols // 32, 16), dtype=np.uint8)
    e8 = rng.integers(115, 125, (rows, cols // 32), dtype=np.uint8)
    packed = rng.integers(-2**31, 2**31, (rows, cols // 8), dtype=np.int64).astype(np.int32)
    s_int = D.scale_values(rng.uniform(1e-3, 2e-2, (rows, cols // 32)).astype(ml_dtypes.bfloat16).view(np.uint16),
                           "BF16")

    def f64(band):  # the float64 reference: exact values, then dequant_fold
        def fold(r0, r1, g, out):
            vals, bits = band(r0, r1)
            dequant_fold(vals, g, "BF16", out, bits)
        return fold

    def fp8(scale):
        def band(r0, r1):
            t = scale[r0 // 128:(r1 - 1) // 128 + 1]
            return D.fp8_block_band(codes[r0:r1], t, (128, 128), r0), code_bits("fp8") + sig_bits(t)
        return band

    def fp8_fast(scale):
        def fold(r0, r1, g, out):
            assert F.fp8_block(codes[r0:r1], scale[r0 // 128:], (128, 128), r0, g, "BF16", out, scratch)
        return fold

    def mx_fast(r0, r1, g, out):  # 128 rows of one expert's [in, out] (here: cols x rows transposed)
        assert F.mxfp4_rows(blocks[:, r0 // 32:-(-r1 // 32)], e8[:, r0 // 32:-(-r1 // 32)], 0, r1 - r0,
                            None if g is None else g[r0:r1], "BF16", out, scratch)

    scratch = Scratch()
    yield "fp8 block, F32 scales", f64(fp8(s_f32))
    yield "  the same, fast32", fp8_fast(s_f32)
    yield "fp8 block, ue8m0 scales", f64(fp8(s_pow2))
    yield "  the same, fast32", fp8_fast(s_pow2)
    yield "mxfp4", f64(lambda r0, r1: (D.mxfp4_band(blocks[r0:r1], e8[r0:r1]), code_bits("e2m1") + 1))
    yield "  mxfp4 transposed, fast32", mx_fast
    yield "int4 group 32, bf16 scales", f64(lambda r0, r1: (
        D.int_pack_band(packed[r0:r1], 4, cols, s_int[r0:r1], 32), code_bits("int", 4) + sig_bits(s_int[r0:r1])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--cols", type=int, default=7168)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    rows, cols = args.rows, args.cols
    norms = {
        "widen": None,
        "bf16 g": rng.uniform(0.5, 2, cols).astype(ml_dtypes.bfloat16).astype(np.float32),
        "f32 1+w": (np.float32(1) + (rng.standard_normal(cols) * 0.3).astype(np.float32)),
    }
    out = np.empty((BAND, max(cols, rows)), dtype=np.uint16)
    for label, fold in _formats(rows, cols, rng):
        for glabel, g in norms.items():
            best = float("inf")
            mx = "transposed" in label  # MXFP4 as gpt-oss writes it: bands of inputs, [in, out]
            for _ in range(args.repeat):
                t0 = time.thread_time()
                for r0 in range(0, cols if mx else rows, BAND):
                    r1 = min(cols if mx else rows, r0 + BAND)
                    fold(r0, r1, g, out[:r1 - r0, :rows] if mx else out[:r1 - r0, :cols])
                best = min(best, time.thread_time() - t0)
            nbytes = rows * cols * 2
            print(f"{label:28s} {glabel:8s} -> bf16: {nbytes / best / 1e9:.3f} GB/s of output "
                  f"({nbytes / 2**20:.0f} MB in {best * 1e3:.0f} ms)")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB "
          f"(inputs for all formats held in memory: {rows} x {cols})")


if __name__ == "__main__":
    main()
