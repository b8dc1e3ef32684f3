"""Provenance tracer: where does each norm's output go? (development time; imports torch.)

Run one forward pass under a ``TorchFunctionMode``. Each norm module's output is *tagged* with the
norm's name; the tag follows the tensor through operations that commute with a per-channel scale of
the last axis (dtype casts, views and reshapes that keep the last axis, token indexing and gathers as
MoE routing does, splits along other axes, elementwise multiplication or division by an untagged
tensor). Every other operation that reads a tagged tensor is a *use*:

- a linear map that contracts the channel axis with a parameter (``F.linear``, ``matmul``/``bmm``,
  ``einsum``, grouped matmuls; the parameter may be indexed or transposed first, as fused expert
  tensors are) is a ``consumer``: the parameter and which of its axes is contracted;
- anything else is a ``block`` with the reason (added to another tensor, a nonlinearity, another
  norm, a reduction or slice over channels, a convolution, ...).

A norm folds only when every use is a consumer (decided by ``derive.family``). Parameters are tracked
the same way (``_PView``: which parameter axis each axis of a view is) so a consumer is always named
by a parameter and a parameter axis, never by the shape of an intermediate.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode

from .ops import (_ADD, _CAT, _DIV, _GROUPED, _LINEAR, _MATMUL, _META, _MUL, _PASS, _SHAPE, _SPLIT, dim_arg,
                  flat as _flat, index_axes, shape_keeps_channels)
from .ops import why as block_reason


@dataclass(frozen=True)
class Use:
    """One use of a norm's output: a consumer (``param``, contracted ``axis``, optional ``bias``) or a block."""

    kind: str  # "consumer" | "block"
    param: str = ""
    axis: int = -1
    bias: str | None = None
    why: str = ""
    tile: int = 1  # the consumer reads k outputs side by side (a view regrouping k tokens: a patch merger)


@dataclass
class NormTrace:
    name: str
    width: int
    uses: list[Use] = field(default_factory=list)
    input_from: str | None = None  # the linear whose output this norm normalizes, if any
    calls: int = 0


def _name(func) -> str:
    n = getattr(func, "__name__", str(func))
    if n == "__get__":
        n = getattr(getattr(func, "__self__", None), "__name__", n)
    return n


class _PView:
    """A tensor that is a view of parameter ``param``: ``axes[i]`` is the parameter axis of axis ``i``
    (None: an axis that is not one of the parameter's, e.g. a gathered index axis); ``partial`` holds
    the parameter axes only part of which is present (sliced)."""

    def __init__(self, ref, param: str, axes: tuple, partial: frozenset = frozenset()):
        self.ref, self.param, self.axes, self.partial = ref, param, axes, partial


