"""Vision towers (``--fold-vision``): their rules derived apart from the language model's, and checked.

``derive_model(..., vision=True)`` analyses every norm, the towers' included (``Instance.tower``),
tracing a prompt with an image (``pixels.image_inputs``) so the tower runs. The language model's
rules are assembled from the other instances exactly as without ``vision`` (the family's ``folds``
and ``keep`` do not change); the tower's instances are assembled on their own into ``vision_folds``
and ``vision_keep`` (a fold rule whose convention differs from the family's carries its own
``offset``: SigLIP's LayerNorms multiply by ``w`` inside PaliGemma, whose Gemma norms use ``1 + w``).

The check converts the tiny model with :func:`streamfold.rules.vision.with_vision` of the family
(compat and strict, float32 merged tensors), loads it in stock transformers and compares text and
image-prompt logits (``check.check_family``: within ``check.MAX_REL``), and the plan must fold exactly
the traced folding norms, the tower's included. A tower that fails gets ``vision_refused`` with the
measured reason instead of rules that are not exact. Development time; torch.
"""
from __future__ import annotations

from dataclasses import replace

from .build import assemble
from .check import check_family
from .family import Derived, norm_pattern
from ..core.errors import StreamfoldError
from ..rules.vision import with_vision


def text_part(d: Derived) -> Derived:
    """``d`` without the tower's analysed instances (what the language model's rules are built from)."""
    return replace(d, instances=[i for i in d.instances if not getattr(i, "tower", False)])


def tower_part(d: Derived) -> Derived:
    """Only the tower's analysed instances (no ``outside`` prefixes: they are the family's ``keep``)."""
    return replace(d, instances=[i for i in d.instances if getattr(i, "tower", False)], outside=[], prefixes={})


def add_vision(fam: dict, towers: list[tuple[dict, Derived]], base_values: dict) -> None:
    """Set ``fam``'s ``vision_folds`` / ``vision_keep`` from the tower instances of every config variant."""
    if not any(d.instances for _, d in towers):
        return
    vf = assemble(fam["model_types"], towers, base_values)
    biased = {norm_pattern(i.weight)[0] for _, d in towers for i in d.instances if i.has_bias}
    folds = []
    for r in vf["folds"]:
        off = r.pop("offset", vf["offset"])
        if off != fam.get("offset", 0):
            r["offset"] = off
        if r["norm"] in biased:  # a LayerNorm's bias: restored as zeros by a strict -> compat change
            r["norm_bias"] = True
        folds.append(r)
    if folds:
        fam["vision_folds"] = folds
    if vf.get("keep"):
        fam["vision_keep"] = vf["keep"]


def plan_vision(fam: dict, models: list, full: list[tuple[dict, Derived]]) -> None:
    """Without the numerical check (``--rules-only``): the tower's rules must still plan each tiny model, as
    :func:`check_vision` requires, so a drift check agrees with a checked derivation."""
    import json
    import tempfile
    from pathlib import Path

    from . import tiny
    from .check import _applicable
    from ..run.conversion import load_plan
    merged = with_vision({k: v for k, v in fam.items() if k != "vision_refused"}, mark=False)
    for model, (_, d) in zip(models, full):
        with tempfile.TemporaryDirectory(prefix="sf_vplan_") as td:
            src = tiny.save_sharded(model, Path(td) / "src", dtype="bfloat16")
            rules = Path(td) / "rules.json"
            rules.write_text(json.dumps({"families": {"derived": {**_applicable(merged, d.saved),
                                                                  "model_types": [model.config.model_type]}}}))
            try:
                load_plan(src, rules=rules)
            except StreamfoldError as e:
                _refuse_unplanned(fam, e)
                return


def _refuse_unplanned(fam: dict, e: Exception) -> None:
    fam.pop("vision_folds", None), fam.pop("vision_keep", None)
    fam["vision_refused"] = f"the tower's derived rules do not plan ({str(e).splitlines()[0]})"


def check_vision(fam: dict, models: list, full: list[tuple[dict, Derived]], results: list) -> None:
    """Convert with the tower folded and compare logits (text and image prompts) for every variant; the
    errors go into ``results[i].vision_rel`` / ``vision_strict_rel``, a failure into ``vision_refused``."""
    merged = with_vision({k: v for k, v in fam.items() if k != "vision_refused"}, mark=False)
    errors = []
    for model, (_, d), res in zip(models, full, results):
        try:
            r = check_family(model, merged, d)
        except StreamfoldError as e:  # the tower's rules do not even plan (ERNIE 4.5 VL's resampler: a
            # Sequential's indices read as layers): no tower rules, the reason instead
            _refuse_unplanned(fam, e)
            return
        res.vision_rel = r.compat_rel
        if r.strict_rel is not None and not fam.get("strict_refused"):
            if r.strict_refused:
                errors.append(f"strict: {r.strict_refused}")
            res.vision_strict_rel = r.strict_rel
        errors += r.errors
    if errors:
        fam["vision_refused"] = f"measured with the tower folded: {errors[0]}"
