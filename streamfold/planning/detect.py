"""Know a FlashNorm checkpoint when you see one: its state from config flags, headers and norm values.

Pure: ``config.json`` + tensor headers + a reader of the (small) norm vectors -> :class:`FlashNormState`.
The norms looked at are exactly the ones the family rules would fold in this checkpoint, found by the
norm's own tensor or, when it is absent (strict mode), by its consumers: names, layer indices and widths
come from the rules and the consumer tensors present. Each is one of:

- ``identity``: present and equal to the identity (``w == 1 - offset`` exactly; LayerNorm bias, if
  present, all zero): folding it again multiplies by ones;
- ``absent``: not in the checkpoint while its consumers are (a strict FlashNorm checkpoint);
- ``learned``: present with other values (a norm to fold);
- ``present``: present, values not read (remote ``inspect`` reads headers only).

The checkpoint is already folded when every foldable norm is ``identity`` or ``absent`` (at least one
norm, or the ``config.json`` flags say so). An untrained model whose norms are all the identity is
therefore reported as folded: folding it is a no-op, which is what the report says. A model with only
some identity norms is not folded and converts normally.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..rules.patterns import Consumer, config_get, expand_consumer, looks_like_norm, natural_key, pattern_regex
from ..core.reader import TensorInfo
from ..quant.formats import classify
from .compose import is_tied, resolve

FLAG_KEYS = ("flashnorm", "flashnorm_mode", "flashnorm_version", "flashnorm_vision")
_PLACEHOLDER = re.compile(r"\{([a-z]+)\}")


@dataclass
class NormState:
    """One norm the family rules fold in this checkpoint, and what it holds now."""

    rule: str
    name: str  # module name; tensors are name + ".weight" / ".bias"
    status: str  # identity | absent | learned | present
    width: int
    dtype: str | None  # stored dtype (None when absent)
    bias: bool  # a bias tensor is present
    consumers: list[Consumer] = field(default_factory=list)
    offset: int | None = None  # the rule's own convention, when it differs from the family's (a tower's)
    norm_bias: bool = False  # the rule says the norm has a bias parameter (restored with it)

    @property
    def weight(self) -> str:
        return self.name + ".weight"


@dataclass
class FlashNormState:
    """Whether a checkpoint is already FlashNorm, how that is known, and each foldable norm's state."""

    model_type: str
    family: str
    offset: int
    tied: bool
    flags: dict  # the FlashNorm keys of config.json, as found (missing keys omitted)
    norms: list[NormState]
    values_read: bool = True
    stray: list[str] = field(default_factory=list)  # norm-like tensors no fold or keep rule covers

    @property
    def declared(self) -> bool:
        """config.json says ``"flashnorm": true``."""
        return self.flags.get("flashnorm") is True

    def count(self, status: str) -> int:
        return sum(1 for n in self.norms if n.status == status)

    @property
    def folded(self) -> bool:
        """Every foldable norm is already the identity or absent (nothing left to fold)."""
        done = {"identity", "absent"} | ({"present"} if self.declared and not self.values_read else set())
        if not all(n.status in done for n in self.norms):
            return False
        if not self.declared and self.stray and all(n.status == "absent" for n in self.norms):
            # No norm where the rules expect one, but norm-like tensors elsewhere: the names do not match
            # the rules (the planner says so), which is not evidence of a strict FlashNorm checkpoint.
            return False
        return bool(self.norms) or self.declared

    @property
    def mode(self) -> str | None:
        """``compat`` (identity norms present), ``strict`` (absent), ``mixed``, or None (not folded)."""
        if not self.folded:
            return None
        absent = self.count("absent")
        if absent == len(self.norms):
            return "strict" if self.norms else self.flags.get("flashnorm_mode")
        return "compat" if absent == 0 else "mixed"

    @property
    def how(self) -> str:
        if self.declared:
            return "config.json flags"
        what = {"strict": "absent", "mixed": "the identity or absent"}.get(self.mode or "", "the identity")
        return f"every foldable norm is {what}, no config.json flags"

    @property
    def inconsistent(self) -> str | None:
        """Why the flags and the values disagree (flags say folded, a norm is not the identity), or None."""
        if not self.declared or self.folded:
            return None
        bad = next(n for n in self.norms if n.status not in ("identity", "absent", "present"))
        return (f"config.json declares a FlashNorm checkpoint, but norm {bad.weight!r} is not the identity "
                f"({self.count('learned')} of {len(self.norms)} foldable norms are not); was it trained after "
                "conversion? Remove the \"flashnorm*\" keys from config.json to fold it again")

    def line(self, src: str) -> str:
        """The one-line report: ``SRC is already a FlashNorm checkpoint (...)``."""
        version = self.flags.get("flashnorm_version")
        ver = f", flashnorm_version {version}" if version is not None else ""
        other = {"compat": "strict", "strict": "compat"}.get(self.mode or "")
        hint = f"; --mode {other} converts it to {other}" if other else ""
        if self.mode == "mixed":
            hint = "; --mode compat or --mode strict makes it uniform"
        return (f"{src} is already a FlashNorm checkpoint ({self.mode} mode{ver}; {self.how}): "
                f"nothing to fold, nothing written{hint}")

    def groups(self) -> list[dict]:
        out: dict[tuple, dict] = {}
        for n in self.norms:
            g = out.setdefault((n.rule, n.status), {"norm": n.rule, "status": n.status, "count": 0,
                                                    "dtype": n.dtype, "bias": n.bias})
            g["count"] += 1
        return list(out.values())

    def to_dict(self) -> dict:
        return {"flashnorm": self.folded, "mode": self.mode, "how": self.how if self.folded else None,
                "version": self.flags.get("flashnorm_version"), "config_flags": dict(self.flags),
                "model_type": self.model_type, "family": self.family,
                "norm_convention": "1 + w" if self.offset else "w", "values_read": self.values_read,
                "norms": self.groups(),
                "each_norm": [{"norm": n.weight, "status": n.status} for n in self.norms],
                "stray_norms": list(self.stray)}

    def describe(self, each: bool = False) -> str:
        """The state as text: a heading and one line per norm family (per norm with ``each``)."""
        ident = "ones" if self.offset == 0 else "zeros (the norm computes (1 + w) * x)"
        version = self.flags.get("flashnorm_version")
        lines = [f"FlashNorm checkpoint: {self.mode} mode, flashnorm_version "
                 f"{version if version is not None else '(not in config.json)'} ({self.how})",
                 f"model_type {self.model_type} (family {self.family}), norm multiplies by "
                 f"{'1 + w' if self.offset else 'w'}, identity weight {ident}"]
        if self.flags.get("flashnorm_mode") not in (None, self.mode):
            lines.append(f"  NOTE  config.json says flashnorm_mode {self.flags['flashnorm_mode']!r}, the tensors "
                         f"say {self.mode!r}")
        what = {"identity": "IDENTITY", "absent": "ABSENT", "present": "PRESENT", "learned": "LEARNED"}
        for g in self.groups():
            extra = f" ({g['dtype']}{', with bias' if g['bias'] else ''})" if g["dtype"] else ""
            lines.append(f"  {what[g['status']]:8}  {g['norm']}  x{g['count']}{extra}")
        if each:
            lines += [f"  {what[n.status]:8}  {n.weight}" for n in self.norms]
        if not self.values_read:
            lines.append("  (norm values not read: remote headers only)")
        lines.append("nothing to fold: converting it again writes nothing unless --mode changes the mode")
        return "\n".join(lines)


