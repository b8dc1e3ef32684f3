"""The midpoint kernel (bf16 weight x float32 multiplier -> bf16): compute in float32, redo in float64
the elements whose float32 product lands exactly on a bf16 rounding midpoint.

The references here are independent of the kernel: an exact round-to-nearest-even of a ``Fraction``
(:func:`rne`), and the float64 product rounded once by ml_dtypes (``streamfold.check.oracle``). Each test
also shows that a naive implementation (float32 product, then one float32 -> bf16 rounding) fails it.
"""
from __future__ import annotations

from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest

from streamfold.core import fold
from streamfold.core.fold import Scratch, scale_chunk
from streamfold.check.oracle import check_scaled
from tests.representatives import matrix

BF16 = ml_dtypes.bfloat16
SCALE_F64 = fold._scale_f64
INF = float("inf")


def rne(x: Fraction, prec: int) -> Fraction | float:
    """``x`` rounded to nearest-even in a binary format with ``prec`` significand bits and float32's
    exponent range (bf16: 8, float32: 24; both have normals 2^-126 .. 2^128), subnormals included;
    ``+-inf`` past the overflow threshold. Exact rational arithmetic: obviously one rounding."""
    if x == 0:
        return x
    sign, a = (-1 if x < 0 else 1), abs(x)
    e = a.numerator.bit_length() - a.denominator.bit_length()  # 2^e <= a < 2^(e+1), after fixing
    if Fraction(2) ** e > a:
        e -= 1
    e = max(e, -126)  # the subnormal grid is that of the smallest normal binade
    q = Fraction(2) ** (e - prec + 1)
    n = a / q
    k = n.numerator // n.denominator
    rem = n - k
    if rem > Fraction(1, 2) or (rem == Fraction(1, 2) and k % 2):
        k += 1
    r = k * q
    if r >= Fraction(2) ** 128:
        return sign * INF
    return sign * r


def bf16_bits_of(v: Fraction | float, negative: bool) -> int:
    """The bf16 bit pattern of a value ``rne(..., 8)`` returned (exactly representable)."""
    b = int(np.array([float(v)], np.float32).view(np.uint32)[0]) >> 16
    if v == 0 and negative:
        b |= 0x8000
    return b


def exact_bf16(wb: int, gb: int) -> int:
    """The exact product of bf16 bits ``wb`` and float32 bits ``gb`` (finite), rounded once to bf16."""
    w = float(np.array([wb << 16], np.uint32).view(np.float32)[0])
    g = float(np.array([gb], np.uint32).view(np.float32)[0])
    x = Fraction(w) * Fraction(g)
    return bf16_bits_of(rne(x, 8), (wb >> 15) != (gb >> 31))


def naive(w: np.ndarray, g: np.ndarray) -> np.ndarray:
    """The implementation this kernel must beat: float32 product, then float32 -> bf16 (RNE)."""
    with np.errstate(all="ignore"):
        return (w.astype(np.float32) * g.astype(np.float32)).astype(BF16).view(np.uint16)


@pytest.fixture(autouse=True)
def no_float64_path(monkeypatch):
    """Every test here must exercise the float32 midpoint kernel, not the float64 fallback."""
    def refuse(*a, **k):
        raise AssertionError("the float64 path was taken")
    monkeypatch.setattr(fold, "_scale_f64", refuse)


def kernel(w_bits: np.ndarray, g: np.ndarray, per_row: bool = False) -> np.ndarray:
    """Run scale_chunk on bf16 bits ``w_bits`` [rows, cols] and float32 ``g`` (per column or per row)."""
    w = np.ascontiguousarray(w_bits, np.uint16).view(BF16)
    m = g.astype(np.float32).reshape((-1, 1) if per_row else (1, -1))
    out = np.empty(w.shape, BF16)
    scale_chunk(w, m, "BF16", "BF16", out, Scratch())
    return out.view(np.uint16)


