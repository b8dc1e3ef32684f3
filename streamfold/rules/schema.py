"""Load and validate architecture rules: the built-in families and user ``--rules`` files.

One schema for both (built-ins are ``streamfold/rules/families/*.toml``, one family per file):

- ``model_types``: config ``model_type`` values it covers.
- ``offset``: the norm multiplies by ``offset + w`` (0 for ``w``; 1 for Gemma-style ``1 + w``).
  The fold scales by ``offset + w`` and the identity weight is ``1 - offset``. A fold rule may carry
  its own ``offset`` (a family whose norms differ in convention).
- ``folds``: ``{"norm": pattern, "into": [consumer, ...]}``. A consumer is a module pattern whose
  ``.weight`` input columns (last axis) are scaled and whose ``.bias`` (if present) absorbs a
  LayerNorm bias, or ``{"weight": tensor, "axis": k, "bias": tensor}`` for fused or transposed
  layouts; ``"tile": k`` when the consumer reads k norm outputs side by side (a patch merger regrouping
  k tokens into one vector: its input axis is k times the norm's width and the scale is tiled k times). ``"untied_head": true`` marks the final norm, which folds only into an untied head
  (kept when embeddings are tied or the head tensor is absent). ``"variants"`` (instead of
  ``into``) lists alternative consumer sets, the first one fully present is used (dense vs. MoE
  layers, hybrid layer kinds). ``"when": {config_key: [accepted values]}`` applies a rule only when
  the config (or its ``text_config``) matches; a missing key takes the family's ``defaults`` value
  (``null``, JSON only, accepts a missing key).
- ``keep``: ``{"norm": pattern, "why": reason}`` norms that must stay (post-norms, q/k norms, ...), or
  ``{"under": prefix, "why": reason}``: every norm whose name starts with ``prefix`` (vision towers).
- ``tie_default``: whether embeddings are tied when ``config.json`` does not say (``true``/``false``,
  or the list of this family's model types whose config class defaults to tied).
- ``layouts``: the tensor-name layouts transformers' loader accepts besides the rules' own
  spelling. Each maps a pattern prefix, as written in the rules, to the checkpoint's spelling (the
  longest matching prefix wins): ``{"model.": ""}`` is a checkpoint saved as the bare base model,
  ``{"model.": "model.language_model."}`` a language model under a wrapper's prefix, ``{}`` the
  rules' own names. The layout that tiles the checkpoint is used (:mod:`streamfold.rules.layout`).
- ``forms``: other complete spellings of the rules the loader converts, ``{"name": why, "folds":
  [...], "keep": [...]}`` (``keep`` defaults to the family's): e.g. transformers' in-memory names,
  fused ``mlp.experts.gate_up_proj`` for per-expert ``block_sparse_moe.experts.N.w1``. Every layout
  applies to every form.
- ``nothing_to_fold``: why no norm of the family can fold (``"every norm ..."``): its model types are
  refused with ``nothing to fold: <reason>`` (exit 5); ``folds`` may then be empty.
- ``refused``: why the model types are out of scope (encoders, encoder-decoders): refused with
  that reason (exit 2); ``folds`` may then be empty.
- ``text_model_types``: for a multimodal wrapper whose language model can be of several types, the
  ``text_config.model_type`` values the rules were derived and checked with; a checkpoint with any
  other language model is refused (its norms could mean something else: Gemma 2's
  ``post_attention_layernorm`` is a post-norm, Llama's feeds the MLP). A missing
  ``text_config.model_type`` takes the family's ``defaults`` value.
- ``strict_refused``: why strict mode (folded norms removed) would not load as the identity;
  strict conversions of the family are refused with that reason.
- ``vision_folds``, ``vision_keep``: the vision tower's rules (same form as ``folds``/``keep``),
  applied only with ``--fold-vision`` (:mod:`streamfold.rules.vision`); ``vision_refused``: why the
  tower cannot be folded (measured), so ``--fold-vision`` is refused with that reason. A fold rule's
  ``"norm_bias": true`` says the norm has a bias parameter (a LayerNorm's): strict mode drops it with
  the weight, and a strict -> compat change restores it as zeros.
- ``description``, ``derived``: for people (README table; the generator's record of the
  transformers version and measured logit errors); not used by the conversion.

Patterns: ``{n}`` is a layer index (shared between a norm and its consumers), ``{e}`` matches
every expert index present, ``{h}`` a head index (keep rules).
"""
from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

from .loader import FAMILIES
from .patterns import config_get
from ..core.errors import StreamfoldError

_FAMILY_KEYS = {"model_types", "offset", "folds", "keep", "tie_default", "description", "layouts",
                "strict_refused", "defaults", "derived", "forms", "nothing_to_fold", "refused", "text_model_types",
                "vision_folds", "vision_keep", "vision_refused"}