# Families whose foldable norms are LayerNorms with a bias parameter (nn.LayerNorm's default in their
# transformers modeling files). A strict checkpoint dropped the bias with the weight; compat restores both.
NORM_BIAS_FAMILIES = frozenset({"gpt_neox", "phi", "starcoder2", "stablelm", "nemotron"})


def foldable(cfg: dict, tensors: dict[str, TensorInfo], rules: dict | None = None):
    """(family name, family as laid out in this checkpoint, tied, [(rule, module name, consumers)]) for
    every norm the rules fold in this checkpoint, whether the norm tensor is present or not."""
    quant = classify(cfg, tensors)
    tensors = quant.view(tensors)  # consumers by their logical names (X.weight of X.weight_packed)
    resolved = resolve(cfg, tensors, rules)  # the layout that tiles: by norms, or by consumers (strict)
    family, laid = resolved.family, resolved.fam
    tied = is_tied(cfg, resolved.model_type, laid)
    names = sorted(tensors)
    found = [x for rule in laid["folds"] for x in _instances(rule, cfg, tensors, names, tied)]
    # A consumer reads one norm: an absent norm inferred from consumers that a present norm reads is not
    # a norm of this model (e.g. StableLM's parallel block has no post_attention_layernorm).
    owned = {c.weight for _, name, cs in found if name + ".weight" in tensors for c in cs}
    found = [x for x in found if x[1] + ".weight" in tensors or not any(c.weight in owned for c in x[2])]
    # A norm with a quantized consumer is never folded (partial fold keeps it): not a foldable norm here.
    found = [x for x in found if not any(quant.consumer(c.weight) for c in x[2])]
    return family, laid, tied, found


