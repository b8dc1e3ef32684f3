"""Every folded element is the exact product rounded once: converted output compared byte for byte
with an oracle written here (float64 product, rounded once by ml_dtypes or numpy), never with the
kernel's own formula; and verify now rejects the near misses its old bound let through.

The toy checkpoint has tensors much larger than one chunk (the memory budget forces many), scaled
along the columns of ``[out, in]`` linears, along axis 1 of a fused ``[experts, in, out]`` tensor
(GPT-OSS) and along axis 0 of an ``[in, out]`` tensor; norms in float32 (full 24-bit values, NaN
payloads, infinity, subnormals), bf16 and float16; weights in bf16, float16 and float32; row 0 holds
NaN, infinity, subnormal and max-finite inputs, some of which overflow to infinity when scaled.
"""
from __future__ import annotations

import json
import struct
from fractions import Fraction
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import streamfold
from streamfold.run.engine import Engine
from streamfold.check.oracle import check_scaled
from streamfold.core.reader import Checkpoint

BF16 = ml_dtypes.bfloat16
NP = {"BF16": BF16, "F16": np.float16, "F32": np.float32}
UINT = {"BF16": np.uint16, "F16": np.uint16, "F32": np.uint32}
QUIET = {"BF16": 0x0040, "F16": 0x0200, "F32": 0x00400000}
SIGN = {"BF16": 0x8000, "F16": 0x8000, "F32": 0x80000000}
H = 96  # norm width
BUDGET = 70_000  # -> 64 KiB chunks: every folded tensor below spans at least 4 of them

# layer -> (norm dtype, weight dtype): the combinations the kernel treats differently
LAYERS = [("F32", "BF16"), ("BF16", "BF16"), ("F16", "BF16"), ("F32", "F16"), ("F32", "F32"),
          ("BF16", "F16")]
RULES = {"exacttoy": {
    "model_types": ["exacttoy"],
    "folds": [{"norm": "layers.{n}.norm", "into": [
        "layers.{n}.lin",
        {"weight": "layers.{n}.experts.gate_up", "axis": 1},
        {"weight": "layers.{n}.t.weight", "axis": 0}]}],
}}


def save(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """A minimal safetensors writer (independent of streamfold's writer)."""
    names = {np.dtype(BF16): "BF16", np.dtype(np.float16): "F16", np.dtype(np.float32): "F32"}
    header, off, blobs = {}, 0, []
    for k, v in tensors.items():
        b = np.ascontiguousarray(v).tobytes()
        header[k] = {"dtype": names[v.dtype], "shape": list(v.shape), "data_offsets": [off, off + len(b)]}
        off += len(b)
        blobs.append(b)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + b"".join(blobs))


def bits(a: np.ndarray, dt: str) -> np.ndarray:
    return np.ascontiguousarray(a).view(UINT[dt])


def special_norm(dt: str, rng) -> np.ndarray:
    g = rng.uniform(0.25, 3.0, H) * rng.choice([-1, 1], H)
    g = g.astype(np.float32)  # full 24-bit values for a float32 norm
    g[:8] = [1.5, 3.0, 2.0 ** -20, 1.0, 1 + 2 ** -8, 2.0 ** -20, 1.5, 2.0]
    g = g.astype(NP[dt])
    if dt == "F32":
        u = g.view(np.uint32)
        u[8:13] = [0x7FFFFFFF, 0xFFFFFF00, 0x7F800001, 0x7F800000, 0x00000001]  # NaNs with payloads, +inf, subnormal
        u[13] = 0x3F800001  # 1 + 2^-23: the float32 product of bf16 x this is inexact
    return g


def special_weights(shape, dt: str, rng, row_axis_len: int) -> np.ndarray:
    w = (rng.standard_normal(shape) * 2).astype(np.float32).astype(NP[dt])
    flat = w.reshape(-1)
    fi = ml_dtypes.finfo(NP[dt]) if dt == "BF16" else np.finfo(NP[dt])
    specials = [np.nan, -np.nan, np.inf, -np.inf, fi.smallest_subnormal, -fi.smallest_subnormal,
                fi.max, -fi.max, 0.0, -0.0, fi.smallest_normal, fi.max]
    flat[:len(specials)] = np.array(specials, dtype=np.float64).astype(NP[dt])  # row 0
    return w


def oracle(w: np.ndarray, g: np.ndarray, axis: int, out_dt: str) -> np.ndarray:
    """The exact product (float64: exact for these dtypes) rounded once by ml_dtypes / numpy."""
    shape = [1] * w.ndim
    shape[axis] = -1
    with np.errstate(all="ignore"):
        p = w.astype(np.float64) * g.astype(np.float32).astype(np.float64).reshape(shape)
        return p.astype(NP[out_dt])


