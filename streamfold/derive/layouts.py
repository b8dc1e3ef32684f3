"""The tensor-name layouts transformers' loader accepts for a family, derived and checked (development time).

``save_pretrained`` writes one spelling of a model's tensor names; the loader also accepts others, and
published checkpoints use them. Candidates come from transformers' own loading machinery:

- the bare base model: the model's ``base_model_prefix`` removed (``layers.0...`` for ``model.layers.0...``,
  ``h.0...`` for ``transformer.h.0...``), as ``model.model.save_pretrained`` writes it;
- the prefix changes of the model's conversion mapping (``conversion_mapping.get_model_conversion_mapping``:
  ``PrefixChange``, and ``WeightRenaming`` of an anchored literal prefix), inverted: the checkpoint
  spelling the loader maps onto the model's own names (e.g. Qwen3.5 text stored under
  ``model.language_model.``);
- the model's in-memory names (``state_dict``) when the save converts them: the loader's converters leave
  them as they are (fused ``mlp.experts.gate_up_proj`` where ``save_pretrained`` writes per-expert
  ``block_sparse_moe.experts.N.w1``). Their rules are derived from the same trace, in in-memory names,
  and stored as a ``form``.

A candidate, and the spelling the trace itself decoded (``derive.build``'s checkpoint <-> in-memory
prefixes), is kept only when it is proven: the tiny model re-saved under it loads in stock transformers
with no missing or unexpected key and the same logits, and streamfold converts it with the family's rules
(float32 merged, compat) writing the same names back, whose logits match within the family check's 1e-5.
"""
from __future__ import annotations

import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from .check import MAX_REL, _rel

_LITERAL = re.compile(r"^\^((?:[A-Za-z0-9_]|\\\.)+)$")


@dataclass
class LayoutResult:
    """The layouts and forms proven for one tiny model, their measured errors, and rejected candidates."""

    layouts: list[dict] = field(default_factory=list)
    forms: list[dict] = field(default_factory=list)
    rel: dict[str, float] = field(default_factory=dict)  # description -> compat float32 max rel err
    rejected: dict[str, str] = field(default_factory=dict)  # description -> why
    dropped: list[dict] = field(default_factory=list)  # the family's traced layouts that did not prove


def _patterns(fam: dict) -> list[str]:
    out = []
    for f in fam["folds"]:
        out.append(f["norm"])
        for v in f.get("variants", [f.get("into")]):
            out += [c if isinstance(c, str) else c["weight"] for c in v]
    return out + [k.get("norm") or k["under"] for k in fam.get("keep", [])]


