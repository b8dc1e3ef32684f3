"""Which tensor-name layout a checkpoint uses: the family's rules spelled as its tensors are named.

transformers loads one architecture from several spellings of its tensor names, and a family's data
records the ones its loader accepts (derived by ``streamfold.derive.layouts``, checked by loading them):

- ``layouts``: prefix maps (pattern prefix -> checkpoint prefix; the longest matching prefix wins).
  ``{}`` is the rules' own spelling; ``{"model.": ""}`` a checkpoint saved as the bare base model
  (``layers.0...`` for ``model.layers.0...``); ``{"model.": "model.language_model."}`` a text model
  stored under a multimodal wrapper's prefix; legacy wrapper prefixes (``language_model.model.``).
- ``forms``: other complete rule sets for names the loader converts (``{"name": ..., "folds": [...],
  "keep": [...]}``): transformers' in-memory names, e.g. fused ``mlp.experts.gate_up_proj`` instead of
  per-expert ``block_sparse_moe.experts.N.w1``. Every layout applies to every form.

:func:`choose` spells the family under each (form, layout) and picks the one that tiles the checkpoint:
the most fold norms found, each with a complete consumer set; a strict checkpoint (norms removed) is
recognized by its consumers. Pure Python on tensor names.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass

from .patterns import expand_consumer, pattern_regex


@dataclass
class Laid:
    """A family spelled as one checkpoint names its tensors, and how (``None``: the rules' own names)."""

    fam: dict
    layout: dict
    form: str | None = None

    def describe(self) -> str | None:
        """One line for ``inspect`` and the card, or None for the rules' own spelling."""
        parts = []
        if self.form:
            parts.append(self.form)
        if self.layout:
            parts.append(", ".join(f"{k}* as {v or '(no prefix)'}{'*' if v else ''}"
                                   for k, v in sorted(self.layout.items())))
        return "; ".join(parts) or None


def spell(p: str, lay: dict) -> str:
    """``p`` with its longest prefix found in ``lay`` replaced by the checkpoint's spelling. A prefix
    ``X.`` also spells the module ``X`` itself (a head pattern ``embed_out`` under ``{"embed_out.":
    "lm_head."}`` is ``lm_head``)."""
    key = max((k for k in lay if p.startswith(k) or (k.endswith(".") and p == k[:-1])), key=len, default=None)
    if key is None:
        return p
    if p == key[:-1]:
        return lay[key][:-1] if lay[key].endswith(".") else lay[key]
    return lay[key] + p[len(key):]


def _consumer(c, lay: dict):
    if isinstance(c, str):
        return spell(c, lay)
    return {**c, "weight": spell(c["weight"], lay), **({"bias": spell(c["bias"], lay)} if c.get("bias") else {})}


def relay(fam: dict, lay: dict, form: dict | None = None) -> dict:
    """``fam`` (or its ``form``) with every pattern spelled under the prefix map ``lay``."""
    folds = form["folds"] if form else fam["folds"]
    keep = form.get("keep", fam.get("keep", [])) if form else fam.get("keep", [])
    out = []
    for f in folds:
        g = {**f, "norm": spell(f["norm"], lay)}
        if "into" in f:
            g["into"] = [_consumer(c, lay) for c in f["into"]]
        if "variants" in f:
            g["variants"] = [[_consumer(c, lay) for c in v] for v in f["variants"]]
        out.append(g)
    return {**fam, "folds": out,
            "keep": [{**k, **{key: spell(k[key], lay) for key in ("norm", "under") if key in k}} for k in keep]}


def candidates(fam: dict) -> list[tuple[dict | None, dict]]:
    """(form or None, prefix map) pairs in preference order: the rules' form first, layouts in order."""
    layouts = fam.get("layouts") or [{}]
    if {} not in layouts:
        layouts = [{}] + list(layouts)
    return [(form, lay) for form in [None] + list(fam.get("forms", [])) for lay in layouts]


def _literal(pattern: str) -> str:
    return pattern.split("{", 1)[0]


def _matches(pattern: str, names: list[str]) -> list:
    """Regex matches of ``pattern`` among sorted ``names`` (scanning only its literal prefix's range)."""
    rx, pre = pattern_regex(pattern), _literal(pattern)
    out = []
    for t in names[bisect.bisect_left(names, pre):]:
        if not t.startswith(pre):
            break
        m = rx.match(t)
        if m:
            out.append(m)
    return out


def score(laid: dict, tensors: dict, names: list[str]) -> tuple[int, int, int]:
    """(norms found whose consumers are complete, norms found without, consumer tensors found)."""
    good = bad = cons = 0
    for rule in laid["folds"]:
        variants = rule.get("variants", [rule.get("into")])
        for m in _matches(rule["norm"] + ".weight", names):
            groups = m.groupdict()
            if rule.get("untied_head") or any(all(expand_consumer(c, groups, tensors, names) for c in v)
                                              for v in variants):
                good += 1
            else:
                bad += 1
        first = variants[0][0]
        cons += len(_matches(first + ".weight" if isinstance(first, str) else first["weight"], names))
    return good, bad, cons


def choose(fam: dict, tensors: dict) -> Laid:
    """The family as this checkpoint spells it: among :func:`candidates`, the one whose fold norms are
    found with complete consumers (most norms wins; then fewest incomplete; then most consumers, for
    strict checkpoints whose norms were removed); the first candidate wins ties."""
    names = sorted(tensors)
    best, best_key = None, None
    for i, (form, lay) in enumerate(candidates(fam)):
        laid = relay(fam, lay, form) if (form or lay) else fam
        good, bad, cons = score(laid, tensors, names)
        key = (bad == 0 and good > 0, good, -bad, cons, -i)
        if best_key is None or key > best_key:
            best, best_key = Laid(laid, lay, form["name"] if form else None), key
    return best
