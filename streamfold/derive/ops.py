"""Operation tables and shape rules for the provenance tracer (``trace.py``): which torch functions
pass a per-channel scale through, which read only metadata, and why the others block a fold."""
from __future__ import annotations

import torch


# ops that pass values through unchanged (per channel), given the last axis is kept
_PASS = {"to", "type", "float", "half", "bfloat16", "double", "contiguous", "clone", "detach", "type_as",
         "requires_grad_", "dropout", "view_as", "reshape_as", "expand_as", "cpu", "cuda", "alias"}
_SHAPE = {"view", "reshape", "flatten", "unflatten", "unsqueeze", "squeeze", "expand", "broadcast_to",
          "repeat", "contiguous", "transpose", "swapaxes", "swapdims", "permute", "movedim", "t", "index_select",
          "gather", "take_along_dim", "select", "narrow", "__getitem__", "repeat_interleave"}
_SPLIT = {"split", "chunk", "unbind", "tensor_split", "split_with_sizes"}
_MUL = {"mul", "__mul__", "__rmul__", "mul_", "__imul__", "multiply"}
_DIV = {"div", "__truediv__", "div_", "__itruediv__", "true_divide"}
_ADD = {"add", "__add__", "__radd__", "add_", "__iadd__", "sub", "__sub__", "__rsub__", "sub_", "__isub__"}
_LINEAR = {"linear"}
_MATMUL = {"matmul", "__matmul__", "bmm", "mm", "baddbmm", "addmm"}
_GROUPED = {"_grouped_mm", "grouped_mm"}
_REDUCE = {"sum", "mean", "amax", "max", "min", "amin", "norm", "var", "std", "softmax", "log_softmax", "logsumexp",
           "prod", "cumsum", "topk", "argmax", "sort"}
_CAT = {"cat", "concat", "concatenate", "stack", "hstack", "vstack"}
_CONV = {"conv1d", "conv2d", "conv3d", "conv_transpose1d"}
# read only the shape/dtype/device: not a use of the values
_META = {"size", "dim", "numel", "__len__", "shape", "dtype", "device", "is_floating_point", "element_size",
         "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "new_zeros", "new_ones",
         "new_empty", "new_full", "new_tensor", "stride", "is_contiguous", "data_ptr", "get_device", "ndimension",
         "nelement", "__format__", "__repr__", "storage_offset", "untyped_storage", "is_complex", "__hash__",
         "has_names", "names", "layout", "requires_grad", "is_cuda", "is_meta", "grad", "_version", "is_nested",
         "is_sparse", "is_quantized", "ndim", "itemsize", "nbytes", "is_leaf", "grad_fn", "output_nr"}
_NONLINEAR_HINT = ("silu", "gelu", "relu", "tanh", "sigmoid", "exp", "log", "pow", "sqrt", "rsqrt", "softplus",
                   "abs", "sin", "cos", "clamp", "square", "erf", "elu", "mish", "where", "masked_fill")


def flat(obj, out: list):
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            flat(o, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            flat(o, out)
    return out


def dim_arg(args, kwargs, pos: int, default, key: str = "dim"):
    if key in kwargs:
        return kwargs[key]
    return args[pos] if len(args) > pos else default


def index_axes(idx, pv, nd: int):
    """Axes of ``param_view[idx]`` for basic and (leading) tensor indexing."""
    idx = idx if isinstance(idx, tuple) else (idx,)
    if any(i is Ellipsis for i in idx):
        k = idx.index(Ellipsis)
        used = sum(1 for i in idx if i is not None and i is not Ellipsis)
        idx = idx[:k] + (slice(None),) * (nd - used) + idx[k + 1:]
    axes, partial, src = [], set(pv.partial), 0
    for i in idx:
        if i is None:
            axes.append(None)
            continue
        if src >= nd:
            return None
        a = pv.axes[src]
        if isinstance(i, int):
            pass  # axis dropped
        elif isinstance(i, slice):
            axes.append(a)
            if i != slice(None):
                partial.add(a)
        elif isinstance(i, torch.Tensor) and i.dtype != torch.bool:
            axes.extend([None] * max(i.dim(), 0))
        else:
            return None
        src += 1
    axes.extend(pv.axes[src:])
    return tuple(axes), frozenset(p for p in partial if p is not None)


def shape_keeps_channels(name, x, args, kwargs, out, width) -> str | None:
    """None when ``out`` still has the same channels on its last axis; else why not."""
    outs = flat(out, [])
    if not outs or any(o.dim() == 0 or o.shape[-1] != width for o in outs):
        if name in ("__getitem__", "narrow", "select", "index_select", "gather"):
            return "slices the channel axis"
        return "reshapes the channel axis (e.g. splits it into heads)"
    nd = x.dim()
    last = nd - 1
    if name in ("transpose", "swapaxes", "swapdims"):
        a, b = dim_arg(args, kwargs, 1, 0) % nd, dim_arg(args, kwargs, 2, 1) % nd
        return "moves the channel axis" if last in (a, b) and a != b else None
    if name == "t":
        return "moves the channel axis" if nd == 2 else None
    if name in ("permute", "movedim"):
        if name == "permute":
            dims = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
            dims = kwargs.get("dims", dims)
            return None if dims[-1] % nd == last else "moves the channel axis"
        return "moves the channel axis"
    if name in ("index_select", "gather", "take_along_dim", "select", "narrow", "repeat_interleave"):
        d = dim_arg(args, kwargs, 1, None)
        return None if d is not None and d % nd != last else "indexes the channel axis"
    if name == "__getitem__":
        idx = args[1] if isinstance(args[1], tuple) else (args[1],)
        if any(i is Ellipsis for i in idx):
            after = idx[idx.index(Ellipsis) + 1:]
            return None if all(i is None for i in after) or after == (slice(None),) else "slices the channel axis"
        real = [i for i in idx if i is not None]
        if len(real) >= nd and real[nd - 1] != slice(None):
            return "slices the channel axis"
        if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool and i.dim() > 1 for i in real):
            return "masks across the channel axis"
        return None
    return None


def why(name: str, where: str) -> str:
    if name in _ADD:
        return f"its output is added to another tensor ({name} in {where})"
    if name in _CAT:
        return f"concatenated with other tensors ({name} in {where})"
    if name in _REDUCE:
        return f"a reduction over channels ({name} in {where})"
    if name in _CONV:
        return f"a convolution ({name} in {where})"
    if "attention" in name:
        return f"used directly by attention ({name} in {where})"
    if any(h in name for h in _NONLINEAR_HINT):
        return f"a nonlinearity ({name} in {where})"
    return f"not a linear map of the channels ({name} in {where})"
