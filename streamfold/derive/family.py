"""From one traced tiny model to a family's rules (the ``--rules`` schema). Development time; torch.

For every norm instance: its checkpoint tensors, its convention (measured by ``tiny.find_norms``), its
consumers as checkpoint tensors and axes (``names.saved_names``) or why it cannot fold (``trace``).
Instances are generalised to patterns (``{n}`` layer, ``{e}`` expert, ``{h}`` head index) and grouped;
a norm whose layers have different consumer sets (dense and MoE layers, hybrid attention / recurrent
layers) gets ``variants``, longest first (``check`` proves that the plan picks the right one per layer).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from . import names as _names
from .trace import Use, trace

_QK_LINEAR = re.compile(r"(^|[._])(q|k|wq|wk|query|key|q_proj|k_proj)$")
VISION_WHY = "vision/audio side: outside FlashNorm's language-model scope, left untouched"


@dataclass
class Instance:
    """One norm module of the tiny model, in checkpoint names."""

    module: str  # in-memory module name
    weight: str  # saved tensor name
    offset: int
    fold: bool
    consumers: list[tuple[str, int, int, str | None]] = field(default_factory=list)  # (weight, axis, ndim, bias)
    why: str = ""
    head: bool = False  # consumers are exactly the output embedding (lm_head): folds only when untied
    has_bias: bool = False  # LayerNorm bias: folds only where every consumer has a bias
    tower: bool = False  # outside the language model (a vision tower), analysed with ``vision=True``
    tiles: dict[str, int] = field(default_factory=dict)  # consumer weight -> k: reads k outputs side by side


@dataclass
class Derived:
    """What one model of a family shows: its instances, out-of-scope subtrees, layout prefixes."""

    model_type: str
    instances: list[Instance]
    outside: list[str]  # saved-name prefixes of subtrees outside the language model (vision/audio)
    prefixes: dict[str, str]  # saved-name prefix -> in-memory prefix, where they differ
    class_name: str = ""
    saved: list[str] = field(default_factory=list)  # every tensor name the checkpoint holds


def _decoder_prefix(model) -> str:
    dec = model.get_decoder()
    for name, mod in model.named_modules():
        if mod is dec:
            return name
    return ""


def _common_prefixes(mem: str, saved: str) -> tuple[str, str] | None:
    """(saved prefix, in-memory prefix) when the names differ only in a leading part. When one side's
    prefix would be empty, the first shared component is included (without its dot), so both are
    non-empty (``language_model.lm_head`` -> ``lm_head``)."""
    if mem == saved:
        return None
    a, b = mem.split("."), saved.split(".")
    k = 0
    while k < min(len(a), len(b)) and a[-1 - k] == b[-1 - k]:
        k += 1
    if k == 0:
        return None
    if len(a) == k or len(b) == k:
        return ".".join(b[: len(b) - k + 1]), ".".join(a[: len(a) - k + 1])
    return ".".join(b[: len(b) - k]) + ".", ".".join(a[: len(a) - k]) + "."


def _reason(uses: list[Use], input_from: str | None) -> str:
    blocks = [u.why for u in uses if u.kind == "block"]
    why = "; ".join(dict.fromkeys(blocks[:2]))
    if input_from:
        mod = input_from.rsplit(".", 1)[0]
        if _QK_LINEAR.search(mod):
            return f"q/k norm: normalizes the output of {mod}, not a linear's input; then {why}"
        return f"normalizes the output of {mod}; then {why}"
    return why


def _memory_names(model, wanted: dict[str, int]) -> dict[str, list]:
    """``saved_names`` for a checkpoint in the model's in-memory names (its ``state_dict``, unconverted)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    return {n: [_names.Saved(n, axis % params[n].dim(), params[n].dim())] for n, axis in wanted.items()}


