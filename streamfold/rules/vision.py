"""``--fold-vision``: a family's vision-tower rules joined to its language-model rules.

A multimodal family's data keeps the tower's rules apart from the language model's (schema keys
``vision_folds``, same form as ``folds``, and ``vision_keep``, same form as ``keep``; both derived by
``tools/derive_rules.py`` from transformers' computation on a prompt with an image and checked on its
logits). Without ``--fold-vision`` they are ignored and the tower is kept whole by its ``keep
{under}`` rule. With it, :func:`with_vision` is the family the planner uses: the tower's fold rules
after the language model's, its keep rules before the ``under`` rule (which then keeps only norms no
tower rule names). ``vision_refused`` records why a tower cannot be folded (measured), and a family
with neither is refused with ``--fold-vision``. Pure data; no I/O.
"""
from __future__ import annotations

from ..core.errors import StreamfoldError


def has_vision(fam: dict) -> bool:
    """Whether the family has tower rules ``--fold-vision`` can apply."""
    return bool(fam.get("vision_folds")) and not fam.get("vision_refused")


def refuse_vision(model_type: str, family: str, fam: dict) -> None:
    """One-line refusal of ``--fold-vision`` for a family without (usable) tower rules."""
    if fam.get("vision_refused"):
        raise StreamfoldError(f"--fold-vision: the vision tower of {model_type} (family {family!r}) cannot be "
                              f"folded: {fam['vision_refused']}")
    if not fam.get("vision_folds"):
        raise StreamfoldError(f"--fold-vision: family {family!r} (model_type {model_type}) has no vision-tower "
                              "rules (no tower, or none derived); convert without --fold-vision")


def with_vision(fam: dict, mark: bool = True) -> dict:
    """``fam`` with its tower rules applied (every form too); unchanged when it has none. ``mark``: each
    tower rule carries ``"tower": true`` (the plan's ``NormPlan.tower``; not a schema key, so a family
    written out as a rules file is made with ``mark=False``)."""
    vf, vk = fam.get("vision_folds", []), fam.get("vision_keep", [])
    if not vf and not vk:
        return fam
    if mark:
        vf, vk = [{**f, "tower": True} for f in vf], [{**k, "tower": True} for k in vk]
    out = {**fam, "folds": list(fam.get("folds", [])) + list(vf), "keep": list(vk) + list(fam.get("keep", []))}
    if fam.get("forms"):
        out["forms"] = [{**f, "folds": list(f["folds"]) + list(vf),
                         **({"keep": list(vk) + list(f["keep"])} if "keep" in f else {})} for f in fam["forms"]]
    return out


def tower_norms(fam: dict) -> list[str]:
    """The norm patterns of the tower's fold rules (what the card and ``--json`` list)."""
    return [f["norm"] for f in fam.get("vision_folds", [])]
