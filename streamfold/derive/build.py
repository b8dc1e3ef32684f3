"""Assemble a family (the ``--rules`` schema) from the ``Derived`` facts of one or more tiny models.

Several tiny models of one model type (config variants: dense/MoE, optional q/k norms, parallel
residual, ...) are merged: a norm pattern whose consumer sets differ gets ``variants`` (longest first),
unless a longer set would also be present in a checkpoint where it does not apply (StableLM's
parallel block: gate/up exist either way), in which case the rules are split with ``when`` on the
config keys that differ. Pure Python on the ``Derived`` data; no torch.
"""
from __future__ import annotations

import re

from .family import _DIGITS, Derived, consumer_entry, consumer_pattern, generalize_why, norm_pattern

def _rx(pattern: str) -> re.Pattern:
    return re.compile(re.escape(pattern).replace(r"\{e\}", r"\d+") + r"\Z")


def _present(entries: tuple, concrete: dict, names: list[str]) -> bool:
    for c in entries:
        w = c + ".weight" if isinstance(c, str) else c["weight"]
        for k, v in concrete.items():
            w = w.replace("{" + k + "}", v) if v is not None else w
        rx = _rx(w)
        if not any(rx.match(t) for t in names):
            return False
    return True


def _freeze(entries) -> tuple:
    return tuple(c if isinstance(c, str) else tuple(sorted(c.items())) for c in entries)


def _own_index(pattern: str, name: str, concrete: dict, names: list[str], mine: set[str]) -> str:
    """``pattern`` (of consumer ``name``) with one ``{e}`` narrowed when, as ``{e}``, it would also reach
    tensors that are not this norm's consumers: the first ``{e}`` that, read as the norm's own second index
    (several blocks per layer, each with its own norm: LongCat-Flash's ``input_layernorm.{h}`` feeds
    ``self_attn.{h}``), else kept as its literal index (Zamba2's ``adapter_list.{e}.0``: only each
    adapter's first linear reads the norm), reaches only this norm's consumers. Checked against the
    checkpoint's names, never guessed."""
    if "{e}" not in pattern:
        return pattern

    def reach(p: str) -> set[str]:
        for k in ("n", "h"):
            if concrete.get(k) is not None:
                p = p.replace("{" + k + "}", concrete[k])
        rx = _rx(p)
        return {t for t in names if rx.match(t)}

    if reach(pattern) <= mine:
        return pattern
    parts = pattern.split("{e}")
    digits = _DIGITS.findall(name)[-(len(parts) - 1):]  # the concrete indices the {e}s stand for
    fills = (["{h}"] if concrete.get("h") is not None else []) + [None]
    for fill in fills:  # the norm's own index, else the literal index (Zamba2's adapter_list.{e}.0)
        for i in range(1, len(parts)):
            cand = "{e}".join(parts[:i]) + (fill or digits[i - 1]) + "{e}".join(parts[i:])
            got = reach(cand)
            if name in got and got <= mine:
                return cand
    return pattern


def _in_layer(norm_weight: str, name: str) -> str:
    """``name`` with the norm's layer index as ``{n}`` (when it is inside the norm's layer)."""
    _, pre, n = norm_pattern(norm_weight)
    if pre is not None and name.startswith(pre + n + "."):
        return pre + "{n}" + name[len(pre) + len(n):]
    return name


