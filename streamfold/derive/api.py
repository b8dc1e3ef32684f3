"""Derive one family end to end: tiny models -> traced facts -> rules -> numerical check.

``derive_family(model_type)`` is what ``tools/derive_rules.py`` and ``python -m streamfold
derive-rules`` call. Imports torch and transformers (the ``derive`` extra).
"""
from __future__ import annotations

import json
from pathlib import Path

from .build import assemble
from .check import CheckResult, check_family
from .family import derive_model
from .layouts import derive_layouts
from .vision import add_vision, check_vision, plan_vision, text_part, tower_part


def _text(cfg):
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _value(cfg, key: str):
    """A config key's value as the planner reads it: the text config's field, else the wrapper's; a dotted
    key (``text_config.model_type``) names a sub-config's field."""
    head, dot, rest = key.partition(".")
    if dot:
        return getattr(getattr(cfg, head, None), rest, None)
    return getattr(_text(cfg), key, getattr(cfg, key, None))


def _class_default(model_type: str, key: str):
    """``key``'s default in ``model_type``'s config class (a sub-config the wrapper's default leaves None:
    that sub-config class's own default)."""
    from transformers.models.auto import configuration_auto
    cls = configuration_auto.CONFIG_MAPPING[model_type]
    got = _value(cls(), key)
    head, dot, rest = key.partition(".")
    if got is None and dot and head in (getattr(cls, "sub_configs", None) or {}):
        got = getattr(cls.sub_configs[head](), rest, None)
    return got


def trace_inputs(model) -> dict:
    """What the tracer runs: a prompt with an image for wrappers with pixel inputs (``pixels.PIXELS``: the
    language model sees image features, and Mllama's cross-attention layers run only then), else text."""
    from . import pixels, tiny
    return pixels.image_inputs(model) or tiny.example_inputs(model)


def tie_default(model_type: str) -> bool:
    """Whether a config of ``model_type`` that omits ``tie_word_embeddings`` ties them."""
    from transformers.models.auto import configuration_auto
    cfg = configuration_auto.CONFIG_MAPPING[model_type]()
    for c in (cfg, _text(cfg)):
        v = getattr(c, "tie_word_embeddings", None)
        if v is not None:
            return bool(v)
    return False


def derive_family(model_type: str, variants: list[dict] | None = None, *, config=None,
                  check: bool = True, text_models: list[str] | None = None,
                  vision: bool = False) -> tuple[dict, list[CheckResult]]:
    """The family of ``model_type`` derived under each config variant (overrides; ``{}`` first) and,
    with ``check``, the numerical check of every variant. ``config``: a (shrunk) config to use as the
    base instead of ``tiny_config(model_type)``. The family's ``model_types`` is ``[model_type]``.

    ``text_models``: for a multimodal wrapper, the language model types (``text_config.model_type``)
    to derive it with besides its default one; each is one more config variant, and the family gets
    ``text_model_types`` (every type derived and checked: the planner refuses any other).

    ``vision``: the towers' norms are derived too (``vision_folds``/``vision_keep``, :mod:`.vision`) and,
    with ``check``, checked on the image prompt's logits (``CheckResult.vision_*``)."""
    from . import tiny
    variants = [{}] + [v for v in (variants or []) if v]
    default_text = _class_default(model_type, "text_config.model_type") if text_models is not None else None
    variants += [{"text_config.model_type": t} for t in text_models or [] if t != default_text]
    derived, models = [], []
    failed = None  # why the tower's rules could not be derived (vision_refused)
    for ov in variants:
        if config is not None:
            cfg = config.__class__.from_dict({**config.to_dict(), **ov, "tie_word_embeddings": False})
        else:
            cfg = tiny.tiny_config(model_type, **{"tie_word_embeddings": False, **ov})
        model = tiny.build_tiny_model(config=cfg)
        try:
            derived.append((ov, derive_model(model, trace_inputs(model), vision=vision)))
        except Exception as e:  # the tower's analysis failed: its rules are refused, the language model's stand
            if not vision:
                raise
            vision, failed = False, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            derived = [(o, text_part(d)) for o, d in derived] + [(ov, derive_model(model, trace_inputs(model)))]
        models.append(model)
    full = derived
    derived = [(ov, text_part(d)) for ov, d in full]
    keys = {k for ov in variants for k in ov}
    base_values = {k: _value(models[0].config, k) for k in keys}
    fam = assemble([model_type], derived, base_values)
    if not fam.get("folds"):  # refused with this reason (exit 5); nothing to convert or check numerically
        fam["folds"] = []
        fam["nothing_to_fold"] = nothing_to_fold_reason(fam, models[0])
        return fam, []
    whens = {k for f in fam["folds"] for k in f.get("when", {})}
    if text_models is not None:
        fam["text_model_types"] = [default_text] + [t for t in text_models if t != default_text]
        whens.add("text_config.model_type")
    if whens:
        fam["defaults"] = {k: _class_default(model_type, k) for k in sorted(whens)}
    if tie_default(model_type):
        fam["tie_default"] = True
    if vision:
        add_vision(fam, [(ov, tower_part(d)) for ov, d in full], base_values)
        vwhens = {k for f in fam.get("vision_folds", []) for k in f.get("when", {})} - set(fam.get("defaults", {}))
        if vwhens:  # a tower rule's condition (Gemma 4: unclipped linears): the class default of its key
            fam["defaults"] = {**fam.get("defaults", {}), **{k: _class_default(model_type, k) for k in sorted(vwhens)}}
    elif failed:
        fam["vision_refused"] = f"the tower's rules could not be derived from a tiny model ({failed})"
    results = []
    if check:
        for model, (ov, d) in zip(models, derived):
            r = check_family(model, fam, d)
            results.append(r)
            if r.strict_refused and "strict_refused" not in fam:
                fam["strict_refused"] = r.strict_refused
        if vision and fam.get("vision_folds"):
            check_vision(fam, models, full, results)
    elif vision and fam.get("vision_folds"):
        plan_vision(fam, models, full)
    pairs = [(ov, m) for (ov, _), m in zip(derived, models)]
    # layouts are proven on the variant where most norms fold (LayerNorm biases fold only with biased linears)
    def folding(d) -> int:  # a LayerNorm bias folds only when every consumer has a bias
        return sum(x.fold and not (x.has_bias and any(b is None for *_, b in x.consumers)) for x in d.instances)
    best = max(range(len(models)), key=lambda i: (folding(derived[i][1]), -i))
    add_layouts(fam, derive_layouts(models[best], fam, check=check, variants=pairs, base_values=base_values), results)
    _drop_absent_unders(fam, {n for _, d in derived for n in d.saved})
    return fam, results