def prefix_candidates(model, fam: dict) -> list[dict]:
    """Prefix maps (rules' prefix -> checkpoint prefix) the loader may accept, from ``base_model_prefix``
    and the model's conversion mapping; only maps that re-spell some pattern of ``fam``."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import PrefixChange, WeightRenaming

    pats = _patterns(fam)
    cands: list[dict] = []
    bp = getattr(model, "base_model_prefix", "") or ""
    if bp:
        cands.append({bp + ".": ""})
    for t in get_model_conversion_mapping(model, add_legacy=False):
        if isinstance(t, PrefixChange):
            mp = f"{t.model_prefix}." if t.model_prefix else ""
            if t.prefix_to_remove:  # checkpoint mp.X.rest -> model mp.rest
                cands.append({mp: f"{mp}{t.prefix_to_remove}."} if mp else {})
            elif t.prefix_to_add:  # checkpoint mp.rest -> model mp.X.rest
                cands.append({f"{mp}{t.prefix_to_add}.": mp})
        elif type(t) is WeightRenaming and len(t.source_patterns) == 1 and len(t.target_patterns) == 1:
            m = _LITERAL.match(t.source_patterns[0])
            tgt = t.target_patterns[0]
            if m and re.fullmatch(r"[A-Za-z0-9_.]+", tgt):
                cands.append({tgt + ".": m.group(1).replace("\\.", ".") + "."})
    out = []
    for lay in cands:
        if lay and lay not in out and lay not in fam.get("layouts", []) \
                and any(p.startswith(k) for p in pats for k in lay):
            out.append(lay)
    return out


def describe(lay: dict) -> str:
    return ", ".join(f"{k}* as {v or '(no prefix)'}{'*' if v else ''}" for k, v in sorted(lay.items()))


def respell(src: Path, dst: Path, rename) -> Path:
    """Copy the sharded checkpoint ``src`` to ``dst`` with every tensor renamed by ``rename(name)``."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from .tiny import INDEX_NAME
    dst.mkdir(parents=True)
    index = json.loads((src / INDEX_NAME).read_text())
    for f in sorted(src.iterdir()):
        if f.suffix == ".safetensors":
            with safe_open(str(f), "pt") as sf:
                meta = sf.metadata() or {"format": "pt"}
                save_file({rename(k): sf.get_tensor(k) for k in sf.keys()}, str(dst / f.name), metadata=meta)
        elif f.name != INDEX_NAME:
            (dst / f.name).write_bytes(f.read_bytes())
    index["weight_map"] = {rename(k): v for k, v in index["weight_map"].items()}
    (dst / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return dst


def save_memory_names(model, out: Path, norms: set[str]) -> Path:
    """The model in bf16 (as ``tiny.save_sharded`` holds it) as a sharded checkpoint of its ``state_dict``
    (tied duplicates once) in transformers' in-memory names: norm tensors (``norms``) in shard 1, the
    rest alternating over shards 2 and 3; config copied."""
    from safetensors.torch import save_file

    from .tiny import INDEX_NAME, NORM_SHARD, SHARD_NAMES, _as_dtype
    out.mkdir(parents=True)
    seen, tensors = set(), {}
    for k, v in _as_dtype(model, "bfloat16").state_dict().items():
        key = (v.data_ptr(), tuple(v.shape))
        if key in seen:
            continue
        seen.add(key)
        tensors[k] = v.detach().contiguous()
    shards: dict[str, dict] = {s: {} for s in SHARD_NAMES}
    wm, i = {}, 0
    for k in sorted(tensors):
        s = NORM_SHARD if k in norms else SHARD_NAMES[1 + i % (len(SHARD_NAMES) - 1)]
        i += k not in norms
        shards[s][k] = tensors[k]
        wm[k] = s
    for s, content in shards.items():
        save_file(content, str(out / s), metadata={"format": "pt"})
    (out / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": wm}, indent=2) + "\n")
    model.config.save_pretrained(out)
    return out


def memory_form(model, fam: dict, variants: list | None = None, base_values: dict | None = None) -> dict | None:
    """The family's rules in the model's in-memory names, when they differ from ``fam``'s; else None.
    ``variants``: ``[(config overrides, model), ...]`` (the first is ``model``), assembled as ``fam`` was."""
    from . import tiny
    from .build import assemble
    from .family import derive_model
    from ..rules.layout import relay
    pairs = variants or [({}, model)]
    derived = [(ov, derive_model(m, tiny.example_inputs(m), names="memory")) for ov, m in pairs]
    got = assemble(list(fam["model_types"]), derived, base_values or {})
    for lay in [{}] + list(fam.get("layouts", [])):  # already a spelling of the family: not a form
        laid = relay(fam, lay)
        if got["folds"] == laid["folds"] and got.get("keep", []) == laid.get("keep", []):
            return None
    form = {"name": "transformers' in-memory names", "folds": got["folds"]}
    if got.get("keep") and got["keep"] != fam.get("keep"):  # else the family's keep rules apply
        form["keep"] = got["keep"]
    return form


def _loads_same(path: Path, mt: str, inputs, ref) -> str | None:
    """None when stock transformers loads ``path`` completely with ``ref``'s logits, else why not."""
    from . import tiny
    m, info = tiny.load_pretrained(path, mt)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if bad:
        return f"transformers loads it with {bad}"
    rel = _rel(tiny.forward_logits(m, inputs), ref)
    return None if rel <= MAX_REL else f"transformers loads different logits (max rel err {rel:.1e})"


def _applicable(fam: dict, names: list[str]) -> dict:
    """``fam`` with only the fold rules that match a norm of this checkpoint in the spelling it uses (another
    config variant's rules are left out: a rules file must match every rule, a built-in family need not)."""
    from ..rules.layout import choose, relay
    from ..rules.patterns import pattern_regex
    laid = choose(fam, dict.fromkeys(names))
    form = next((f for f in fam.get("forms", []) if f["name"] == laid.form), None)
    folds = form["folds"] if form else fam["folds"]
    spelled = relay(fam, laid.layout, form)["folds"]
    kept = [f for f, g in zip(folds, spelled) if any(pattern_regex(g["norm"] + ".weight").match(t) for t in names)]
    return {**fam, "forms": [{**form, "folds": kept}]} if form else {**fam, "folds": kept}


def _plan_rejects(path: Path, fam: dict, mt: str, td: Path) -> str | None:
    """Why streamfold's plan of ``path`` under ``fam`` refuses it or folds nothing (``_converts``' plan-level
    rejections, without converting), else None."""
    from safetensors import safe_open

    from ..core.errors import StreamfoldError
    from ..run.conversion import load_plan
    names = sorted(k for f in path.glob("*.safetensors") for k in safe_open(str(f), "pt").keys())
    rules = td / "rules.json"
    rules.write_text(json.dumps({"families": {"derived": {**_applicable(fam, names), "model_types": [mt]}}}))
    try:
        _, _, plan = load_plan(path, rules=rules)
    except StreamfoldError as e:
        return f"streamfold refuses it: {e}"
    return _plan_misses(plan)


def _plan_misses(plan) -> str | None:
    """Why a plan does not prove a spelling (as tests/test_name_layouts.py requires), else None."""
    if not plan.folded:
        return "nothing folded under this layout"
    if plan.layout is None:  # e.g. it re-spells only kept names: the default spelling already reads it
        return "the plan reads it in the family's default spelling (the layout re-spells nothing it uses)"
    if plan.unknown_norms:
        return f"norms the rules do not name under this layout: {', '.join(plan.unknown_norms[:3])}"
    return None


def _converts(path: Path, fam: dict, mt: str, inputs, ref, td: Path) -> tuple[float | None, str | None]:
    """(compat float32 max rel err, None) when streamfold converts ``path`` exactly in its own names."""
    from safetensors import safe_open

    from ..convert import convert
    from ..core.errors import StreamfoldError
    from ..run.conversion import load_plan
    from . import tiny
    names = sorted(k for f in path.glob("*.safetensors") for k in safe_open(str(f), "pt").keys())
    fam = _applicable(fam, names)
    rules = td / "rules.json"
    rules.write_text(json.dumps({"families": {"derived": {**fam, "model_types": [mt]}}}))
    out = td / "out"
    try:
        convert(path, out, merged_dtype="float32", rules=rules)
    except StreamfoldError as e:
        return None, f"streamfold refuses it: {e}"
    names = lambda p: sorted(k for f in p.glob("*.safetensors") for k in safe_open(str(f), "pt").keys())  # noqa: E731
    if names(out) != names(path):
        return None, "streamfold's output does not keep the checkpoint's names"
    _, _, plan = load_plan(path, rules=rules)
    if _plan_misses(plan):
        return None, _plan_misses(plan)
    m, _ = tiny.load_pretrained(out, mt)
    rel = _rel(tiny.forward_logits(m, inputs), ref)
    return rel, None if rel <= MAX_REL else f"converted logits max rel err {rel:.1e} > {MAX_REL}"


def derive_layouts(model, fam: dict, root: Path | None = None, check: bool = True, variants: list | None = None,
                   base_values: dict | None = None) -> LayoutResult:
    """The layouts and forms of ``fam`` (derived from ``model``'s saved names) that transformers loads and
    streamfold converts exactly; ``fam`` itself is not changed. ``check=False`` (drift of the rules alone):
    the candidates transformers loads as the saved model, without streamfold's conversion check.
    ``variants``/``base_values``: the config variants ``fam`` was assembled from (``[(overrides, model),
    ...]``), so a form has the same variants; proven on ``model``."""
    from . import tiny
    from ..rules.layout import spell
    res = LayoutResult()
    mt = model.config.model_type
    inputs = tiny.example_inputs(model)
    with tempfile.TemporaryDirectory(prefix="sf_layouts_", dir=root) as td:
        td = Path(td)
        src = tiny.save_sharded(model, td / "src", dtype="bfloat16")
        ref_model, _ = tiny.load_pretrained(src, mt)
        ref = tiny.forward_logits(ref_model, inputs)
        del ref_model
        cands: list[tuple[str, Path | None, dict]] = []
        # the spelling the trace decoded (checkpoint <-> in-memory prefixes, derive.build) proves like any
        # candidate: a tower renamed inside (Kimi K2.5's blocks -> layers) is not a prefix change
        for i, lay in enumerate(lay for lay in fam.get("layouts", []) if lay):
            path = respell(src, td / f"traced{i}", lambda k, lay=lay: spell(k, lay))
            cands.append((describe(lay), path, {"traced": lay}))
        for i, lay in enumerate(prefix_candidates(model, fam)):
            path = respell(src, td / f"lay{i}", lambda k, lay=lay: spell(k, lay))
            cands.append((describe(lay), path, {"layout": lay}))
        try:
            form = memory_form(model, fam, variants, base_values)
        except Exception as e:  # a model whose in-memory names cannot be traced: no form, said why
            form, res.rejected["in-memory names"] = None, f"not derived: {type(e).__name__}: {e}"
        if form is not None:
            norms = set(getattr(model, "tiny_norms", {}))
            path = save_memory_names(model, td / "memory", {n + s for n in norms for s in (".weight", ".bias")})
            cands.append((form["name"], path, {"form": form}))
        for i, (what, path, item) in enumerate(cands):
            try:
                why = _loads_same(path, mt, inputs, ref)
            except Exception as e:  # the loader refuses this spelling outright
                why = f"transformers cannot load it: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            if why is None:
                trial = dict(fam)
                if "traced" in item:
                    trial["layouts"] = [{}, item["traced"]]
                elif "layout" in item:
                    trial["layouts"] = [{}] + [lay for lay in fam.get("layouts", []) if lay] + [item["layout"]]
                else:
                    trial["forms"] = [item["form"]]
                work = td / f"conv{i}"
                work.mkdir()
                if check:
                    rel, why = _converts(path, trial, mt, inputs, ref, work)
                else:  # rules only: what the plan alone rejects, so --check --rules-only agrees with a checked run
                    why = _plan_rejects(path, trial, mt, work)
            if why is not None:
                res.rejected[what] = why
                if "traced" in item:
                    res.dropped.append(item["traced"])
                continue
            if check:
                res.rel[what] = float(f"{rel:.2e}")
            if "layout" in item:
                res.layouts.append(item["layout"])
            elif "form" in item:
                res.forms.append(item["form"])
    return res