def _instances(d: Derived):
    """(norm pattern, layer index, outcome) per in-scope instance; outcome ("fold", entries, head) or
    ("keep", why)."""
    # a norm's consumers over all its layers, layer index as {n} (other indices concrete): a shared block
    # saved once per layer that uses it feeds, in each copy, what any of its uses feeds (Zamba2: one
    # adapter per use, adapter_list.{e}.0)
    feeds: dict[str, set[str]] = {}
    for inst in d.instances:
        key = _in_layer(inst.weight, inst.weight)
        feeds.setdefault(key, set()).update(_in_layer(inst.weight, c[0]) for c in inst.consumers)
        feeds.setdefault(key + "|bias", set()).update(_in_layer(inst.weight, c[3]) for c in inst.consumers if c[3])
    for inst in d.instances:
        if inst.why and not inst.fold and inst.why.startswith("vision/audio side"):
            continue
        pat, pre, n = norm_pattern(inst.weight)
        if inst.fold:
            entries = []
            idx = _DIGITS.findall(inst.weight[: -len(".weight")])
            concrete = {"n": n, "h": idx[1] if len(idx) > 1 else None}
            key = _in_layer(inst.weight, inst.weight)
            mine_w = {x.replace("{n}", n) if n is not None else x for x in feeds[key]}
            mine_b = {x.replace("{n}", n) if n is not None else x for x in feeds[key + "|bias"]}
            for w, axis, ndim, bias in inst.consumers:
                wp = _own_index(consumer_pattern(w, pre, n), w, concrete, d.saved, mine_w)
                bp = _own_index(consumer_pattern(bias, pre, n), bias, concrete, d.saved, mine_b) if bias else None
                e = consumer_entry(wp, axis, bp, axis == ndim - 1, inst.tiles.get(w, 1))
                if e not in entries:
                    entries.append(e)
            yield pat, concrete, ("fold", tuple(entries), inst.head, inst.offset)
        else:
            idx = _DIGITS.findall(inst.weight[: -len(".weight")])
            yield pat, {"n": n, "h": idx[1] if len(idx) > 1 else None}, ("keep", generalize_why(inst.why), inst.offset)


def assemble(model_types: list[str], variants: list[tuple[dict, Derived]], base_values: dict) -> dict:
    """One family from ``variants`` = [(config overrides, Derived), ...]; the first has no overrides.

    ``base_values`` maps each overridden config key to its value in the base tiny config (a key the
    overrides do not set)."""
    order: list[str] = []
    outcomes: dict[str, list] = {}  # pattern -> [(variant index, layer n, outcome)]
    for vi, (_, d) in enumerate(variants):
        for pat, n, oc in _instances(d):
            if pat not in outcomes:
                order.append(pat)
            outcomes.setdefault(pat, []).append((vi, n, oc))
    for pat in [p for p in order if "{h}" in p]:
        _split_by_index(pat, order, outcomes)
    offsets = [oc[-1] for pat in order for _, _, oc in outcomes[pat] if oc[0] == "fold"]
    fam_offset = max(set(offsets), key=offsets.count) if offsets else 0
    folds, keeps = [], []
    for pat in order:
        ocs = outcomes[pat]
        fold_sets = list(dict.fromkeys(_freeze(oc[1]) for _, _, oc in ocs if oc[0] == "fold"))
        entries_of = {_freeze(oc[1]): oc[1] for _, _, oc in ocs if oc[0] == "fold"}
        keep_why = [oc[1] for _, _, oc in ocs if oc[0] == "keep"]
        fold_when = _config_split(ocs, variants, base_values) if keep_why and fold_sets else None
        if fold_when:  # folds under some configs, stays under the others: a fold rule with `when`, and a
            # keep rule for the rest (the planner's fold rules claim a norm before its keep rules)
            keeps.append({"norm": pat, "why": keep_why[0]})
            ocs = [x for x in ocs if x[2][0] == "fold"]
        elif keep_why and fold_sets:
            keeps.append({"norm": pat, "why": "folds in some layers or configs but not in others, kept whole: "
                                              + keep_why[0]})
            continue
        elif keep_why:
            keeps.append({"norm": pat, "why": keep_why[0]})
            continue
        head = any(oc[2] for _, _, oc in ocs)
        offset = next(oc[3] for _, _, oc in ocs)
        if any(oc[3] != offset for _, _, oc in ocs):  # e.g. a wrapper around Llama (w) and Gemma (1 + w)
            raise ValueError(f"{pat}: multiplies by w in some configs and by 1 + w in others")
        sets = sorted(fold_sets, key=len, reverse=True)  # stable: first seen first among equals
        rules = _split(pat, sets, entries_of, ocs, variants, base_values)
        for when, chosen in rules:
            r = {"norm": pat}
            lists = [list(entries_of[s]) for s in chosen]
            if len(lists) == 1:
                r["into"] = lists[0]
            else:
                r["variants"] = lists
            if head:
                r["untied_head"] = True
            if offset != fam_offset:
                r["offset"] = offset
            if when or fold_when:
                r["when"] = {**(fold_when or {}), **(when or {})}
            folds.append(r)
    fam = {"model_types": list(model_types), "offset": fam_offset, "folds": folds}
    if keeps:
        fam["keep"] = keeps
    under = list(dict.fromkeys(p for _, d in variants for p in d.outside))
    if under:
        fam.setdefault("keep", []).extend({"under": p, "why": "vision/audio side: outside FlashNorm's "
                                           "language-model scope, left untouched"} for p in under)
    prefixes = {}
    for _, d in variants:
        for k, v in d.prefixes.items():
            prefixes.setdefault(k, v)
    if prefixes:
        fam["layouts"] = [{}, dict(sorted(prefixes.items()))]
    return fam