_FORM_KEYS = {"name", "folds", "keep"}
_FOLD_KEYS = {"norm", "into", "variants", "untied_head", "when", "offset", "norm_bias"}
_CONSUMER_KEYS = {"weight", "axis", "bias", "tile"}
_PLACEHOLDER = re.compile(r"\{([a-z]+)\}")


def _check_pattern(p: object, where: str) -> str:
    if not isinstance(p, str) or not p:
        raise StreamfoldError(f"{where}: expected a tensor name pattern string, got {p!r}")
    bad = set(_PLACEHOLDER.findall(p)) - {"n", "e", "h"}
    if bad:
        raise StreamfoldError(f"{where}: unknown placeholder {{{sorted(bad)[0]}}} in {p!r} "
                              "(use {n} for the layer index, {e} for the expert index, {h} for a head index)")
    return p


def _check_consumer(c: object, where: str) -> None:
    if isinstance(c, str):
        _check_pattern(c, where)
        return
    if not isinstance(c, dict) or "weight" not in c or set(c) - _CONSUMER_KEYS:
        raise StreamfoldError(f"{where}: a consumer is a module pattern or "
                              "{\"weight\": ..., \"axis\": ..., \"bias\": ...}, got {c!r}")
    _check_pattern(c["weight"], where)
    if "bias" in c and c["bias"] is not None:
        _check_pattern(c["bias"], where)
    if not isinstance(c.get("axis", -1), int):
        raise StreamfoldError(f"{where}: consumer axis must be an integer, got {c['axis']!r}")
    if not isinstance(c.get("tile", 1), int) or isinstance(c.get("tile", 1), bool) or c.get("tile", 1) < 1:
        raise StreamfoldError(f"{where}: consumer tile must be a whole number >= 1, got {c['tile']!r}")


def _check_folds(folds: object, where: str, empty_ok: bool) -> None:
    if folds is None and empty_ok:
        return
    if not isinstance(folds, list) or (not folds and not empty_ok):
        raise StreamfoldError(f"{where}: \"folds\" must be a non-empty list")
    for i, f in enumerate(folds):
        w = f"{where} fold #{i + 1}"
        if not isinstance(f, dict) or set(f) - _FOLD_KEYS or "norm" not in f:
            raise StreamfoldError(f"{w}: needs \"norm\" and \"into\" (or \"variants\"), got {f!r}")
        _check_pattern(f["norm"], w)
        if f.get("offset", 0) not in (0, 1):
            raise StreamfoldError(f"{w}: \"offset\" must be 0 (norm scales by w) or 1 (by 1 + w)")
        when = f.get("when", {})
        if not isinstance(when, dict) or not all(isinstance(v, list) for v in when.values()):
            raise StreamfoldError(f"{w}: \"when\" maps config keys to lists of accepted values")
        variants = f.get("variants", [f.get("into")])
        if ("into" in f) == ("variants" in f) or not isinstance(variants, list) or not variants:
            raise StreamfoldError(f"{w}: give exactly one of \"into\" or \"variants\"")
        for v in variants:
            if not isinstance(v, list) or not v:
                raise StreamfoldError(f"{w}: a consumer list must be a non-empty list")
            for c in v:
                _check_consumer(c, w)


def _check_keep(keep: object, where: str) -> None:
    if not isinstance(keep, list):
        raise StreamfoldError(f"{where}: \"keep\" must be a list")
    for i, k in enumerate(keep):
        if not isinstance(k, dict) or set(k) not in ({"norm", "why"}, {"under", "why"}):
            raise StreamfoldError(f"{where} keep #{i + 1}: needs exactly \"norm\" (or \"under\", a name prefix "
                                  "whose norms all stay) and \"why\"")
        _check_pattern(k.get("norm") or k["under"], f"{where} keep #{i + 1}")


