"""Check a derived family numerically before it is written (development time; torch + transformers).

The tiny model is saved sharded (bf16, norms in a shard of their own), converted by streamfold itself
with the family as a rules file (compat and strict, float32 merged tensors), loaded in stock
transformers and its float32 logits compared with the source's: max relative error must be <= 1e-5,
on a text prompt and, for multimodal wrappers (``pixels.PIXELS``), on a prompt with an image.
The plan must fold exactly the derived norms into exactly the derived consumers. Strict mode is tried
for real: when transformers does not load a removed norm as the identity (it fills a missing weight
with ones, wrong for ``1 + w`` norms) the family gets ``strict_refused`` with the measured reason.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path


MAX_REL = 1e-5
_SOME = "folds in some layers or configs but not in others"  # build.assemble's reason for keeping a norm whole


@dataclass
class CheckResult:
    model_type: str
    compat_rel: float | None = None
    strict_rel: float | None = None
    strict_refused: str | None = None
    errors: list[str] = field(default_factory=list)
    layouts_rel: dict[str, float] = field(default_factory=dict)  # other name layouts (derive.layouts)
    vision_rel: float | None = None  # with the tower folded too (derive.vision): text and image prompts
    vision_strict_rel: float | None = None

    @property
    def ok(self) -> bool:
        return not self.errors


def _rel(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def _load(path, model_type: str):
    from .tiny import load_pretrained  # stand-in towers, eager attention, quiet
    return load_pretrained(path, model_type)


def _logits(model, inputs):
    from .tiny import forward_logits  # through the text path (tiny.text_forward_module)
    return forward_logits(model, inputs)


def _applicable(fam: dict, names: list[str]) -> dict:
    """The family without the fold rules that match no norm of this checkpoint (another config
    variant's norms): a rules file must match every rule, a built-in family need not."""
    from ..rules.layout import choose, relay
    from ..rules.patterns import pattern_regex
    laid = relay(fam, choose(fam, dict.fromkeys(names)).layout)
    keep = [f for f, lf in zip(fam["folds"], laid["folds"])
            if any(pattern_regex(lf["norm"] + ".weight").match(t) for t in names)]
    return {**fam, "folds": keep}


def check_family(model, fam: dict, derived, root: Path | None = None) -> CheckResult:
    """Convert ``model`` (tiny, float32) with ``fam`` and compare logits in transformers."""
    from ..convert import convert
    from ..run.conversion import load_plan
    fam = _applicable(fam, derived.saved)
    from . import pixels, tiny
    mt = model.config.model_type
    res = CheckResult(mt)
    inputs = tiny.example_inputs(model)
    with tempfile.TemporaryDirectory(prefix="sf_check_", dir=root) as td:
        td = Path(td)
        src = tiny.save_sharded(model, td / "src", dtype="bfloat16")
        ref_model, _ = _load(src, mt)
        ref = _logits(ref_model.eval(), inputs)
        images = pixels.image_inputs(ref_model)  # a prompt with an image, for wrappers (else None)
        ref_images = _logits(ref_model, images) if images is not None else None
        del ref_model
        rules = td / "rules.json"
        rules.write_text(json.dumps({"families": {"derived": {**fam, "model_types": [mt]}}}))
        _, _, plan = load_plan(src, rules=rules)
        _compare_plan(plan, derived, res, frozenset(n.weight for n in plan.kept if n.reason.startswith(_SOME)))
        if plan.unknown_norms:
            res.errors.append(f"norms no rule covers: {plan.unknown_norms[:3]}")
        convert(src, td / "compat", merged_dtype="float32", rules=rules)
        m, info = _load(td / "compat", mt)
        res.compat_rel = _rel(_logits(m.eval(), inputs), ref)
        if images is not None:
            res.compat_rel = max(res.compat_rel, _rel(_logits(m, images), ref_images))
        del m
        if res.compat_rel > MAX_REL:
            res.errors.append(f"compat float32-merged logits max rel err {res.compat_rel:.2e} > {MAX_REL}")
        if info.get("missing_keys") or info.get("unexpected_keys"):
            res.errors.append(f"compat loads with missing {info.get('missing_keys')} / unexpected "
                              f"{info.get('unexpected_keys')}")
        if plan.folded:
            res.strict_rel, res.strict_refused = _strict(model, fam, plan, rules, src, td, inputs, ref, images,
                                                         ref_images)
    return res


def _strict(model, fam, plan, rules, src, td, inputs, ref, images=None, ref_images=None):
    from ..convert import convert
    fam_strict = {k: v for k, v in fam.items() if k != "strict_refused"}
    rules_s = td / "rules_strict.json"
    rules_s.write_text(json.dumps({"families": {"derived": {**fam_strict, "model_types": [model.config.model_type]}}}))
    convert(src, td / "strict", mode="strict", merged_dtype="float32", rules=rules_s)
    m, _ = _load(td / "strict", model.config.model_type)
    rel = _rel(_logits(m.eval(), inputs), ref)
    if images is not None:
        rel = max(rel, _rel(_logits(m, images), ref_images))
    if rel <= MAX_REL:
        return rel, None
    params = dict(m.named_parameters())
    n = plan.folded[0]
    mem = next((k for k in params if k.endswith(n.weight.split(".", 1)[-1])), None)
    filled = float(params[mem].reshape(-1)[0]) if mem else float("nan")
    offset = n.offset if n.offset is not None else fam.get("offset", 0)
    conv = "1 + w" if offset else "w"
    return rel, (f"transformers fills a missing norm weight with {filled:g}, but this norm multiplies by {conv}, "
                 f"so a removed norm would load as a scale of {filled + offset:g}, not 1 (measured: strict "
                 f"logits max rel err {rel:.1e})")


def _compare_plan(plan, derived, res: CheckResult, kept_whole: frozenset = frozenset()) -> None:
    """The plan folds exactly the derived folding instances, into exactly their consumers; ``kept_whole``:
    norms a keep rule claims because they fold in some layers only (the same name is a post-norm in
    others, as OLMo-hybrid's feedforward_layer_norm)."""
    # a LayerNorm bias with a consumer lacking a bias keeps the norm (the plan says why): not folded here
    want = {i.weight: i for i in derived.instances
            if i.fold and not (i.has_bias and any(b is None for *_, b in i.consumers))
            and i.weight not in kept_whole}
    got = {n.weight: n for n in plan.folded}
    if set(want) != set(got):
        res.errors.append(f"plan folds {sorted(set(got) - set(want))[:3]} extra, misses "
                          f"{sorted(set(want) - set(got))[:3]}")
        return
    from .build import _in_layer
    from .family import norm_pattern
    feeds: dict[str, set] = {}  # what a norm feeds over all its layers (a shared block: every use's adapter)
    for i in derived.instances:
        feeds.setdefault(_in_layer(i.weight, i.weight), set()).update(
            (_in_layer(i.weight, cw), ax, nd) for cw, ax, nd, _ in i.consumers)
    saved = set(derived.saved)
    for w, inst in want.items():
        n = norm_pattern(w)[2]
        cons = {(cw.replace("{n}", n) if n is not None else cw, ax, nd) for cw, ax, nd in feeds[_in_layer(w, w)]}
        cons = {c for c in cons if c[0] in saved}
        nd_of = {cw: nd for cw, _, nd in cons}
        pc = sorted((c.weight, c.axis % nd_of.get(c.weight, 1)) for c in got[w].consumers)
        dc = sorted((cw, ax) for cw, ax, _ in cons)
        if pc != dc:
            res.errors.append(f"{w}: plan consumers {pc[:3]} != derived {dc[:3]}")