def assert_exact(got: np.ndarray, want: np.ndarray, dt: str, what: str) -> None:
    g, w = bits(got, dt).reshape(-1), bits(want, dt).reshape(-1)
    nan = np.isnan(want.astype(np.float32)).reshape(-1)
    assert np.array_equal(g[~nan], w[~nan]), (
        f"{what}: {int(np.sum(g[~nan] != w[~nan]))} elements differ from the correctly rounded product")
    assert np.all(np.isnan(got.astype(np.float32)).reshape(-1)[nan]), f"{what}: NaN in, not NaN out"
    assert np.all(g[nan] & QUIET[dt]), f"{what}: NaN out is not quiet"
    assert np.array_equal(g[nan] & SIGN[dt], w[nan] & SIGN[dt]), f"{what}: NaN sign lost"


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("exact")
    rng = np.random.default_rng(7)
    norms, weights = {}, {}
    for n, (ndt, wdt) in enumerate(LAYERS):
        norms[f"layers.{n}.norm.weight"] = special_norm(ndt, rng)
        weights[f"layers.{n}.lin.weight"] = special_weights((2800, H), wdt, rng, H)
        weights[f"layers.{n}.experts.gate_up"] = special_weights((3, H, 800), wdt, rng, H)
        weights[f"layers.{n}.t.weight"] = special_weights((H, 2800), wdt, rng, H)
        weights[f"layers.{n}.other.weight"] = special_weights((H, 40), wdt, rng, H)
    save(d / "a.safetensors", norms)
    save(d / "b.safetensors", weights)
    wm = {k: "a.safetensors" for k in norms} | {k: "b.safetensors" for k in weights}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    (d / "config.json").write_text(json.dumps({"model_type": "exacttoy"}))
    return d, norms, weights


CONSUMERS = [("lin.weight", 1), ("experts.gate_up", 1), ("t.weight", 0)]


@pytest.mark.parametrize("merged", ["source", "float32"])
@pytest.mark.parametrize("workers", [1, 3])
def test_folds_are_correctly_rounded(toy, tmp_path, merged, workers):
    d, norms, weights = toy
    out = tmp_path / "out"
    streamfold.convert(d, out, rules=RULES, memory_budget=BUDGET, workers=workers, merged_dtype=merged)
    ckpt = Checkpoint(out)
    chunk = Engine(workers=workers, memory_budget=BUDGET).chunk_bytes  # the chunking the tasks were cut with
    for n, (ndt, wdt) in enumerate(LAYERS):
        g = norms[f"layers.{n}.norm.weight"]
        out_dt = "F32" if merged == "float32" and wdt != "F32" else wdt
        for suffix, axis in CONSUMERS:
            name = f"layers.{n}.{suffix}"
            w = weights[name]
            assert w.nbytes >= 4 * chunk, name  # many chunks
            got = ckpt.array(name)
            assert got.dtype == NP[out_dt]
            assert_exact(got, oracle(w, g, axis, out_dt), out_dt, f"{name} ({ndt} norm, {wdt} weight)")
        assert bits(ckpt.array(f"layers.{n}.other.weight"), wdt).tobytes() == \
            bits(weights[f"layers.{n}.other.weight"], wdt).tobytes()
    r = streamfold.verify(d, out, rules=RULES, memory_budget=BUDGET)
    assert r.ok, r.summary()


def test_specials_behave(toy, tmp_path):
    """The row-0 specials: overflow to infinity, NaN payload norms stay NaN, infinity stays infinity."""
    d, norms, weights = toy
    out = tmp_path / "out"
    streamfold.convert(d, out, rules=RULES, memory_budget=BUDGET)
    ckpt = Checkpoint(out)
    lin = ckpt.array("layers.0.lin.weight").astype(np.float32)  # float32 norm, bf16 weights
    assert np.isnan(lin[0, 0]) and np.isnan(lin[0, 1]) and lin[0, 2] == np.inf and lin[0, 3] == -np.inf
    assert lin[0, 6] == np.inf and lin[0, 7] == -np.inf  # max-finite x 1.5, -max-finite x 2: overflow
    assert lin[0, 5] == 0 and lin[0, 5].view(np.uint32) >> 31 == 1  # -subnormal x 2^-20: -0
    assert np.all(np.isnan(lin[1:, 8:11])) and np.all(np.isinf(lin[1:, 11]) | np.isnan(lin[1:, 11]))
    assert np.all(lin[1:, 8].view(np.uint32) >> 31 == 0) and np.all(lin[1:, 9].view(np.uint32) >> 31 == 1)