def _subst_h(x, h: str):
    if isinstance(x, str):
        return x.replace("{h}", h)
    if isinstance(x, dict):
        return {k: _subst_h(v, h) for k, v in x.items()}
    if isinstance(x, tuple):
        return tuple(_subst_h(v, h) for v in x)
    return x


def _split_by_index(pat: str, order: list[str], outcomes: dict) -> None:
    """A norm pattern whose instances differ by their second index (LongCat-Flash's
    ``post_attention_layernorm.0`` feeds the MoE and ``mlps.0``, ``.1`` only ``mlps.1``) becomes one pattern
    per index value, in place; patterns whose instances agree are left as they are."""
    ocs = outcomes[pat]
    by_h: dict[str, set] = {}
    for _, c, oc in ocs:
        by_h.setdefault(c["h"], set()).add((oc[0], _freeze(oc[1]) if oc[0] == "fold" else oc[1]))
    if len({frozenset(v) for v in by_h.values()}) <= 1 or None in by_h:
        return
    i = order.index(pat)
    order.pop(i)
    del outcomes[pat]
    for h in sorted(by_h, key=int):
        hp = pat.replace("{h}", h)
        order.insert(i, hp)
        i += 1
        outcomes[hp] = [(vi, {**c, "h": None}, _subst_h(oc, h)) for vi, c, oc in ocs if c["h"] == h]


def _config_split(ocs, variants, base_values) -> dict | None:
    """``{config key: [values]}`` that holds in exactly the config variants where the norm folds, when
    each variant either folds it in every layer or keeps it in every layer (else None: kept whole)."""
    kinds: dict[int, set] = {}
    for vi, _, oc in ocs:
        kinds.setdefault(vi, set()).add(oc[0])
    if any(len(k) > 1 for k in kinds.values()):
        return None
    folding = [vi for vi, k in kinds.items() if k == {"fold"}]
    keeping = [vi for vi, k in kinds.items() if k == {"keep"}]
    for key in sorted({k for ov, _ in variants for k in ov}):
        val = [variants[vi][0].get(key, base_values.get(key)) for vi in folding]
        other = [variants[vi][0].get(key, base_values.get(key)) for vi in keeping]
        if not set(map(repr, val)) & set(map(repr, other)):
            return {key: list(dict.fromkeys(val))}
    return None


def _split(pat, sets, entries_of, ocs, variants, base_values):
    """[(when, [consumer sets])]: one rule with every set as variants when first-present picks the right
    one in every tiny model; else one rule per config variant value, with ``when``."""
    def picks_right(chosen, vis):
        for vi, n, oc in ocs:
            if vi not in vis:
                continue
            names = variants[vi][1].saved
            first = next((s for s in chosen if _present(entries_of[s], n, names)), None)
            if first != _freeze(oc[1]):
                return False
        return True

    all_v = set(range(len(variants)))
    if picks_right(sets, all_v):
        return [(None, sets)]
    per_v = {vi: {_freeze(oc[1]) for v2, _, oc in ocs if v2 == vi} for vi in all_v}
    base = per_v.get(0, set())
    keys = sorted({k for vi, (ov, _) in enumerate(variants) if per_v[vi] and per_v[vi] != base for k in ov})
    rules = []
    groups: dict[tuple, set] = {}
    for vi, (ov, _) in enumerate(variants):
        if not per_v[vi]:
            continue
        vals = tuple(ov.get(k, base_values.get(k)) for k in keys)
        groups.setdefault(vals, set()).add(vi)
    for vals, vis in groups.items():
        mine = [s for s in sets if any(vi in vis and _freeze(oc[1]) == s for vi, _, oc in ocs)]
        if not picks_right(mine, vis):
            raise ValueError(f"{pat}: no consumer choice is right in every layer: {mine}")
        rules.append(({k: [v] for k, v in zip(keys, vals)}, mine))
    return rules