def g_candidates(target: Fraction, w: float):
    """The float32 values ``g`` nearest ``target / w`` (3 neighbours each side)."""
    g = np.array([float(target / Fraction(w))], np.float32)
    for _ in range(3):
        g = np.nextafter(g, np.float32(-INF))
    for _ in range(7):
        yield g[0]
        g = np.nextafter(g, np.float32(INF))


def bf16_value(bits: int) -> float:
    return float(np.array([bits << 16], np.uint32).view(np.float32)[0])


# bf16 midpoint M -> the exponent fields of the weights tried (0: subnormal weights). M is
# (2k+1) * 2^(e-8) in the binade [2^e, 2^(e+1)), or between two subnormals ((2k+1) * 2^-134), or the
# overflow threshold (2 - 2^-8) * 2^127 (rounds to inf; just below it, bf16 max).
TARGETS = {
    "normal 1+2^-8": (Fraction(1) + Fraction(1, 256), [127, 128, 130]),
    "normal 1.5+3*2^-8": (Fraction(3, 2) + Fraction(3, 256), [126, 129]),
    "normal 2^101-2^92": (Fraction(2) ** 100 * (Fraction(2) - Fraction(1, 256)), [127, 140]),
    "smallest normal + half ulp": (Fraction(2) ** -126 * (1 + Fraction(1, 256)), [100, 127]),
    "subnormal 0|2^-133": (Fraction(2) ** -134, [0, 110, 125]),
    "subnormal 5|6 x 2^-133": (Fraction(11) * Fraction(2) ** -134, [0, 118]),
    "subnormal max|min normal": (Fraction(255) * Fraction(2) ** -134, [0, 120]),
    "overflow threshold": ((Fraction(2) - Fraction(1, 256)) * Fraction(2) ** 127, [127, 133]),
}


def weights_for(exponents: list[int]) -> list[int]:
    return [sign | (ef << 7) | mant for ef in exponents for mant in range(1, 128, 6) for sign in (0, 0x8000)]


def midpoint_cases(target: Fraction, w_bits: int):
    """(w, g, x): bf16 bits, float32 bits and exact product x != +-target whose float32 rounding is
    the midpoint +-target (the sign of w's)."""
    w = bf16_value(w_bits)
    t = target if w > 0 else -target
    for g in g_candidates(t, w):
        x = Fraction(w) * Fraction(float(g))
        if x != t and rne(x, 24) == t:
            yield w_bits, int(np.array([g], np.float32).view(np.uint32)[0]), x


@pytest.mark.parametrize("name", list(TARGETS))
def test_constructed_double_rounding_midpoints(name):
    """Exact products just above and just below a bf16 midpoint whose float32 rounding is that
    midpoint: the naive float32-then-round answer is wrong on one side; the kernel is right on both."""
    target, exps = TARGETS[name]
    assert rne(target, 24) == target and rne(target, 8) != target  # a float32, not a bf16: a midpoint
    cases = [c for wb in weights_for(exps) for c in midpoint_cases(target, wb)]
    above = sum(abs(x) > target for _, _, x in cases)
    assert above >= 3 and len(cases) - above >= 3, (name, above, len(cases))  # both sides, both signs
    w = np.array([[c[0] for c in cases]], np.uint16)
    g = np.array([c[1] for c in cases], np.uint32).view(np.float32)
    want = np.array([exact_bf16(c[0], c[1]) for c in cases], np.uint16)
    p = (w.view(BF16).astype(np.float32) * g)[0]
    assert np.all(p.view(np.uint32) & 0xFFFF == 0x8000)  # every float32 product is on the midpoint
    assert np.sum(naive(w.view(BF16), g)[0] != want) >= 2, (name, "naive rounding should fail here")
    # one element per call (beside a 1.0 weight and a multiplier that is not a bf16 value, so that the
    # vector takes this kernel even where g[i] alone is a bf16 value)
    other = np.float32(1 + 2 ** -20)
    got = np.array([kernel(np.array([[w[0, i], 0x3F80]]), np.array([g[i], other]))[0, 0]
                    for i in range(w.shape[1])], np.uint16)
    assert np.array_equal(got, want), (name, got, want)
    assert np.array_equal(kernel(w, g)[0], want)  # all at once: the same