def test_old_float32_product_was_inexact():
    """Products a float32 multiply rounds before the bf16 rounding: the kernel must round them once."""
    from streamfold.core.fold import Scratch, scale_chunk
    # found by search: about 5.5e-6 of random bf16 x float32 pairs double-round through float32
    w = np.array([[0xBE52]], dtype=np.uint16).view(BF16)
    g = np.array([[0x3FF94B95]], dtype=np.uint32).view(np.float32)
    want = oracle(w, g.reshape(-1), 1, "BF16")
    via_f32 = (w.astype(np.float32) * g).astype(BF16)
    assert bits(via_f32, "BF16")[0, 0] != bits(want, "BF16")[0, 0]  # the old kernel's answer was wrong
    out = np.empty((1, 1), BF16)
    scale_chunk(w, g, "BF16", "BF16", out, Scratch())
    assert bits(out, "BF16")[0, 0] == bits(want, "BF16")[0, 0]
    # a bf16 x bf16 product below the normal range, inexact in float32 (caught by the underflow flag)
    x = np.array([[ml_dtypes.finfo(BF16).smallest_normal * 1.9921875]], dtype=BF16)
    m = np.array([[2.0 ** -20 * 1.0078125]], np.float32)
    scale_chunk(x, m, "BF16", "BF16", out, Scratch())
    assert bits(out, "BF16")[0, 0] == bits(oracle(x, m.reshape(-1), 1, "BF16"), "BF16")[0, 0]


def _round_exact(x: Fraction, dt: str) -> int:
    """Round-to-nearest-even of a rational by search over neighbours (slow, obviously right)."""
    c = np.array([float(x)], np.float64).astype(NP[dt])
    cands = [np.nextafter(c, NP[dt](-np.inf)), c, np.nextafter(c, NP[dt](np.inf))]
    dist = [abs(Fraction(float(v[0])) - x) for v in cands]
    best = [v for v, dd in zip(cands, dist) if dd == min(dist)]
    if len(best) > 1:
        best = [v for v in best if int(bits(v, dt)[0]) % 2 == 0]
    return int(bits(best[0], dt)[0])


@pytest.mark.parametrize("dt", ["BF16", "F16"])
def test_oracle_rounds_once(dt):
    """The oracle's casts round once from float64 (a cast through float32 would not)."""
    rng = np.random.default_rng(3)
    grid = rng.standard_normal(300).astype(NP[dt]).astype(np.float64)
    up = np.nextafter(grid.astype(NP[dt]), NP[dt](np.inf)).astype(np.float64)
    mid = (grid + up) / 2
    for x in np.concatenate([mid, mid + np.abs(mid) * 2.0 ** -40, mid - np.abs(mid) * 2.0 ** -40]):
        if np.isfinite(x):
            assert int(bits(np.array([x]).astype(NP[dt]), dt)[0]) == _round_exact(Fraction(x), dt), x


# -- verify: the element check is exact ------------------------------------------------------------
def test_verify_rejects_near_misses():
    one = np.ones((1, 2), dtype=BF16)
    g = np.array([[1.99585, 1 + 2 ** -8]], dtype=np.float32)
    # exact products: 1.99585 -> bf16 1.9921875 (2.0 is the other neighbour, within 2.0's half ulp);
    # 1 + 2^-8 is a tie -> the even neighbour 1.0, not 1 + 2^-7
    right = np.array([[1.9921875, 1.0]], dtype=BF16)
    assert check_scaled(one, right, g, "BF16", "BF16").bad == 0
    wrong = np.array([[2.0, 1.0]], dtype=BF16)
    t = check_scaled(one, wrong, g, "BF16", "BF16")
    assert t.bad == 1 and t.first[:2] == (0, 2.0)
    tie = np.array([[1.9921875, 1 + 2 ** -7]], dtype=BF16)
    t = check_scaled(one, tie, g, "BF16", "BF16")
    assert t.bad == 1 and t.first[0] == 1
    nan = np.array([[np.nan]], dtype=BF16)
    assert check_scaled(nan, nan, np.ones((1, 1), np.float32), "BF16", "BF16").bad == 0


def test_verify_reports_wrong_neighbour_end_to_end(toy, tmp_path):
    d, norms, weights = toy
    out = tmp_path / "out"
    streamfold.convert(d, out, rules=RULES, memory_budget=BUDGET)
    assert streamfold.verify(d, out, rules=RULES).ok
    name = "layers.0.lin.weight"  # float32 norm, bf16 weights: nudge one element to its other neighbour
    t = Checkpoint(out).tensors[name]
    w = weights[name].astype(np.float64)
    g = norms["layers.0.norm.weight"].astype(np.float64)
    i, j = 5, 20
    exact = w[i, j] * g[j]
    stored = np.array([exact]).astype(BF16)
    other = np.nextafter(stored, BF16(np.inf) if float(stored[0]) < exact else BF16(-np.inf))
    with open(t.path, "r+b") as f:
        f.seek(t.begin + (i * H + j) * 2)
        f.write(other.tobytes())
    r = streamfold.verify(d, out, rules=RULES)
    assert not r.ok and any(p.subject == name and f"first at [{i}, {j}]" in p.message for p in r.problems), \
        r.summary()


