"""Which checkpoint tensors hold a parameter, and along which of their axes (development time; torch).

transformers 5 renames, splits and re-stacks some parameters when it saves them (fused in-memory
experts ``[E, 2I, H]`` written as per-expert ``experts.N.w1/w3``, legacy prefixes of multimodal
wrappers, ...). Rather than re-implementing those conversions, measure them: overwrite every parameter
of interest with values that *encode* it (``id * 1024 + channel index`` along the axis we care about,
exact in float32), ``save_pretrained``, and decode every saved tensor: which parameter it came from
and along which of its axes the channel index runs. The model is restored afterwards.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

_RADIX = 1024  # channel widths of tiny models stay below this; ids * radix stay exact in float32


@dataclass(frozen=True)
class Saved:
    """One saved tensor holding (part of) a parameter: its name and the axis the channels run along."""

    name: str
    axis: int
    ndim: int


def _encode(p: torch.Tensor, pid: int, axis: int) -> torch.Tensor:
    n = p.shape[axis]
    if n >= _RADIX:
        raise ValueError(f"channel axis of {n} is too wide to encode (tiny models only)")
    shape = [1] * p.dim()
    shape[axis] = n
    idx = torch.arange(n, dtype=torch.float32).reshape(shape)
    return (pid * _RADIX + idx).expand(p.shape).to(p.dtype)


def _decode(t: torch.Tensor):
    """(parameter id, axis) of an encoded saved tensor, or None if it is not one of ours."""
    t = t.to(torch.float32)
    if t.numel() == 0 or not bool(torch.isfinite(t).all()) or not torch.equal(t, t.round()):
        return None
    pid = torch.div(t, _RADIX, rounding_mode="floor")
    first = int(pid.reshape(-1)[0])
    if first < 1 or not torch.all(pid == first):
        return None
    ch = t - first * _RADIX
    for axis in range(t.dim()):
        shape = [1] * t.dim()
        shape[axis] = t.shape[axis]
        if torch.equal(ch, torch.arange(t.shape[axis], dtype=torch.float32).reshape(shape).expand(t.shape)):
            return first, axis
    if t.dim() == 0 or torch.all(ch == ch.reshape(-1)[0]):
        return first, 0
    return None


@torch.no_grad()
def saved_names(model, wanted: dict[str, int]) -> dict[str, list[Saved]]:
    """``{param name: channel axis}`` -> ``{param name: [Saved, ...]}`` as ``save_pretrained`` writes them.

    A parameter saved as several tensors (split experts) maps to all of them, in name order; a tied
    parameter written once maps to that one name (an untied alias that is not saved maps to nothing)."""
    from safetensors import safe_open

    params = dict(model.named_parameters(remove_duplicate=False))
    by_obj: dict[int, list[str]] = {}
    for n, p in params.items():
        by_obj.setdefault(id(p), []).append(n)
    backup = {}
    ids: dict[int, int] = {}  # id(param) -> encoding id
    try:
        for name, axis in wanted.items():
            p = params[name]
            if id(p) in ids:
                continue
            ids[id(p)] = len(ids) + 1
            backup[name] = p.detach().clone()
            p.copy_(_encode(p, ids[id(p)], axis % p.dim()))
        with tempfile.TemporaryDirectory(prefix="sf_names_") as td:
            model.save_pretrained(td, max_shard_size="100GB", safe_serialization=True)
            tensors = {}
            for f in sorted(Path(td).glob("*.safetensors")):
                with safe_open(str(f), "pt") as sf:
                    for k in sf.keys():
                        tensors[k] = sf.get_tensor(k)
    finally:
        for name, v in backup.items():
            params[name].copy_(v)
    decoded: dict[int, list[Saved]] = {}
    for k in sorted(tensors):
        d = _decode(tensors[k])
        if d is not None:
            decoded.setdefault(d[0], []).append(Saved(k, d[1], tensors[k].dim()))
    out = {}
    for name in wanted:
        out[name] = decoded.get(ids[id(params[name])], [])
    return out


def all_saved_names(model) -> list[str]:
    """The tensor names ``save_pretrained`` writes for ``model`` (values not kept)."""
    from safetensors import safe_open
    with tempfile.TemporaryDirectory(prefix="sf_names_") as td:
        model.save_pretrained(td, max_shard_size="100GB")
        names = []
        for f in sorted(Path(td).glob("*.safetensors")):
            with safe_open(str(f), "pt") as sf:
                names.extend(sf.keys())
    return sorted(names)
