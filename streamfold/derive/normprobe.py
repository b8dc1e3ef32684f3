"""Norm modules of a tiny model: found by structure, confirmed and classified numerically, and given
random scales far from the identity (development time only; torch).

- ``find_norms(model)``: every norm module with a weight; the ``w`` vs ``1 + w`` convention and whether
  it subtracts the mean are measured, never read from a class name.
- ``randomize(model, seed)``: norm scales far from identity (``far_scales``), norm and linear biases
  non-zero, constant tensors made random.
- ``calm_norms(model, names, seed)``: mild scales (``mild_scales``) for norms a conversion keeps.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

# -------------------------------------------------------------------------------------------------------
# norms: found by structure, confirmed and classified numerically
# -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class NormInfo:
    """A norm module: ``offset`` is 0 (scales by w) or 1 (by 1 + w); ``mean`` if it subtracts the mean."""

    name: str
    offset: int
    mean: bool
    has_bias: bool


def _call(mod, x, gate):
    """``mod(x)``, or ``mod(x, gate)`` for gated norms (Mamba, Gated DeltaNet: ``norm(x, gate)``). A
    ``torch.nn.GroupNorm`` (channels first: Janus' VQ image model) sees ``x`` with its last axis moved to axis 1."""
    if isinstance(mod, torch.nn.GroupNorm):
        return mod(x.transpose(1, -1)).transpose(1, -1)
    params = [p for p in inspect.signature(mod.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return mod(x, gate) if len(params) >= 2 else mod(x)


@torch.no_grad()
def _probe(mod) -> NormInfo | None:
    """Numerically: is ``mod`` a norm (output invariant to scaling the input), which convention, mean?

    The probe input is [3, 5, *feature_dims, *weight.shape]: ``feature_dims`` is the module's attribute of
    that name if it has one (group norms over [B, T, *feature_dims, C], as Gemma 3n's audio
    ``Gemma3nAudioCumulativeGroupNorm``), else empty."""
    w = mod.weight
    g = torch.Generator().manual_seed(0)
    feat = getattr(mod, "feature_dims", ())
    feat = tuple(feat) if isinstance(feat, (tuple, list)) and all(isinstance(d, int) for d in feat) else ()
    x = torch.randn((3, 5, *feat, *w.shape), generator=g, dtype=w.dtype) * 3 + 0.5
    gate = torch.randn(x.shape, generator=g, dtype=w.dtype)
    saved = {n: p.detach().clone() for n, p in mod.named_parameters(recurse=False)}
    try:
        for p in mod.parameters(recurse=False):
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3 + 1.2)
        try:
            y1, y2 = _call(mod, x, gate), _call(mod, 7.0 * x, gate)
        except Exception:
            return None
        if not isinstance(y1, torch.Tensor) or y1.shape != x.shape or not torch.allclose(y1, y2, rtol=1e-3, atol=1e-4):
            return None  # not scale-invariant: not a norm
        b = getattr(mod, "bias", None)
        has_bias = isinstance(b, torch.nn.Parameter)
        if has_bias:
            b.zero_()
        offset = None
        for off in (0, 1):
            w.fill_(-float(off))
            if torch.all(_call(mod, x, gate).abs() < 1e-6):
                offset = off
                break
        if offset is None:
            raise AssertionError(f"{type(mod).__name__}: norm-like module is neither w nor 1 + w "
                                 "(zero scale does not zero its output)")
        w.fill_(1.0 - offset)
        y = _call(mod, x, gate)
        mean = bool(torch.allclose(y.mean(-1), torch.zeros(()), atol=1e-4))
        return NormInfo("", offset, mean, has_bias)
    finally:
        for n, p in mod.named_parameters(recurse=False):
            p.copy_(saved[n])


def find_norms(model) -> dict[str, NormInfo]:
    """Qualified module name -> NormInfo for every norm with a weight.

    Candidates are leaf modules whose own parameters are a 1-D ``weight`` (2-D for per-head norms) and
    optionally a ``bias`` of the same shape; a candidate is a norm when its output does not change if the
    input is scaled by 7 (every normalization has that property, no linear/scale layer does).  The
    convention is measured: the offset o in {0, 1} with ``weight = -o`` zeroing the output.  A candidate
    whose class name says norm but fails the probe is an error (a new kind of norm to look at)."""
    out: dict[str, NormInfo] = {}
    for name, mod in model.named_modules():
        params = dict(mod.named_parameters(recurse=False))
        w = params.get("weight")
        if w is None or not w.is_floating_point() or w.dim() not in (1, 2) or set(params) - {"weight", "bias"}:
            continue
        if any(True for _ in mod.children()) or isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)):
            continue
        if w.dim() == 2 and "norm" not in type(mod).__name__.lower():
            continue
        if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
            continue  # run in eval mode: a fixed per-channel affine map (running statistics), not a norm (Emu3 VQ)
        info = _probe(mod)
        if info is None:
            if "norm" in type(mod).__name__.lower():
                raise AssertionError(f"{name}: {type(mod).__name__} looks like a norm but is not scale-invariant")
            continue
        out[name] = NormInfo(name, info.offset, info.mean, info.has_bias)
    return out


