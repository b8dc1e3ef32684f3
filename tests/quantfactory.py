"""Quantized tensors for the tests, made with torch the way the published checkpoints are made."""
from __future__ import annotations

import torch


def quantize_fp8_block(w: torch.Tensor, block: tuple[int, int], ue8m0: bool = False):
    """``w`` [rows, cols] float32 -> (F8_E4M3FN codes, F32 scales [ceil(rows/br), ceil(cols/bc)]):
    amax/448 per tile (rounded up to a power of two for ue8m0), edge tiles included."""
    rows, cols = w.shape
    br, bc = block
    gr, gc = -(-rows // br), -(-cols // bc)
    scale = torch.empty(gr, gc, dtype=torch.float32)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(gr):
        for j in range(gc):
            t = w[i * br:(i + 1) * br, j * bc:(j + 1) * bc]
            s = t.abs().amax().clamp(min=1e-12) / 448.0
            if ue8m0:
                s = torch.exp2(torch.ceil(torch.log2(s)))
            scale[i, j] = s
            q[i * br:(i + 1) * br, j * bc:(j + 1) * bc] = (t / s).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q, scale