@torch.no_grad()
def derive_model(model, inputs: dict, names: str = "saved", vision: bool = False) -> Derived:
    """Trace ``model`` (a tiny random model from ``tiny.build_tiny_model``) and describe every norm, in the
    tensor names ``save_pretrained`` writes (``names="saved"``) or in the in-memory names (``"memory"``:
    a checkpoint of the ``state_dict``, which the loader takes unconverted).

    ``vision``: the norms outside the language model (towers) are analysed too (``Instance.tower``; the
    ``inputs`` must run the tower: a prompt with an image), instead of being marked ``VISION_WHY``.
    The layout prefixes are computed from the language model's tensors either way."""
    from . import tiny
    norms = getattr(model, "tiny_norms", None) or tiny.find_norms(model)
    dec0 = _decoder_prefix(model)
    tower = {n for n in norms if dec0 and n != dec0 and not n.startswith(dec0 + ".")} if vision else set()
    traces = trace(model, list(norms), inputs, tile=tower)  # regrouped outputs (patch mergers): towers only
    params = dict(model.named_parameters(remove_duplicate=False))
    dec = _decoder_prefix(model)
    out_emb = model.get_output_embeddings()
    head_param = id(out_emb.weight) if out_emb is not None else None
    in_scope = {n for n in norms if not dec or n == dec or n.startswith(dec + ".")}
    wanted: dict[str, int] = {}
    tower_wanted: dict[str, int] = {}  # a tower's consumers (``vision``): not used for layout prefixes
    for n, info in norms.items():
        wanted[n + ".weight"] = -1
        if info.has_bias:
            wanted[n + ".bias"] = -1
        into = wanted if n in in_scope else tower_wanted
        for u in traces[n].uses if n in in_scope or vision else ():  # else a tower is kept whole by prefix
            if u.kind == "consumer":
                into[u.param] = u.axis
                if u.bias:
                    into[u.bias] = -1
    memory = names == "memory"
    saved = _memory_names(model, wanted) if memory else _names.saved_names(model, wanted)
    prefixes: dict[str, str] = {}
    for p, lst in list(saved.items()):
        for s in lst:
            pair = _common_prefixes(p, s.name)
            # only leading renames (nested language models); a rename inside a layer is not a layout
            if pair and pair[0] not in prefixes and not _DIGITS.search(pair[0]) and not _DIGITS.search(pair[1]):
                prefixes[pair[0]] = pair[1]
    if tower_wanted:
        saved.update(_memory_names(model, tower_wanted) if memory else _names.saved_names(model, tower_wanted))
    instances, outside = [], []
    parent = dec.rsplit(".", 1)[0] + "." if "." in dec else ""
    # a tower the image prompt never runs (Gemma 4's audio tower) is no vision tower: kept whole by prefix
    ran = {parent + n[len(parent):].split(".", 1)[0] + "." for n in norms if n not in in_scope and traces[n].calls}
    for n, info in norms.items():
        ws = saved[n + ".weight"]
        if len(ws) != 1:
            raise RuntimeError(f"{n}.weight is saved as {len(ws)} tensors ({[s.name for s in ws]})")
        inst = Instance(n, ws[0].name, info.offset, False, has_bias=info.has_bias)
        if n not in in_scope:
            sub = parent + n[len(parent):].split(".", 1)[0] + "."
            mem_suffix = n[len(sub):] + ".weight"
            prefix = ws[0].name[: len(ws[0].name) - len(mem_suffix)] if ws[0].name.endswith(mem_suffix) else sub
            if prefix not in outside:
                outside.append(prefix)
            if not vision or sub not in ran:
                inst.why = VISION_WHY
                instances.append(inst)
                continue
            inst.tower = True
        uses = traces[n].uses
        if all(u.kind == "consumer" for u in uses):
            inst.fold = True
            inst.head = [id(params[u.param]) for u in uses] == [head_param]
            for u in uses:
                for s in saved[u.param]:
                    bias = None
                    if u.bias:
                        bs = [b.name for b in saved[u.bias]]
                        cand = s.name[: -len(".weight")] + ".bias" if s.name.endswith(".weight") else None
                        bias = cand if cand in bs else (bs[0] if len(bs) == 1 and len(saved[u.param]) == 1 else None)
                    inst.consumers.append((s.name, s.axis, s.ndim, bias))
                    if u.tile > 1:
                        inst.tiles[s.name] = u.tile
                if not saved[u.param]:
                    inst.fold, inst.why = False, f"its consumer {u.param} is not saved in the checkpoint"
        else:
            inst.why = _reason(uses, traces[n].input_from)
        instances.append(inst)
    every = sorted(model.state_dict()) if memory else _names.all_saved_names(model)
    return Derived(model.config.model_type, instances, outside, prefixes, type(model).__name__, every)


# -- patterns ----------------------------------------------------------------------------------------------
_DIGITS = re.compile(r"(?<=\.)\d+(?=\.|$)")


def norm_pattern(weight: str) -> tuple[str, str | None, str | None]:
    """(pattern of the norm module, its layer prefix, its layer index): first index {n}, others {h}."""
    mod = weight[: -len(".weight")]
    m = _DIGITS.search(mod)
    if not m:
        return mod, None, None
    pre, n = mod[: m.start()], m.group()
    rest = _DIGITS.sub("{h}", mod[m.end():])
    return pre + "{n}" + rest, pre, n


def consumer_pattern(name: str, layer_prefix: str | None, n: str | None) -> str:
    """A consumer tensor name with the norm's layer index as {n} and any other index as {e}."""
    if layer_prefix is not None and name.startswith(layer_prefix + n + "."):
        name = layer_prefix + "{n}" + name[len(layer_prefix) + len(n):]
    return _DIGITS.sub("{e}", name)


def generalize_why(why: str) -> str:
    return re.sub(r"(?<=\.)\d+(?=[.) ;]|$)", "{n}", why)


def consumer_entry(weight: str, axis: int, bias: str | None, ndim_last: bool, tile: int = 1):
    """The schema's spelling: a module pattern when it is a plain ``.weight`` [out, in] / ``.bias``."""
    if weight.endswith(".weight") and ndim_last and tile == 1 and \
            (bias is None or bias == weight[: -len(".weight")] + ".bias"):
        return weight[: -len(".weight")]
    entry = {"weight": weight, "axis": axis}
    if bias:
        entry["bias"] = bias
    if tile > 1:
        entry["tile"] = tile
    return entry
