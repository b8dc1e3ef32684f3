"""Which rules plan a checkpoint: its family as the checkpoint spells it, or a composed wrapper.

:func:`resolve` is the one entry point of the planner, ``detect`` and ``remode``:

- a ``model_type`` of a family: that family, laid out as the checkpoint names its tensors
  (:func:`streamfold.rules.layout.choose`: bare base model, nested prefixes, converted forms);
- a family marked ``refused`` (encoders, encoder-decoders) or ``nothing_to_fold``: refused with the
  family's one-line reason (:class:`NothingToFold` for the latter);
- an unknown ``model_type`` whose ``text_config.model_type`` is a supported family, with that family's
  norms found under exactly one name prefix: a **composed wrapper**. The language model is planned
  with the text family's rules spelled under that prefix (its head found beside it); every other
  subtree (vision tower, projector, audio, ...) is kept whole. The names must tile: a norm-like tensor
  under the language model's prefix that no rule of the text family places is refused (checked by the
  planner, :func:`untiled`), as are language-model norms under several prefixes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..core.errors import NothingToFold, StreamfoldError
from ..rules.layout import Laid, choose
from ..rules.patterns import config_get, expand_consumer, pattern_regex
from ..rules.schema import family_for
from ..rules.vision import refuse_vision, with_vision


@dataclass
class Composed:
    """A wrapper planned through its language model: where that model sits and what is kept whole."""

    wrapper_type: str
    text_type: str
    text_family: str
    prefix: str  # the checkpoint's spelling of the text rules' base prefix, e.g. "model.language_model."
    head: str | None  # the head module as spelled here (None: no head tensor)
    others: list[str] = field(default_factory=list)  # subtrees kept whole

    def describe(self) -> str:
        kept = ", ".join(f"{o}*" for o in self.others) or "nothing else"
        return (f"composed wrapper: model_type {self.wrapper_type!r} is not a streamfold family; its language model "
                f"(text_config model_type {self.text_type!r}) is planned with family {self.text_family!r} under "
                f"{self.prefix}*; kept whole: {kept}")

    def to_dict(self) -> dict:
        return {"wrapper_model_type": self.wrapper_type, "text_model_type": self.text_type,
                "text_family": self.text_family, "language_model_prefix": self.prefix, "head": self.head,
                "kept_whole": list(self.others)}


@dataclass
class Resolved:
    """The rules that plan one checkpoint."""

    family: str
    fam: dict  # laid out as the checkpoint spells it
    model_type: str  # the type whose rules apply (the text model's, for a composed wrapper)
    layout: str | None = None  # Laid.describe() of a non-default spelling
    composed: Composed | None = None


def resolve(cfg: dict, tensors: dict, rules: dict | None = None, vision: bool | None = None) -> Resolved:
    """The family (laid out), or a composed wrapper, for ``config.json`` + tensor names; refusals as above.

    ``vision`` (``--fold-vision``): the family with its tower rules (:func:`streamfold.rules.vision.with_vision`);
    refused for a family without them and for a composed wrapper. None: as ``config.json``'s
    ``flashnorm_vision`` says (a checkpoint folded with its tower is read with the tower's rules)."""
    if vision is None:
        vision = cfg.get("flashnorm_vision") is True
    model_type = cfg.get("model_type")
    if not isinstance(model_type, str):
        raise StreamfoldError("config.json: no \"model_type\"; is this a transformers checkpoint?")
    try:
        family, fam = family_for(model_type, rules)
    except StreamfoldError:
        text = cfg.get("text_config")
        tmt = text.get("model_type") if isinstance(text, dict) else None
        if not isinstance(tmt, str):
            raise
        try:
            family, fam = family_for(tmt, rules)
        except StreamfoldError:
            raise StreamfoldError(f"config.json: unsupported model_type {model_type!r} (and its text_config model_type "
                                  f"{tmt!r} is not supported either); describe it with --rules FILE") from None
        refuse(tmt, fam)
        if vision:
            raise StreamfoldError(f"--fold-vision: model_type {model_type!r} is planned as a composed wrapper (its "
                                  f"language model with family {family!r}; every other subtree kept whole): it has "
                                  "no vision-tower rules; convert without --fold-vision")
        return _composed(model_type, tmt, family, fam, tensors)
    refuse(model_type, fam)
    if vision:
        refuse_vision(model_type, family, fam)
        fam = with_vision(fam)
    laid = choose(fam, tensors)
    if vision and not _tower_found(laid.fam, tensors):
        raise StreamfoldError(f"--fold-vision: no norm or consumer of {model_type}'s vision-tower rules is in the "
                              f"checkpoint (tensor names: {laid.describe() or 'as save_pretrained writes them'}); "
                              "convert without --fold-vision")
    return Resolved(family, laid.fam, model_type, laid.describe())


def _tower_found(fam: dict, tensors: dict) -> bool:
    """Whether a tower fold rule, as laid out, names a tensor of the checkpoint (its norm, or its first
    consumer when the norms were removed)."""
    for f in fam["folds"]:
        if f.get("tower"):
            c = (f.get("into") or f["variants"][0])[0]
            for pat in (f["norm"] + ".weight", c + ".weight" if isinstance(c, str) else c["weight"]):
                rx = pattern_regex(pat)
                if any(rx.match(t) for t in tensors):
                    return True
    return False


def is_tied(cfg: dict, model_type: str, fam: dict) -> bool:
    """Whether the embeddings are tied: config.json (or its text_config), else the family's default."""
    tie_default = fam.get("tie_default", False)
    if isinstance(tie_default, list):
        tie_default = model_type in tie_default
    return bool(config_get(cfg, "tie_word_embeddings", tie_default))


def refuse(model_type: str, fam: dict) -> None:
    """Raise the family's one-line refusal: ``refused`` (out of scope) or ``nothing_to_fold``."""
    if fam.get("refused"):
        raise StreamfoldError(f"config.json: model_type {model_type!r} is not supported: {fam['refused']}")
    if fam.get("nothing_to_fold"):
        raise NothingToFold(f"config.json: model_type {model_type!r}: nothing to fold: {fam['nothing_to_fold']}")


def _base(fam: dict) -> tuple[str, str | None]:
    """(the rules' base prefix, e.g. ``model.``; the head module pattern, e.g. ``lm_head``)."""
    heads = [f["norm"] for f in fam["folds"] if f.get("untied_head")]
    head = next((c if isinstance(c, str) else c["weight"].rsplit(".", 1)[0]
                 for f in fam["folds"] if f.get("untied_head") for c in (f.get("into") or f["variants"][0])), None)
    pats = [f["norm"] for f in fam["folds"]] + [k["norm"] for k in fam.get("keep", []) if "norm" in k]
    firsts = {p.split(".", 1)[0] for p in pats if "." in p}
    if len(firsts) != 1 or any("." not in p for p in pats if p not in heads):
        raise StreamfoldError("composed wrapper: the text family's rules have no single base prefix "
                              f"({', '.join(sorted(firsts))}); describe the wrapper with --rules FILE")
    return firsts.pop() + ".", head


def _prefixes(fam: dict, base: str, names: list[str], by_consumers: bool = False) -> dict[str, set]:
    """Checkpoint prefix -> the fold rules of the text family (spelled without its base prefix) found under
    it: by their norms, or (a strict checkpoint, norms removed) by a complete consumer set of a variant."""
    found: dict[str, set] = {}
    present = set(names)
    for i, f in enumerate(fam["folds"]):
        if f.get("untied_head") or not f["norm"].startswith(base):
            continue
        sets = [[f["norm"]]] if not by_consumers else f.get("variants", [f.get("into")])
        for cons in sets:
            pats = [c + ".weight" if isinstance(c, str) else c["weight"] for c in cons]
            if not all(p.startswith(base) for p in pats):
                continue
            rx = re.compile(r"(?P<pre>(?:[^.]+\.)*?)" + pattern_regex(pats[0][len(base):]).pattern)
            for t in names:
                m = rx.match(t)
                if m and all(expand_consumer({"weight": m.group("pre") + p[len(base):]},
                                             {k: v for k, v in m.groupdict().items() if k != "pre"},
                                             present, names) for p in pats[1:]):
                    found.setdefault(m.group("pre"), set()).add(i)
    return found


def _composed(wrapper: str, tmt: str, family: str, fam: dict, tensors: dict) -> Resolved:
    base, head = _base(fam)
    names = sorted(tensors)
    found = _prefixes(fam, base, names)
    if not found:  # strict (norms removed): the prefix under which every rule's consumers are
        by = _prefixes(fam, base, names, by_consumers=True)
        most = max((len(v) for v in by.values()), default=0)
        found = {p: v for p, v in by.items() if len(v) == most}
    if not found:
        raise StreamfoldError(f"config.json: unsupported model_type {wrapper!r}; its text_config model_type {tmt!r} "
                              f"is family {family!r}, but no tensor is a norm of that family under any name prefix")
    if len(found) > 1:
        where = ", ".join(f"{p or '(none)'}*" for p in found)
        raise StreamfoldError(f"composed wrapper {wrapper!r}: norms of its language model ({tmt}) are under "
                              f"{len(found)} prefixes ({where}); the names do not tile into one language model")
    prefix = next(iter(found))
    lay = {base: prefix}
    spelled_head = None
    if head is not None:
        parts = prefix.split(".")[:-1]
        for k in range(len(parts), -1, -1):  # the head beside the language model, nearest first
            q = ".".join(parts[:k]) + ("." if k else "")
            if q + head + ".weight" in tensors:
                spelled_head = q + head
                break
        if spelled_head is not None:
            lay[head] = spelled_head
    mine = (prefix,) + ((spelled_head + ".",) if spelled_head else ())
    others: list[str] = []
    for t in names:
        if t.startswith(mine):
            continue
        a, b = t.split("."), prefix.split(".")
        k = 0
        while k < len(a) - 1 and k < len(b) and a[k] == b[k]:
            k += 1
        sub = ".".join(a[: k + 1]) + ("." if k + 1 < len(a) else "")
        if sub not in others:
            others.append(sub)
    laid = choose({**fam, "layouts": [lay]}, tensors).fam  # the text family's forms apply too
    why = (f"outside the language model of composed wrapper {wrapper!r} (planned with family {family!r} under "
           f"{prefix}*): kept whole")
    laid["keep"] = laid.get("keep", []) + [{"under": o, "why": why} for o in others]
    comp = Composed(wrapper, tmt, family, prefix, spelled_head, others)
    return Resolved(family, laid, tmt, Laid(laid, lay).describe(), comp)


def untiled(resolved: Resolved, unknown_norms: list[str]) -> None:
    """Refuse a composed wrapper whose language model holds a norm no rule places (names do not tile)."""
    if resolved.composed is not None and unknown_norms:
        c = resolved.composed
        raise StreamfoldError(f"composed wrapper {c.wrapper_type!r}: tensor {unknown_norms[0]!r} is a norm under the "
                              f"language model ({c.prefix}*) that no rule of family {c.text_family!r} places; the "
                              "names do not tile, so the plan cannot be trusted (describe it with --rules FILE)")