def test_constructed_cases_per_row_and_in_blocks():
    """The same midpoint cases scattered through a tensor several compute blocks long, with the
    multiplier per column and per row ([rows, 1]): the redo finds each element's own multiplier."""
    rng = np.random.default_rng(11)
    cases = [c for t, exps in TARGETS.values() for wb in weights_for(exps) for c in midpoint_cases(t, wb)][::7]
    rows, cols = 3 * fold.BLOCK_ELEMS // 512 + 5, 512
    w = rng.integers(0x3F00, 0x4100, (rows, cols), dtype=np.uint16)
    gcol = rng.uniform(0.5, 2, cols).astype(np.float32)
    grow = rng.uniform(0.5, 2, rows).astype(np.float32)
    pos_c = rng.choice(cols, len(cases), replace=False)
    pos_r = rng.choice(rows, len(cases), replace=False)
    for (wb, gb, _), j, i in zip(cases, pos_c, pos_r):
        gv = np.array([gb], np.uint32).view(np.float32)[0]
        w[i, j] = wb
        gcol[j] = gv
        grow[i] = gv
    for g, per_row in ((gcol, False), (grow, True)):
        got = kernel(w, g, per_row)
        m = g.reshape((-1, 1) if per_row else (1, -1))
        assert check_scaled(w.view(BF16), got.view(BF16), m, "BF16", "BF16").bad == 0
        for (wb, gb, _), j, i in zip(cases, pos_c, pos_r):
            assert got[i, j] == exact_bf16(wb, gb)
        assert np.any(naive(w.view(BF16), m) != got)


KINDS = ["any bits", "norm-like", "edges", "1+w", "narrow edges"]


def random_inputs(rng, kind: str, shape):
    """Random bf16 weight bits and finite float32 multipliers of one of the KINDS."""
    rows, cols = shape
    if kind == "any bits":  # every weight pattern (NaN, inf, subnormals, zeros); any finite multiplier
        w = rng.integers(0, 1 << 16, shape, dtype=np.uint32).astype(np.uint16)
        g = rng.integers(0, 1 << 32, cols, dtype=np.uint64).astype(np.uint32)
        g[(g & 0x7F800000) == 0x7F800000] &= 0xBFFFFFFF  # no NaN/inf multiplier (those go to float64)
        g[::7] &= 0x807FFFFF  # plenty of subnormal multipliers
    elif kind == "norm-like":  # typical weights times a full-precision float32 norm
        w = (rng.standard_normal(shape) * 0.05).astype(np.float32).astype(BF16).view(np.uint16)
        g = (rng.uniform(0.25, 4, cols) * rng.choice([-1, 1], cols)).astype(np.float32).view(np.uint32)
    elif kind == "1+w":  # 1 + a bf16 w in float32: mostly at most 16 bits, so many exact ties
        w = rng.standard_normal(shape).astype(np.float32).astype(BF16).view(np.uint16)
        wn = (rng.standard_normal(cols) * rng.choice([0.03, 0.3, 3])).astype(BF16).astype(np.float32)
        g = (np.float32(1) + wn).view(np.uint32)
        g[0] = np.float32(1 + 2 ** -20).view(np.uint32)  # one wide value: the vector is not all bf16-exact
    else:  # "edges": products near the subnormal range, zero, and bf16 max; "narrow edges":
        # products in bf16's subnormal range, multipliers with at most 16 bits but for a few columns
        narrow = kind == "narrow edges"
        exp_w = rng.integers(121, 128, shape, dtype=np.uint32) if narrow else \
            rng.integers(120, 135, shape, dtype=np.uint32)
        w = ((rng.integers(0, 2, shape, dtype=np.uint32) << 15) | (exp_w << 7)
             | rng.integers(0, 128, shape, dtype=np.uint32)).astype(np.uint16)
        exp_g = rng.choice(np.arange(0, 7) if narrow else np.r_[np.arange(0, 12), np.arange(243, 255)],
                           cols).astype(np.uint32)
        g = (rng.integers(0, 2, cols, dtype=np.uint32) << 31) | (exp_g << 23) | \
            rng.integers(0, 1 << 23, cols, dtype=np.uint32)
        if narrow:
            g[rng.random(cols) < 0.9] &= 0xFFFFFF00
            g[0] |= 1
    return w, g.view(np.float32)


