"""The model card of a mode change (compat <-> strict) of a checkpoint that is already FlashNorm.

It replaces the source's card rather than stacking on it: ``base_model`` is the model the source was
converted from (the source card's ``base_model`` when that card is a FlashNorm card, i.e. tagged
``flashnorm``), the title gains no second ``-FlashNorm``, and the table lists only what this step
changed (norm tensors removed or restored; every other tensor is the source's, byte for byte).
"""
from __future__ import annotations

import os
from pathlib import Path

from .render import CARD_NAME, CITATION, _hub_link, _repo_like, _usage, base_model_for, command_line, \
    front_matter, metadata


def _title(src_name: str, push_to_hub: str | None, parent: str | None) -> str:
    """The pushed repo's name, else ``<original>-FlashNorm`` (the source's own name when it already says so)."""
    if push_to_hub:
        return push_to_hub.split("/")[-1]
    name = (parent if _repo_like(parent) else src_name).split("/")[-1]
    return name if "flashnorm" in name.lower() else f"{name}-FlashNorm"


def write_remode_card(folder: str | os.PathLike, *, plan, tensors, cfg: dict, source, dst: str | os.PathLike,
                      version: str, bytes_in: int, bytes_out: int, push_to_hub: str | None = None,
                      base_model: str | None = None, rules=None, private: bool = False) -> Path:
    """Write ``folder/README.md`` for a mode change (``plan.flashnorm`` is the source's state)."""
    import yaml

    from ..core.units import human_bytes
    folder, state, strict = Path(folder), plan.flashnorm, plan.mode == "strict"
    src_meta, _ = front_matter(source.card_text)
    tags = src_meta.get("tags") if isinstance(src_meta.get("tags"), list) else []
    parent = src_meta.get("base_model") if "flashnorm" in tags else None
    if isinstance(parent, list):
        parent = parent[0] if len(parent) == 1 else None
    base = base_model_for(source, cfg, base_model) if base_model or not _repo_like(parent) else parent
    src_name = source.repo_id or Path(source.path).resolve().name
    title = _title(src_name, push_to_hub, parent)
    ref = push_to_hub or f"./{title}"
    meta = metadata(source_meta=src_meta, cfg=cfg, base_model=base, mode=plan.mode)
    if parent and base == parent:  # the source card's lineage, not the source itself
        meta["base_model_relation"] = src_meta.get("base_model_relation") or meta["base_model_relation"]
    head = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, default_flow_style=False)
    src_ref = (f"{_hub_link(source.repo_id)}" + (f" (commit `{source.commit[:12]}`)" if source.commit else "")
               if source.repo_id else f"`{src_name}`")
    of = _hub_link(base) if base and base != source.repo_id else src_ref
    ident = "all ones" if plan.offset == 0 else "all zeros (the norm computes `(1 + w) * x`)"
    step = ("removing its identity norm weights (strict mode)" if strict else
            "restoring the identity norm weights it lacked (compat mode)")
    loads = ("`transformers` loads it with a warning that the norm weights are missing and initializes them to "
             "the identity, the correct value here; stock vLLM refuses checkpoints with missing weights."
             if strict else "It loads in stock `transformers` and `vLLM` with no code changes.")
    L = [f"---\n{head}---", "", f"# {title}", "",
         f"FlashNorm-prepared {'strict' if strict else 'compatibility'} checkpoint of {of}, made from the "
         f"{state.mode} FlashNorm checkpoint {src_ref} by {step}. No weight changed: the folded weights "
         f"(`W · diag(g)`) are the source's, byte for byte, and the model computes the same function. {loads}", "",
         "## What's different from the source checkpoint?", "",
         "| Tensor | Source | This checkpoint |", "|---|---|---|"]
    rows: dict[tuple, list] = {}
    for n in plan.norms:
        rows.setdefault((n.rule, n.reason), []).append(n)
    added = {t.name: t for t in plan.added}
    for (rule, reason), norms in rows.items():
        count = f" (x{len(norms)})" if len(norms) > 1 else ""
        pat = rule.replace("{n}", "*")
        dts = sorted({(tensors[n.weight].dtype if n.weight in tensors else added[n.weight].dtype) for n in norms
                      if n.weight in tensors or n.weight in added})
        dt = "/".join(d.lower() for d in dts)
        before = "absent" if "restored" in reason or "absent" in reason else f"{ident} ({dt})"
        after = "removed" if strict else f"{ident} ({dt})"
        if before == "absent" and strict:
            after = "absent"
        L.append(f"| `{pat}.weight`{count} | {before} | {after} |")
        if any(n.bias for n in norms):
            L.append(f"| `{pat}.bias`{count} | {'absent' if before == 'absent' else 'all zeros'} | "
                     f"{'removed' if strict else 'all zeros'} |")
    old = state.flags.get("flashnorm_mode")
    ver = f"`{state.flags['flashnorm_version']}`" if "flashnorm_version" in state.flags else "—"
    L += [f"| `config.flashnorm_mode` | {f'`{old}`' if old else '—'} | `\"{plan.mode}\"` |",
          f"| `config.flashnorm` | {'`true`' if state.declared else '—'} | `true` |",
          f"| `config.flashnorm_version` | {ver} | `1` |", "",
          "All other tensors are byte-for-byte copies of the source.", ""]
    L += _usage(cfg, folder, ref, not strict, tokenizer_from=source.repo_id or base, on_hub=_repo_like(ref))
    command = command_line(source.repo_id or src_name, f"./{title}", mode=plan.mode, merged_dtype="source",
                           revision=source.revision, rules=rules, base_model=base_model, push_to_hub=push_to_hub,
                           private=private)
    L += ["## How this checkpoint was made", "",
          f"Converted with streamfold {version} (streaming, torch-free) from {src_ref}, by the equivalent of "
          "(the output folder's name aside):", "", "```bash", command, "```", "",
          f"- mode `{state.mode}` -> `{plan.mode}` ({state.how}); model type `{plan.model_type}` (streamfold "
          f"family `{plan.family}`), norm convention `{'1 + w' if plan.offset else 'w'}`",
          f"- tensors removed: {plan.count('drop')}, restored as identity: {len(plan.added)}, copied: "
          f"{plan.count('copy')}; tensor data {human_bytes(bytes_in)} in, {human_bytes(bytes_out)} out", "",
          "## Citation", "", "```bibtex", CITATION, "```", "", "## License", ""]
    lic = src_meta.get("license_name") or src_meta.get("license")
    L.append(f"`{lic}`, inherited from the source model." if lic else
             "Inherited from the source model; see its model card and license files.")
    path = folder / CARD_NAME
    path.write_text("\n".join(L) + "\n", encoding="utf-8")
    return path
