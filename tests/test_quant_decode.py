"""The quantized-weight decoders equal the reference dequantizers run on CPU: transformers' own
finegrained-FP8 and MXFP4 code, and the compressed-tensors package's unpacking, on tiny tensors
quantized here with torch. The decoders' float64 values are exact, so rounded once to float32 they
must equal the references' float32 products (one IEEE rounding of the same exact product)."""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from transformers.integrations.finegrained_fp8 import Fp8Dequantize, _dequantize_fp8_weight
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from streamfold.core.errors import StreamfoldError
from streamfold.quant import decode as D
from tests.quantfactory import quantize_fp8_block


def codes(q: torch.Tensor) -> np.ndarray:
    return q.view(torch.uint8).numpy()


def decode_bands(q: np.ndarray, scale: np.ndarray, block, band: int, start: int = 0) -> np.ndarray:
    """Decode in row bands (the first one ``start`` rows long), each with only its scale rows."""
    rows = q.shape[0]
    out = np.empty(q.shape, dtype=np.float64)
    edges = sorted({0, *range(start, rows, band), rows} - {rows}) + [rows]
    for r0, r1 in zip(edges, edges[1:]):
        t0, t1 = r0 // block[0], (r1 - 1) // block[0] + 1
        out[r0:r1] = D.fp8_block_band(q[r0:r1], scale[t0:t1].astype(np.float64), block, r0)
    return out


def test_fp8_table_equals_torch():
    all_codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    ref = all_codes.to(torch.float64).numpy()
    np.testing.assert_array_equal(D.decode_fp8(np.arange(256, dtype=np.uint8)), ref)
    assert np.isnan(D.F8_E4M3FN_TABLE[[0x7F, 0xFF]]).all()


def test_fp8_block_equals_transformers():
    torch.manual_seed(0)
    block = (128, 128)
    w = torch.randn(256, 384) * torch.logspace(-3, 1, 384)
    q, scale = quantize_fp8_block(w, block)
    ref = Fp8Dequantize(None)._dequantize_one(q, scale, output_dtype=torch.float32).numpy()
    for band, start in ((128, 0), (96, 64), (1, 0)):
        got = decode_bands(codes(q), scale.numpy(), block, band, start)
        np.testing.assert_array_equal(got.astype(np.float32), ref)


@pytest.mark.parametrize("shape,block", [((576, 256), (128, 128)), ((224, 320), (128, 128)),
                                         ((300, 200), (64, 96))])
def test_fp8_block_ragged_equals_transformers(shape, block):
    """Ragged edge tiles: the block size comes from the config, never the shapes (transformers'
    load-time dequantizer derives it from the scale grid and refuses these; its backward-pass
    helper takes the block size and is the reference here)."""
    torch.manual_seed(1)
    w = torch.randn(*shape) * 0.02
    q, scale = quantize_fp8_block(w, block)
    assert tuple(scale.shape) == D.block_grid(*shape, block)
    ref = _dequantize_fp8_weight(q, scale, list(block), torch.float32).numpy()
    got = decode_bands(codes(q), scale.numpy(), block, 128)
    np.testing.assert_array_equal(got.astype(np.float32), ref)
    # the last tile row is short (576 = 4*128 + 64): its rows use that tile's own scale
    last = (shape[0] - 1) // block[0]
    np.testing.assert_array_equal(got[-1, :3], D.decode_fp8(codes(q)[-1, :3]) * scale[last, 0].item())


def test_ue8m0_scales_f32_and_bytes_equal_transformers():
    torch.manual_seed(2)
    block = (128, 128)
    q, scale = quantize_fp8_block(torch.randn(256, 256), block, ue8m0=True)
    assert D.all_powers_of_two(scale.numpy())
    assert not D.all_powers_of_two(quantize_fp8_block(torch.randn(256, 256), block)[1].numpy())
    # the same scales as E8M0 bytes (U8, or the F8_E8M0 dtype): 2^(u-127)
    u8 = (torch.log2(scale).to(torch.int32) + 127).to(torch.uint8)
    ref = Fp8Dequantize(None)._dequantize_one(q, u8, output_dtype=torch.float32).numpy()
    for dtype in ("U8", "F8_E8M0", "F32"):
        raw = scale.numpy() if dtype == "F32" else u8.numpy()
        s = D.scale_values(raw, dtype)
        np.testing.assert_array_equal(s, scale.numpy().astype(np.float64))
        got = D.fp8_block_band(codes(q), s, block, 0)
        np.testing.assert_array_equal(got.astype(np.float32), ref)
    e8m0 = np.arange(255, dtype=np.uint8).view(ml_dtypes.float8_e8m0fnu).astype(np.float64)
    np.testing.assert_array_equal(D.E8M0_TABLE[:255], e8m0)
    assert np.isnan(D.E8M0_TABLE[255])