def _drop_absent_unders(fam: dict, saved: set[str]) -> None:
    """Keep-by-prefix rules whose prefix no saved tensor has are dropped: the trace names the towers it
    leaves out in the model's own names, which a lossy conversion mapping (Kimi K2.5's
    ``vision_tower.patch_embed`` -> ``model.vision_tower.*``) does not always spell back to the checkpoint's."""
    keep = [k for k in fam.get("keep", []) if "under" not in k or any(n.startswith(k["under"]) for n in saved)]
    if keep:
        fam["keep"] = keep
    else:
        fam.pop("keep", None)


def nothing_to_fold_reason(fam: dict, model) -> str:
    """Why no norm of a family whose trace folds nothing can fold, from the trace: the norms found (by
    structure, convention measured) and each kept norm's traced reason."""
    found = getattr(model, "tiny_norms", {})
    if not found:
        return ("every norm is weightless: the tiny model's trace finds no norm with a weight or bias, so there "
                "is no scale to multiply into a linear")
    whys = "; ".join(dict.fromkeys(f"{k.get('norm') or k.get('under')}: {k['why']}" for k in fam.get("keep", [])))
    return f"every norm is kept ({len(found)} weighted norm modules traced): {whys}"


def add_layouts(fam: dict, got, results: list[CheckResult]) -> None:
    """Store the proven layouts and forms (``derive.layouts``) in ``fam``; their errors in ``results[0]``."""
    stored = [lay for lay in fam.get("layouts", []) if lay and lay not in got.dropped] + got.layouts
    if stored:
        fam["layouts"] = [{}] + stored
    else:
        fam.pop("layouts", None)
    if got.forms:
        fam["forms"] = got.forms
    if results:
        results[0].layouts_rel = dict(got.rel)


def local_config(model_dir: str | Path):
    """A local model's config shrunk to tiny sizes: the tiny config of its model type with every
    boolean and null setting of the local config copied (structural switches such as
    ``use_qk_norm``, ``attention_bias``, ``q_lora_rank: null``, ``tie_word_embeddings``)."""
    from . import tiny
    raw = json.loads((Path(model_dir) / "config.json").read_text())
    mt = raw.get("model_type")
    flags = {k: v for k, v in raw.items() if (isinstance(v, bool) or v is None) and not k.startswith("_")
             and k not in ("torch_dtype", "dtype", "use_cache", "return_dict")}
    return mt, tiny.tiny_config(mt, **flags)