def validate_family(name: str, fam: object, source: str) -> dict:
    """Check one family's schema; raises StreamfoldError naming ``source`` and the bad entry."""
    where = f"{source}: family {name!r}"
    if not isinstance(fam, dict):
        raise StreamfoldError(f"{where}: must be an object")
    unknown = set(fam) - _FAMILY_KEYS
    if unknown:
        raise StreamfoldError(f"{where}: unknown key {sorted(unknown)[0]!r} "
                              f"(allowed: {', '.join(sorted(_FAMILY_KEYS))})")
    mts = fam.get("model_types")
    if not isinstance(mts, list) or not mts or not all(isinstance(m, str) for m in mts):
        raise StreamfoldError(f"{where}: \"model_types\" must be a non-empty list of strings")
    if fam.get("offset", 0) not in (0, 1):
        raise StreamfoldError(f"{where}: \"offset\" must be 0 (norm scales by w) or 1 (by 1 + w)")
    if not isinstance(fam.get("derived", {}), dict):
        raise StreamfoldError(f"{where}: \"derived\" is the generator's record (a table)")
    if not isinstance(fam.get("defaults", {}), dict):
        raise StreamfoldError(f"{where}: \"defaults\" maps config keys to the value a missing key means")
    tie = fam.get("tie_default", False)
    if not isinstance(tie, bool) and not (isinstance(tie, list) and all(isinstance(m, str) for m in tie)):
        raise StreamfoldError(f"{where}: \"tie_default\" must be true, false or a list of model types")
    layouts = fam.get("layouts", [])
    if not isinstance(layouts, list) or not all(
            isinstance(lay, dict) and all(isinstance(k, str) and k and isinstance(v, str) for k, v in lay.items())
            for lay in layouts):
        raise StreamfoldError(f"{where}: \"layouts\" must be a list of {{pattern prefix: checkpoint prefix}} objects")
    if "strict_refused" in fam and (not isinstance(fam["strict_refused"], str) or not fam["strict_refused"]):
        raise StreamfoldError(f"{where}: \"strict_refused\" must be a reason string")
    for key in ("nothing_to_fold", "refused"):
        if key in fam and (not isinstance(fam[key], str) or not fam[key]):
            raise StreamfoldError(f"{where}: \"{key}\" must be a reason string")
    _check_folds(fam.get("folds"), where, empty_ok="nothing_to_fold" in fam or "refused" in fam)
    _check_keep(fam.get("keep", []), where)
    if fam.get("vision_folds"):
        _check_folds(fam["vision_folds"], f"{where} vision_folds", empty_ok=False)
    _check_keep(fam.get("vision_keep", []), f"{where} vision_keep")
    if "vision_refused" in fam and (not isinstance(fam["vision_refused"], str) or not fam["vision_refused"]):
        raise StreamfoldError(f"{where}: \"vision_refused\" must be a reason string")
    forms = fam.get("forms", [])
    if not isinstance(forms, list):
        raise StreamfoldError(f"{where}: \"forms\" must be a list of {{\"name\", \"folds\", \"keep\"}} objects")
    for i, form in enumerate(forms):
        w = f"{where} form #{i + 1}"
        if not isinstance(form, dict) or set(form) - _FORM_KEYS or not isinstance(form.get("name"), str) \
                or not form["name"]:
            raise StreamfoldError(f"{w}: needs \"name\" and \"folds\" (and optionally \"keep\")")
        _check_folds(form.get("folds"), w, empty_ok=False)
        _check_keep(form.get("keep", []), w)
    fam.setdefault("folds", [])
    tmts = fam.get("text_model_types", ["-"])
    if not isinstance(tmts, list) or not tmts or not all(isinstance(m, str) and m for m in tmts):
        raise StreamfoldError(f"{where}: \"text_model_types\" must be a non-empty list of model types")
    return fam


def load_rules_file(path: str | Path) -> dict[str, dict]:
    """Families from a JSON or TOML rules file: ``{"families": {name: family}}`` or one family."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise StreamfoldError(f"{path}: cannot read rules file ({e.strerror or e})") from None
    try:
        data = tomllib.loads(text) if path.suffix.lower() == ".toml" else json.loads(text)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise StreamfoldError(f"{path}: invalid {'TOML' if path.suffix.lower() == '.toml' else 'JSON'} "
                              f"({e})") from None
    if not isinstance(data, dict):
        raise StreamfoldError(f"{path}: a rules file is an object")
    fams = data["families"] if "families" in data else {path.stem: data}
    if not isinstance(fams, dict) or not fams:
        raise StreamfoldError(f"{path}: \"families\" must map names to families")
    return {name: validate_family(name, fam, str(path)) for name, fam in fams.items()}


def supported_model_types() -> list[str]:
    """Model types streamfold folds (not those its data refuses: out of scope, nothing to fold)."""
    return sorted({m for fam in FAMILIES.values() if not (fam.get("refused") or fam.get("nothing_to_fold"))
                   for m in fam["model_types"]})


def family_for(model_type: str, extra: dict[str, dict] | None = None) -> tuple[str, dict]:
    """The family covering ``model_type``: user rules first, then the built-ins."""
    for fams in (extra or {}, FAMILIES):
        for name, fam in fams.items():
            if model_type in fam["model_types"]:
                return name, fam
    raise StreamfoldError(
        f"config.json: unsupported model_type {model_type!r}; supported: "
        f"{', '.join(supported_model_types())} (or describe it with --rules FILE)")


def check_text_model(cfg: dict, model_type: str, family: str, fam: dict) -> None:
    """Refuse a wrapper whose language model is of a type its family's rules were not derived for."""
    allowed = fam.get("text_model_types")
    if not allowed:
        return
    got = config_get(cfg, "text_config.model_type", fam.get("defaults", {}).get("text_config.model_type"))
    if got not in allowed:
        raise StreamfoldError(f"config.json: {model_type} with a {got!r} language model (text_config.model_type) "
                              f"is not supported: the {family!r} rules were derived and checked for "
                              f"{', '.join(allowed)} language models only")


for _name, _fam in FAMILIES.items():
    validate_family(_name, _fam, f"streamfold/rules/families/{_name}.toml")