def _instances(rule: dict, cfg: dict, tensors: dict, names: list[str], tied: bool) -> list:
    if not all(config_get(cfg, k) in v for k, v in rule.get("when", {}).items()):
        return []
    keys = set(_PLACEHOLDER.findall(rule["norm"]))
    variants = rule.get("variants", [rule.get("into")])
    seen: dict[str, dict] = {}

    def note(groups: dict) -> None:
        g = {k: v for k, v in groups.items() if k in keys}
        name = rule["norm"]
        for k, v in g.items():
            name = name.replace("{" + k + "}", v)
        seen.setdefault(name, g)
    rx = pattern_regex(rule["norm"] + ".weight")
    for t in names:
        m = rx.match(t)
        if m:
            note(m.groupdict())
    for v in variants:  # norms known by their consumers (absent norms: strict checkpoints)
        c = v[0]
        cx = pattern_regex(c + ".weight" if isinstance(c, str) else c["weight"])
        for t in names:
            m = cx.match(t)
            if m:
                note(m.groupdict())
    if rule.get("untied_head") and tied:
        return []
    out = []
    for name in sorted(seen, key=natural_key):
        for v in variants:
            got = [expand_consumer(c, seen[name], tensors, names) for c in v]
            if all(got):
                out.append((rule["norm"], name, [c for g in got for c in g]))
                break
    return out


def detect(cfg: dict, tensors: dict[str, TensorInfo], read: Callable[[str], np.ndarray] | None,
           rules: dict | None = None) -> FlashNormState:
    """The FlashNorm state of a checkpoint. ``read(name)`` returns a small tensor's values (norm
    vectors only); ``read=None`` decides from headers and flags alone (status ``present``)."""
    family, fam, tied, found = foldable(cfg, tensors, rules)
    covered = [pattern_regex(r["norm"] + sfx) for r in fam["folds"] + fam.get("keep", []) if "norm" in r
               for sfx in (".weight", ".bias")]
    subtrees = tuple(k["under"] for k in fam.get("keep", []) if "under" in k)  # towers kept whole
    stray = [t for t in names_sorted(tensors) if looks_like_norm(t) and not t.startswith(subtrees)
             and not any(rx.match(t) for rx in covered)]
    offset = fam.get("offset", 0)
    own = {r["norm"]: r["offset"] for r in fam["folds"] if r.get("offset", offset) != offset}  # per-rule `1 + w`
    biased = {r["norm"] for r in fam["folds"] if r.get("norm_bias")}
    flags = {k: cfg[k] for k in FLAG_KEYS if k in cfg}
    norms = []
    for rule, name, consumers in found:
        c0 = consumers[0]
        width = tensors[c0.weight].shape[c0.axis] // c0.tile if tensors[c0.weight].shape else 0
        w, b = tensors.get(name + ".weight"), tensors.get(name + ".bias")
        if b is not None and read is not None and any(c.bias is None for c in consumers) \
                and np.any(read(b.name).astype(np.float32) != 0):
            continue  # a LayerNorm bias a consumer cannot absorb: the planner keeps it, so it is not foldable
        if w is None:
            status = "absent" if b is None else "learned"
        elif w.shape != (width,):
            status = "learned"  # not a norm of these consumers: the planner reports it
        elif read is None:
            status = "present"
        else:
            ok = bool(np.all(read(w.name).astype(np.float32) + np.float32(own.get(rule, offset)) == 1))
            if ok and b is not None:
                ok = b.shape == (width,) and not np.any(read(b.name).astype(np.float32) != 0)
            status = "identity" if ok else "learned"
        norms.append(NormState(rule, name, status, width, w.dtype if w is not None else None, b is not None,
                               consumers, own.get(rule), rule in biased))
    return FlashNormState(cfg.get("model_type"), family, offset, tied, flags, norms, values_read=read is not None,
                          stray=stray)


def names_sorted(tensors: dict) -> list[str]:
    return sorted(tensors, key=natural_key)