class Tracer(TorchFunctionMode):
    """Trace one forward pass; ``norms`` maps norm module names to their ``NormTrace``."""

    def __init__(self, model: torch.nn.Module, norm_names: list[str], tile: set[str] = frozenset()):
        super().__init__()
        self.tile_ok = set(tile)  # norms whose regrouped outputs (k tokens per row) may fold tiled
        self.model = model
        text = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        self.hidden = getattr(text, "hidden_size", None)
        self.mods = dict(model.named_modules())
        self.norms = {n: NormTrace(n, int(self.mods[n].weight.shape[-1])) for n in norm_names}
        self.tags: dict[int, tuple] = {}  # id -> (tensor, norm name)
        self.pviews: dict[int, _PView] = {}
        self.lin_out: dict[int, tuple] = {}  # id -> (tensor, param name): outputs of linear maps
        self.cons_out: dict[int, tuple] = {}  # id -> (tensor, norm name, index of its Use): for bias adds
        self.tiles: dict[int, tuple] = {}  # id -> (tensor, k): a norm's output regrouped k tokens per row
        self.keep: list = []  # keep traced tensors alive so their ids stay unique
        self.stack: list[str] = []
        self.inside_norm = 0
        self._hooks = []
        for p_name, p in model.named_parameters(remove_duplicate=False):
            if id(p) not in self.pviews:
                self.pviews[id(p)] = _PView(p, p_name, tuple(range(p.dim())))

    # -- module hooks ------------------------------------------------------------------------------
    def __enter__(self):
        for name, mod in self.mods.items():
            self._hooks.append(mod.register_forward_pre_hook(self._pre(name), with_kwargs=True))
            self._hooks.append(mod.register_forward_hook(self._post(name), with_kwargs=True))
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self._hooks:
            h.remove()
        self._hooks = []
        return super().__exit__(*exc)

    def _pre(self, name):
        def hook(mod, args, kwargs):
            self.stack.append(name)
            if name in self.norms:
                for t in _flat((args, kwargs), []):
                    tag = self._tag(t)
                    if tag is not None:
                        self._block(tag, f"feeds another norm ({name})")
                    lin = self.lin_out.get(id(t))
                    if lin is not None and lin[0] is t:
                        self.norms[name].input_from = lin[1]
                self.inside_norm += 1
        return hook

    def _post(self, name):
        def hook(mod, args, kwargs, out):
            self.stack.pop()
            if name in self.norms:
                self.inside_norm -= 1
                tr = self.norms[name]
                tr.calls += 1
                for t in _flat(out, []):
                    if t.shape and t.shape[-1] == tr.width:
                        self._set_tag(t, name)
            return None
        return hook

    # -- bookkeeping ---------------------------------------------------------------------------------
    def _tag(self, t) -> str | None:
        e = self.tags.get(id(t))
        return e[1] if e is not None and e[0] is t else None

    def _set_tag(self, t, norm: str) -> None:
        self.tags[id(t)] = (t, norm)
        self.keep.append(t)

    def _pview(self, t) -> _PView | None:
        v = self.pviews.get(id(t)) if isinstance(t, torch.Tensor) else None
        return v if v is not None and v.ref is t else None

    def _where(self) -> str:
        return self.stack[-1] if self.stack else "the model"

    def _block(self, norm: str, why: str) -> None:
        u = Use("block", why=why)
        if u not in self.norms[norm].uses:
            self.norms[norm].uses.append(u)

    def _consume(self, norm: str, pv: _PView, view_axis: int, out, bias: _PView | None = None,
                 tile: int = 1) -> None:
        axis = pv.axes[view_axis]
        if axis is None or axis in pv.partial:
            self._block(norm, f"contracted with part of parameter {pv.param} ({self._where()})")
            return
        u = Use("consumer", pv.param, axis, bias.param if bias is not None else None, tile=tile)
        uses = self.norms[norm].uses
        if u not in uses:
            # the same parameter seen once with and once without a bias (expert loops) keeps the bias
            same = [i for i, x in enumerate(uses) if x.kind == "consumer" and (x.param, x.axis) == (u.param, u.axis)]
            if same:
                if u.bias and not uses[same[0]].bias:
                    uses[same[0]] = u
            else:
                uses.append(u)
        for t in _flat(out, []):
            self.cons_out[id(t)] = (t, norm, pv.param, axis)
            self.lin_out[id(t)] = (t, pv.param)
            self.keep.append(t)

    # -- the mode ------------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = _name(func)
        if name in _META or self.inside_norm:
            return out
        ins = _flat((args, kwargs), [])
        tagged = [(t, self._tag(t)) for t in ins if self._tag(t) is not None]
        if tagged:
            self._tagged_op(name, func, args, kwargs, out, tagged)
        else:
            self._untagged_op(name, args, kwargs, out)
        return out

    def _untagged_op(self, name, args, kwargs, out) -> None:
        """Track parameter views, linear outputs (for q/k norms) and consumer biases."""
        if not args or not isinstance(args[0], torch.Tensor):
            return
        x = args[0]
        pv = self._pview(x)
        if pv is not None and isinstance(out, torch.Tensor):
            axes = self._view_axes(name, x, args, kwargs, out, pv)
            if axes is not None:
                self.pviews[id(out)] = _PView(out, pv.param, axes[0], axes[1])
                self.keep.append(out)
            return
        if isinstance(out, (list, tuple)) and pv is not None and name in _SPLIT:
            dim = dim_arg(args, kwargs, 2, 0) % x.dim()
            for o in out:
                if isinstance(o, torch.Tensor):
                    self.pviews[id(o)] = _PView(o, pv.param, pv.axes, pv.partial | {pv.axes[dim]})
                    self.keep.append(o)
            return
        if name in _LINEAR or name in _MATMUL:
            w = args[2] if name == "addmm" and len(args) > 2 else args[1] if len(args) > 1 else kwargs.get("weight")
            wpv = self._pview(w)
            if wpv is not None and isinstance(out, torch.Tensor):
                self.lin_out[id(out)] = (out, wpv.param)
                self.keep.append(out)
            return
        if name in _ADD and name.startswith(("add", "__add", "__radd", "__iadd")) and len(args) > 1:
            a, b = args[0], args[1]
            for o, p in ((a, b), (b, a)):
                c = self.cons_out.get(id(o)) if isinstance(o, torch.Tensor) else None
                bp = self._pview(p)
                if c is not None and c[0] is o and bp is not None:
                    self._set_bias(c, bp)
        lin = self.lin_out.get(id(x))
        if lin is not None and lin[0] is x and name in _SHAPE | _PASS | _SPLIT:
            for o in _flat(out, []):
                self.lin_out[id(o)] = (o, lin[1])
                self.keep.append(o)

    def _set_bias(self, c, bp: _PView) -> None:
        _, norm, param, axis = c
        uses = self.norms[norm].uses
        for i, u in enumerate(uses):
            if u.kind == "consumer" and u.param == param and u.axis == axis and u.bias is None:
                uses[i] = Use("consumer", param, axis, bp.param)

    def _view_axes(self, name, x, args, kwargs, out, pv: _PView):
        """(axes, partial) of a view of a parameter view, or None when it is no longer a plain view."""
        nd = x.dim()
        if name in _PASS or name in ("data",):
            return pv.axes, pv.partial
        if name in ("t", "T", "mT") or name in ("transpose", "swapaxes", "swapdims"):
            if name in ("t", "T") and nd == 2:
                a, b = 0, 1
            elif name == "mT":
                a, b = nd - 2, nd - 1
            else:
                a, b = dim_arg(args, kwargs, 1, 0) % nd, dim_arg(args, kwargs, 2, 1) % nd
            axes = list(pv.axes)
            axes[a], axes[b] = axes[b], axes[a]
            return tuple(axes), pv.partial
        if name == "permute":
            dims = args[1:] if len(args) > 2 or not isinstance(args[1], (list, tuple)) else args[1]
            return tuple(pv.axes[d % nd] for d in dims), pv.partial
        if name == "__getitem__":
            return index_axes(args[1], pv, nd)
        if name in ("view", "reshape") and tuple(out.shape) == tuple(x.shape):
            return pv.axes, pv.partial
        if name == "unsqueeze":
            d = dim_arg(args, kwargs, 1, 0) % (nd + 1)
            return pv.axes[:d] + (None,) + pv.axes[d:], pv.partial
        return None

    def _tagged_op(self, name, func, args, kwargs, out, tagged) -> None:
        norms = {n for _, n in tagged}
        x = args[0] if args else None
        first = self._tag(x) if isinstance(x, torch.Tensor) else None
        where = self._where()
        if name not in _LINEAR and any(self.tiles.get(id(t), (None,))[0] is t for t, _ in tagged):
            for n in norms:
                self._block(n, f"regrouped k tokens per row, then not read by a linear ({name} in {where})")
            return
        if name in _LINEAR and first is not None:
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            wpv = self._pview(w)
            tiled = self.tiles.get(id(x))
            if wpv is None:
                self._block(first, f"multiplied by a computed matrix, not a checkpoint parameter (linear in {where})")
            else:
                self._consume(first, wpv, 1 if w.dim() == 2 else -1, out, self._pview(b),
                              tiled[1] if tiled is not None and tiled[0] is x else 1)
            return
        if name == "addmm" and len(args) >= 3 and isinstance(args[1], torch.Tensor) and first is None \
                and self._tag(args[1]) is not None and self._tag(args[2]) is None:
            # addmm(bias, x, W) = bias + x @ W (GPT-2's Conv1D, W stored [in, out]): W's axis 0 meets x's channels
            wpv = self._pview(args[2])
            if wpv is None:
                self._block(self._tag(args[1]), f"multiplied by a computed tensor ({name} in {where})")
            else:
                self._consume(self._tag(args[1]), wpv, 0, out, self._pview(args[0]))
            return
        if name in _MATMUL | _GROUPED and first is not None and len(args) > 1 and self._tag(args[1]) is None:
            w = args[1]
            wpv = self._pview(w)
            if wpv is None:
                self._block(first, f"multiplied by a computed tensor ({name} in {where})")
            else:
                self._consume(first, wpv, w.dim() - 2 if w.dim() >= 2 else 0, out)
            return
        if name == "einsum":
            self._einsum(args, kwargs, out, tagged, where)
            return
        if name in _CAT and len(norms) == 1:  # e.g. a KV cache of latents: cat along tokens
            seq = args[0] if args and isinstance(args[0], (list, tuple)) else kwargs.get("tensors", ())
            dim = dim_arg(args, kwargs, 1, 0)
            n0 = next(iter(norms))
            if all(t.numel() == 0 or self._tag(t) == n0 for t in seq) and seq and \
                    dim % seq[0].dim() != seq[0].dim() - 1 if seq and seq[0].dim() else False:
                return self._pass(n0, out, self.norms[n0].width, name, where)
        if len(norms) > 1 or len(tagged) > 1:
            for n in norms:
                self._block(n, f"combined with another norm's output ({name} in {where})")
            return
        (t, norm), = tagged
        width = self.norms[norm].width
        if name in _MUL and len(args) >= 2:
            return self._pass(norm, out, width, name, where)
        if name in _DIV and t is x:
            return self._pass(norm, out, width, name, where)
        if name in _PASS and t is x:
            return self._pass(norm, out, width, name, where)
        if name in ("type_as", "to", "expand_as", "view_as", "reshape_as", "new_zeros") and t is not x:
            return  # only the tagged tensor's dtype or shape is read
        if name in _SHAPE and t is x:
            why = shape_keeps_channels(name, x, args, kwargs, out, width)
            if why is None:
                return self._pass(norm, out, width, name, where)
            k = out.shape[-1] // width if isinstance(out, torch.Tensor) and out.dim() and x.shape[-1] == width else 0
            if name in ("view", "reshape") and k > 1 and out.shape[-1] == k * width and out.numel() == x.numel() \
                    and norm in self.tile_ok:
                # row-major regrouping of k tokens (a patch merger): element j of a row is channel j % width, so
                # a linear reading it folds the scale tiled k times; any other use blocks (its width differs)
                self._set_tag(out, norm)
                self.tiles[id(out)] = (out, k)
                return
            return self._block(norm, f"{why} ({name} in {where})")
        if name in _SPLIT and t is x:
            dim = dim_arg(args, kwargs, 2, 0) % x.dim()
            if dim != x.dim() - 1:
                return self._pass(norm, out, width, name, where)
            return self._block(norm, f"split along the channel axis ({name} in {where})")
        if name in ("sum", "mean") and t is x:
            dims = dim_arg(args, kwargs, 1, None)
            dims = [dims] if isinstance(dims, int) else dims
            if dims is not None and all(d % x.dim() != x.dim() - 1 for d in dims):
                return self._pass(norm, out, width, name, where)
        if name in _ADD and width == self.hidden:
            return self._block(norm, f"post-norm: its output is added to the residual stream ({name} in {where})")
        self._block(norm, block_reason(name, where))

    def _pass(self, norm, out, width, name, where) -> None:
        outs = _flat(out, [])
        if not outs:
            return
        for o in outs:
            if o.dim() == 0 or o.shape[-1] != width:
                self._block(norm, f"reshapes the channel axis ({name} in {where})")
                return
        for o in outs:
            self._set_tag(o, norm)

    def _einsum(self, args, kwargs, out, tagged, where) -> None:
        eq, ops = args[0], list(args[1:])
        if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
            ops = list(ops[0])
        lhs, _, rhs = eq.replace(" ", "").partition("->")
        subs = lhs.split(",")
        for t, norm in tagged:
            i = next(k for k, o in enumerate(ops) if o is t)
            ch = subs[i][-1] if subs[i] and subs[i][-1] != "." else None
            partner = [(k, o) for k, o in enumerate(ops) if k != i]
            if ch is None or not rhs or ch in rhs or len(partner) != 1 or self._pview(partner[0][1]) is None:
                self._block(norm, f"einsum {eq!r} does not contract its channels with one parameter ({where})")
                continue
            k, w = partner[0]
            if ch not in subs[k]:
                self._block(norm, f"einsum {eq!r} sums over its channels ({where})")
                continue
            self._consume(norm, self._pview(w), subs[k].index(ch), out)


@torch.no_grad()
def trace(model: torch.nn.Module, norm_names: list[str], inputs: dict, tile=frozenset()) -> dict[str, NormTrace]:
    """One forward pass of ``model`` on ``inputs`` (a transformers model runs without a KV cache);
    the uses of every norm in ``norm_names``. For the norms in ``tile`` (vision towers), a ``view``/``reshape``
    that regroups k rows into one (a patch merger) is followed, and a linear reading it is a consumer with
    ``tile=k`` (its input axis is k copies of the channels); any other use of it blocks."""
    if hasattr(model.config, "use_cache"):
        inputs = {"use_cache": False, **inputs}
    from .tiny import text_forward_module  # Llama 4: the text path without pixels (see there)
    tracer = Tracer(model, norm_names, tile)
    with tracer:
        text_forward_module(model, inputs)(**inputs)
    for tr in tracer.norms.values():
        if tr.calls and not tr.uses:
            tr.uses.append(Use("block", why="its output is not used"))
        elif not tr.calls:
            tr.uses.append(Use("block", why="not called in the forward pass"))
    return tracer.norms