def test_bf16_and_f16_scales():
    s = np.array([1.5, -3.25, 2.0 ** -20, 65504.0], dtype=np.float32)
    for dtype, np_dt in (("BF16", ml_dtypes.bfloat16), ("F16", np.float16)):
        raw = s.astype(np_dt)
        np.testing.assert_array_equal(D.scale_values(raw.view(np.uint16), dtype), raw.astype(np.float64))
    with pytest.raises(StreamfoldError, match="scale dtype I32"):
        D.scale_values(s.view(np.int32), "I32", "x.weight_scale")


def test_block_scale_shape_is_checked_against_config_block():
    D.check_block_scale("w", (576, 256), (5, 2), (128, 128))
    D.check_block_scale("e", (4, 576, 256), (4, 5, 2), (128, 128))
    with pytest.raises(StreamfoldError, match=r"^w: scale shape \[4, 2\] is not the 128x128 block grid \[5, 2\]"):
        D.check_block_scale("w", (576, 256), (4, 2), (128, 128))
    with pytest.raises(StreamfoldError, match="^w: scale shape"):
        D.check_block_scale("w", (576, 256), (5,), (128, 128))


def test_mxfp4_equals_transformers():
    """gpt-oss experts: blocks U8 [E, rows, G, 16], scales U8 [E, rows, G]; transformers returns
    [E, G*32, rows] (input-major); the decoder gives one expert's [rows, G*32]."""
    rng = np.random.default_rng(3)
    E, rows, G = 3, 40, 4
    blocks = rng.integers(0, 256, (E, rows, G, 16), dtype=np.uint8)
    scales = rng.integers(100, 150, (E, rows, G), dtype=np.uint8)
    ref = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32)
    assert tuple(ref.shape) == (E, G * 32, rows)
    for e in range(E):
        got = D.mxfp4_band(blocks[e], scales[e])
        np.testing.assert_array_equal(got.T.astype(np.float32), ref[e].numpy())
        np.testing.assert_array_equal(np.signbit(got.T), np.signbit(ref[e].numpy()))  # -0.0 codes
    # band = a slice of rows of one expert
    np.testing.assert_array_equal(D.mxfp4_band(blocks[1, 8:24], scales[1, 8:24]).T.astype(np.float32),
                                  ref[1, :, 8:24].numpy())


def _ct_pack(rows, cols, bits, group, symmetric, seed):
    gen = torch.Generator().manual_seed(seed)
    lo, hi = -(1 << (bits - 1)), 1 << (bits - 1)
    q = torch.randint(lo, hi, (rows, cols), dtype=torch.int8, generator=gen)
    ngroups = cols // group if group else 1
    zp = torch.randint(lo, hi, (rows, ngroups), dtype=torch.int8, generator=gen)
    scale = (torch.rand(rows, ngroups, generator=gen) * 0.01).to(torch.bfloat16)
    sd = {"weight_packed": pack_to_int32(q, bits), "weight_scale": scale,
          "weight_shape": torch.tensor([rows, cols])}
    if not symmetric:
        sd["weight_zero_point"] = pack_to_int32(zp, bits, packed_dim=0)
    strategy = "group" if group else "channel"
    args = QuantizationArgs(num_bits=bits, type="int", strategy=strategy, group_size=group, symmetric=symmetric)
    return sd, QuantizationScheme(targets=["Linear"], weights=args)


@pytest.mark.parametrize("bits,group,symmetric", [(4, 32, True), (4, 32, False), (8, 32, False),
                                                  (8, None, True), (3, 32, False)])
def test_int_pack_equals_compressed_tensors(bits, group, symmetric):
    """W4A16/W8A16 pack-quantized: compressed-tensors' own decompress with the scale widened to float32
    first (its dequantize multiplies in the scale's dtype: bf16 would round ``q·s``)."""
    rows, cols = 72, 128
    sd, scheme = _ct_pack(rows, cols, bits, group, symmetric, seed=bits * 10 + symmetric)
    ref_sd = dict(sd, weight_scale=sd["weight_scale"].float())
    ref = PackedQuantizationCompressor.decompress(ref_sd, scheme)["weight"].numpy()
    scale = D.scale_values(sd["weight_scale"].view(torch.uint16).numpy(), "BF16")
    zp = None
    if not symmetric:
        zp = D.unpack_zero_points(sd["weight_zero_point"].numpy(), bits, rows).astype(np.float64)
    got = D.int_pack_band(sd["weight_packed"].numpy(), bits, cols, scale, group, zp)
    np.testing.assert_array_equal(got.astype(np.float32), ref)
    # a band of rows decodes alone (zero points unpacked once for the tensor, then sliced)
    band = D.int_pack_band(sd["weight_packed"].numpy()[8:40], bits, cols, scale[8:40], group,
                           None if zp is None else zp[8:40])
    np.testing.assert_array_equal(band, got[8:40])


def test_unpack_int32_refuses_short_words():
    with pytest.raises(StreamfoldError, match="cannot hold"):
        D.unpack_int32(np.zeros((2, 1), dtype=np.int32), 4, 9)