BIAS_RULES = {"biastoy": {"model_types": ["biastoy"], "folds": [{"norm": "l.norm", "into": ["l.lin"]}]}}


def _bias_toy(tmp_path: Path):
    """A LayerNorm-with-bias toy, converted: row 0's exact ``b + W @ beta`` lies 2^-60 above the bf16
    midpoint 1 + 2^-8 (between 1.0, even, and 1 + 2^-7) and row 1's 2^-60 below; a float64 sum lands on
    the midpoint itself (a tie). Returns (src, out, w, beta, b)."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((64, 50)).astype(BF16)
    beta = rng.standard_normal(50).astype(BF16)
    b = rng.standard_normal(64).astype(BF16)
    w[:2] = 0
    w[0, :2] = [1.0, 2.0 ** -60]
    w[1, :2] = [1.0, -(2.0 ** -60)]
    beta[:2] = [1.0, 0.5]
    b[:2] = [2.0 ** -8, 2.0 ** -8]
    src = tmp_path / "src"
    src.mkdir()
    save(src / "model.safetensors", {"l.norm.weight": rng.uniform(0.5, 2, 50).astype(BF16),
                                     "l.norm.bias": beta, "l.lin.weight": w, "l.lin.bias": b})
    (src / "config.json").write_text(json.dumps({"model_type": "biastoy"}))
    streamfold.convert(src, tmp_path / "out", rules=BIAS_RULES, memory_budget=BUDGET)
    return src, tmp_path / "out", w, beta, b


def test_bias_fold_rounds_once(tmp_path):
    """b* = b + W @ beta through convert: the exact sum rounded once, on both sides of a midpoint."""
    _, out, w, beta, b = _bias_toy(tmp_path)
    got = Checkpoint(out).array("l.lin.bias")
    for i in range(64):
        exact = Fraction(float(b[i])) + sum(Fraction(float(w[i, j])) * Fraction(float(beta[j])) for j in range(50))
        assert int(bits(got[i:i + 1], "BF16")[0]) == _round_exact(exact, "BF16"), i
    assert float(got[0]) == 1 + 2 ** -7 and float(got[1]) == 1.0


@pytest.mark.parametrize("dt", ["BF16", "F16", "F32"])
def test_oracle_bias_is_the_exact_sum_rounded_once(dt):
    """oracle.expected_bias against Fractions: random rows, and rows whose exact sum lies 2^-60 above,
    2^-60 below or exactly on a rounding midpoint (where a float64 sum rounded again goes wrong)."""
    from streamfold.check.oracle import expected_bias
    rng = np.random.default_rng(11)
    rows, cols = 40, 24
    w = rng.standard_normal((rows, cols)).astype(BF16).astype(np.float64)
    beta = rng.standard_normal(cols).astype(np.float32).astype(np.float64)
    b = rng.standard_normal(rows).astype(NP[dt]).astype(np.float64)
    one = 1.0
    half_ulp = {"BF16": 2.0 ** -8, "F16": 2.0 ** -11, "F32": 2.0 ** -24}[dt]
    for i, tail in enumerate([2.0 ** -60, -(2.0 ** -60), 0.0, 3 * 2.0 ** -70]):
        w[i] = 0
        w[i, :2] = [1.0, tail]
        beta[:2] = [1.0, 1.0]
        b[i] = half_ulp  # 1 + half an ulp of 1: a midpoint
    got = expected_bias(b, w, beta, dt)
    for i in range(rows):
        exact = Fraction(b[i]) + sum(Fraction(w[i, j]) * Fraction(beta[j]) for j in range(cols))
        assert int(bits(got[i:i + 1], dt)[0]) == _round_exact(exact, dt), (i, float(exact))
    assert float(got[0]) > one and float(got[1]) == one and float(got[2]) == one  # the tie goes to even


def test_verify_rejects_the_wrong_neighbour_of_a_bias_fold(tmp_path):
    """A folded bias one ulp off where the exact sum lies just above a midpoint: within one rounding of
    the float64 sum (verify's old bias check accepted it), and not the exact sum rounded once."""
    src, out, *_ = _bias_toy(tmp_path)
    rules = BIAS_RULES
    assert streamfold.verify(src, out, rules=rules).ok
    t = Checkpoint(out).tensors["l.lin.bias"]
    assert float(Checkpoint(out).array("l.lin.bias")[0]) == 1 + 2 ** -7
    with open(t.path, "r+b") as f:
        f.seek(t.begin)
        f.write(np.array([1.0], BF16).tobytes())  # the neighbour below: half an ulp + 2^-61 away
    r = streamfold.verify(src, out, rules=rules)
    assert not r.ok and any(p.subject == "l.lin.bias" and "first at [0]" in p.message for p in r.problems), \
        r.summary()