@pytest.mark.parametrize("kind", KINDS)
def test_random_bit_patterns_against_exact_references(kind):
    """~4.8M random elements per kind: the kernel equals the float64 product rounded once by ml_dtypes
    (streamfold.check.oracle) everywhere, and equals the Fraction reference on a random sample, on every
    element whose float32 product is a bf16 midpoint but not the exact product, and on a sample of
    the exact ties; the naive rounding gets some of those wrong."""
    rng = np.random.default_rng(KINDS.index(kind) + 1)
    shape = (2 * fold.BLOCK_ELEMS // 512 + 3, 512)  # several compute blocks, a ragged last one
    n = {"midpoints": 0, "ties": 0, "naive wrong": 0, "narrow inexact": 0}
    for trial in range(36):
        w, g = random_inputs(rng, kind, shape)
        per_row = trial % 4 == 3
        if per_row:
            g = rng.permutation(np.resize(g, shape[0]))
        m = g.reshape((-1, 1) if per_row else (1, -1))
        got = kernel(w, g, per_row)
        t = check_scaled(w.view(BF16), got.view(BF16), m, "BF16", "BF16")
        assert t.bad == 0, (kind, trial, t.first)
        wf = w.view(BF16).astype(np.float32)
        with np.errstate(all="ignore"):
            p = wf * m
            exact = p.astype(np.float64) == wf.astype(np.float64) * m.astype(np.float64)
        pb = p.view(np.uint32)
        mid = ((pb & 0x7F800000) != 0x7F800000) & ((pb & 0xFFFF) == 0x8000)
        narrow = np.broadcast_to((m.view(np.uint32) & 0xFF) == 0, shape)
        n["midpoints"] += int(mid.sum())
        n["ties"] += int((mid & exact).sum())
        n["narrow inexact"] += int((mid & ~exact & narrow).sum())
        n["naive wrong"] += int(np.sum(naive(w.view(BF16), m)[mid] != got[mid]))
        ties = np.flatnonzero((mid & exact).reshape(-1))
        sample = np.r_[np.flatnonzero((mid & ~exact).reshape(-1)), rng.permutation(ties)[:100],
                       rng.choice(mid.size, 100, replace=False)]
        sample = sample[np.isfinite(wf.reshape(-1)[sample])]
        gb = np.broadcast_to(m.view(np.uint32), shape).reshape(-1)
        for i in sample:
            assert int(got.reshape(-1)[i]) == exact_bf16(int(w.reshape(-1)[i]), int(gb[i])), (kind, trial, i)
        nan = np.isnan(wf) | (np.isinf(wf) & (m == 0))
        assert np.all(got[nan] & 0x7FC0 == 0x7FC0)  # NaN in (or 0 x inf): a quiet NaN out
    print(kind, n)
    if kind != "1+w":  # the double-rounding cases this kernel exists for
        assert n["midpoints"] - n["ties"] >= 20 and n["naive wrong"] >= 5, n
    else:  # mostly narrow multipliers: exact products on a midpoint, ties-to-even without a redo
        assert n["ties"] >= 1000, n
    if kind == "narrow edges":  # a narrow multiplier whose product underflowed onto a midpoint
        assert n["narrow inexact"] >= 10, n


def test_bit_identical_to_float64_path():
    """Every bit, NaN payloads and signs included, equals the float64 path (fold._scale_f64) on random
    tensors with NaN, infinity, zeros of both signs and subnormal weights."""
    rng = np.random.default_rng(4)
    scale_f64 = SCALE_F64  # the real one (the autouse fixture replaced fold._scale_f64)
    for kind in KINDS:
        for per_row in (False, True):
            w, g = random_inputs(rng, kind, (300, 700))
            if per_row:
                g = rng.permutation(np.resize(g, 300))
            m = g.reshape((-1, 1) if per_row else (1, -1))
            ref = np.empty(w.shape, BF16)
            scale_f64(w.view(BF16), m, "BF16", "BF16", ref)
            got = kernel(w, g, per_row)
            r = ref.view(np.uint16)
            assert np.array_equal(got, r), (kind, per_row, int(np.sum(got != r)))


def test_specials_and_signs():
    """Negative zero, underflow to zero of either sign, overflow past bf16 max (still finite in
    float32), infinity, NaN (quiet, sign kept) and a subnormal weight, with a float32 multiplier."""
    g = np.float32(1 + 2 ** -20)  # not a bf16 value: the midpoint kernel
    bmax = float(ml_dtypes.finfo(BF16).max)
    sub = float(ml_dtypes.finfo(BF16).smallest_subnormal)
    w = np.array([[0.0, -0.0, sub, -sub, bmax, -bmax, np.inf, -np.inf, np.nan, -np.nan, 3 * sub]], BF16)
    gs = np.array([g, g, 2 ** -10, 2 ** -10, g, g, g, -g, g, g, 0.5 - 2 ** -20], np.float32)
    got = kernel(w.view(np.uint16), gs)[0]
    assert got[0] == 0x0000 and got[1] == 0x8000  # +-0 x g
    assert got[2] == 0x0000 and got[3] == 0x8000  # underflow to zero keeps the sign
    # bmax * (1 + 2^-20) is finite in float32 and below bf16's overflow threshold: stays bmax
    assert got[4] == 0x7F7F and got[5] == 0xFF7F
    assert got[6] == 0x7F80 and got[7] == 0x7F80  # inf x g, -inf x -g
    assert got[8] & 0xFFC0 == 0x7FC0 and got[9] & 0xFFC0 == 0xFFC0  # quiet NaN, sign kept
    # 3 subnormals x (0.5 - 2^-20): the float32 product is the midpoint 1.5 subnormals, the exact one
    # just below it: 1 subnormal (ties-to-even from float32 would give 2)
    assert got[10] == exact_bf16(0x0003, int(gs[10:11].view(np.uint32)[0])) == 0x0001
    assert naive(w[:, 10:], gs[10:])[0, 0] == 0x0002
    big = np.array([[bmax]], BF16)
    past = np.array([1.00390625 + 2 ** -20], np.float32)  # bf16 max x this: past the overflow threshold
    assert kernel(big.view(np.uint16), past)[0, 0] == 0x7F80


def double_rounding_pairs(norms: np.ndarray, offset: int, rng, want: int = 12):
    """(index into ``norms``, bf16 weight bits in [1, 2)) pairs whose product with the multiplier
    ``offset + norms[i]`` (float32) the naive rounding gets wrong, judged against the float64 product
    rounded by ml_dtypes: at most one weight per multiplier, ``want`` of them."""
    mant = (np.arange(0x3F80, 0x4000, dtype=np.uint32)).astype(np.uint16)  # every bf16 in [1, 2)
    g = (norms.astype(np.float32) + np.float32(offset)).astype(np.float32)
    good = np.isfinite(g) & ((g.view(np.uint32) & 0xFF) != 0)  # more than 16 bits
    w = mant.view(BF16)[None, :]
    exact = (w.astype(np.float64) * g.astype(np.float64)[:, None]).astype(BF16).view(np.uint16)
    wrong = (naive(w, g[:, None]) != exact) & good[:, None]
    rows = np.flatnonzero(wrong.any(1))[:want]
    assert rows.shape[0] == want, rows.shape
    return [(int(i), int(mant[np.flatnonzero(wrong[i])[0]])) for i in rows]


@pytest.mark.parametrize("norm,workers", matrix([(n, w) for n in ["float32 w", "float32 1+w", "bf16 1+w"] for w in (1, 3)],
                                                 {("float32 1+w", 3), ("bf16 1+w", 1)}))
def test_convert_takes_the_midpoint_kernel(tmp_path, monkeypatch, norm, workers):
    """Through convert (many chunks, axis 1 and axis 0 consumers): a float32 norm, a float32 norm in
    the ``1 + w`` convention and a Gemma-style bf16 ``1 + w`` fold on the midpoint kernel (the float64
    path is refused by the autouse fixture); the output equals the float64 product rounded once, and
    verify passes. The float32 norms carry planted double-rounding weights (naive rounding fails);
    bf16 ``1 + w`` has none (for normal products: with |w| >= 2^-9 they are exact, below it they stay
    about 2^-15 relative away from every bf16 midpoint), only exact ties, which must go to even."""
    import streamfold
    from streamfold.core.reader import Checkpoint
    from tests.test_exact import save

    calls = []
    real = fold._round_bf16_midpoints
    monkeypatch.setattr(fold, "_round_bf16_midpoints", lambda *a: calls.append(1) or real(*a))
    rng = np.random.default_rng(8)
    h = 256
    offset = int("1+w" in norm)
    if norm == "bf16 1+w":
        g_saved = (rng.standard_normal(h) * 0.3).astype(BF16)
        g_saved[:8] = (np.array([1, -1, 3, 2, 5, 7, 1.5, 1.25]) * 2.0 ** -12).astype(BF16)  # wide 1 + w
        pairs = []
    else:  # channels 0..11 carry multipliers with a double-rounding weight (planted below)
        pool = rng.uniform(0.5, 2, 40_000).astype(np.float32)
        if offset:
            pool = (pool - np.float32(1)).astype(np.float32)  # a stored float32 w of 1 + w
        pairs = double_rounding_pairs(pool, offset, rng)
        g_saved = np.concatenate([pool[[i for i, _ in pairs]], pool[12:12 + h - 12]])
    g = (g_saved.astype(np.float32) + np.float32(offset)).astype(np.float32)
    assert not fold.fast_bf16_ok(g.reshape(1, -1))
    lin = (rng.standard_normal((1500, h)) * 0.05).astype(np.float32).astype(BF16)
    tw = (rng.standard_normal((h, 1100)) * 0.05).astype(np.float32).astype(BF16)
    for j, (_, wb) in enumerate(pairs):  # times a power of two (2^-3 .. 2^-6): still a midpoint case
        for lane in (lin[:, j], tw[j, :]):
            at = rng.choice(lane.shape[0], 3, replace=False)
            lane[at] = (np.array([wb], np.uint16).view(BF16).astype(np.float32)
                        * np.float32(2.0) ** -rng.integers(3, 7, 3) * rng.choice([-1, 1], 3)).astype(BF16)
    d = tmp_path / "src"
    d.mkdir()
    save(d / "model.safetensors", {"layers.0.norm.weight": g_saved, "layers.0.lin.weight": lin,
                                   "layers.0.t.weight": tw})
    (d / "config.json").write_text('{"model_type": "midtoy"}')
    rules = {"midtoy": {"model_types": ["midtoy"], "offset": offset, "folds": [
        {"norm": "layers.{n}.norm", "into": ["layers.{n}.lin", {"weight": "layers.{n}.t.weight", "axis": 0}]}]}}
    out = tmp_path / "out"
    streamfold.convert(d, out, rules=rules, memory_budget=70_000, workers=workers)
    ckpt = Checkpoint(out)
    for name, w, m in (("layers.0.lin.weight", lin, g.reshape(1, -1)), ("layers.0.t.weight", tw, g.reshape(-1, 1))):
        got = ckpt.array(name)
        assert check_scaled(w, got, m, "BF16", "BF16").bad == 0, name
        with np.errstate(all="ignore"):
            p = (w.astype(np.float32) * m).view(np.uint32)
        ties = int(np.sum((p & 0xFFFF) == 0x8000))
        if pairs:
            assert np.any(naive(w, m) != got.view(np.uint16)), name  # naive rounding would fail here
        else:
            assert ties >= 100, (name, ties)  # exact products on a midpoint, sent to even
    assert len(calls) >= 8  # many chunks, all on this kernel
    assert streamfold.verify(d, out, rules=rules, memory_budget=70_000).ok