def far_scales(shape, gen: torch.Generator) -> torch.Tensor:
    """|s| in [0.5, 0.8] U [1.25, 2.0], a quarter negative: every channel far from 1 and from 0."""
    lo = 0.5 + 0.3 * torch.rand(shape, generator=gen)
    hi = 1.25 + 0.75 * torch.rand(shape, generator=gen)
    mag = torch.where(torch.rand(shape, generator=gen) < 0.5, lo, hi)
    return mag * torch.where(torch.rand(shape, generator=gen) < 0.25, -1.0, 1.0)


def mild_scales(shape, gen: torch.Generator) -> torch.Tensor:
    """|s| in [0.8, 0.95] U [1.05, 1.25], all positive: random, every channel >= 5% from the identity,
    but mild enough that kept norms (q/k norms, post-norms) do not saturate attention or gates."""
    lo = 0.8 + 0.15 * torch.rand(shape, generator=gen)
    hi = 1.05 + 0.2 * torch.rand(shape, generator=gen)
    return torch.where(torch.rand(shape, generator=gen) < 0.5, lo, hi)


@torch.no_grad()
def calm_norms(model, modules, seed: int = 0) -> None:
    """Give the norms ``modules`` (names in ``model.tiny_norms``) ``mild_scales`` instead of far ones.

    For norms that a conversion KEEPS (never folded, so their values never touch a fold): far-from-identity
    q/k norm scales saturate attention's softmax (Gemma 4 has attention scaling 1), which makes the model
    amplify bf16 rounding of the folded weights far beyond what a real model does.  Folded norms must stay
    far (``far_scales``): those are what catch folding errors."""
    gen = torch.Generator().manual_seed(20_011 + seed)
    mods = dict(model.named_modules())
    for name in sorted(modules):
        info = model.tiny_norms[name]
        w = mods[name].weight
        w.copy_(mild_scales(tuple(w.shape), gen) - info.offset)


def _nonzero(shape, gen, lo, hi) -> torch.Tensor:
    mag = lo + (hi - lo) * torch.rand(shape, generator=gen)
    return mag * torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)


@torch.no_grad()
def randomize(model, seed: int = 0) -> dict[str, NormInfo]:
    """Norm scales far from identity, norm and linear biases non-zero, constant tensors made random (zero
    scalar gates too: Mllama's ``tanh(gate)`` would otherwise switch its cross-attention layers off)."""
    gen = torch.Generator().manual_seed(10_007 + seed)
    norms = find_norms(model)
    mods = dict(model.named_modules())
    done = set()
    for name, info in norms.items():
        mod = mods[name]
        mod.weight.copy_(far_scales(tuple(mod.weight.shape), gen) - info.offset)
        done.add(id(mod.weight))
        if info.has_bias:
            mod.bias.copy_(_nonzero(tuple(mod.bias.shape), gen, 0.1, 0.5))
            done.add(id(mod.bias))
    for pname, p in model.named_parameters():
        if id(p) in done or not p.is_floating_point():
            continue
        if pname.endswith("bias"):
            p.copy_(_nonzero(tuple(p.shape), gen, 0.05, 0.3))
        elif p.numel() == 1 and float(p) == 0.0:  # zero-initialised scalar gates (Mllama's tanh gates)
            p.copy_(_nonzero(tuple(p.shape), gen, 0.5, 1.0))
        elif p.numel() > 1 and bool((p == p.reshape(-1)[0]).all()):
            p.add_(torch.randn(tuple(p.shape), generator=gen) * 0.05)  # zero/one-initialised scalars, gates
    for bname, buf in model.named_buffers():
        if bname.endswith("e_score_correction_bias"):
            buf.copy_(_nonzero(tuple(buf.shape), gen, 0.01, 0.1))
    return norms
