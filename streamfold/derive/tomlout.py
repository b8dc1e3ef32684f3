"""Write a family (the ``--rules`` schema) as TOML, stable and readable (no third-party writer)."""
from __future__ import annotations

import json
import re

_BARE = re.compile(r"[A-Za-z0-9_-]+\Z")
_TOP_ORDER = ("description", "model_types", "text_model_types", "offset", "tie_default", "strict_refused",
              "nothing_to_fold", "refused", "vision_refused", "defaults", "layouts", "derived")


def _key(k: str) -> str:
    return k if _BARE.match(k) else json.dumps(k)


def value(v) -> str:
    """One TOML value (``None`` is not representable: the schema avoids it)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, list):
        return "[" + ", ".join(value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(k)} = {value(x)}" for k, x in v.items()) + "}" if v else "{}"
    raise TypeError(f"cannot write {v!r} as TOML")


def _array(items: list) -> str:
    if len(value(items)) <= 100:
        return value(items)
    return "[\n" + "".join(f"    {value(x)},\n" for x in items) + "]"


def family_toml(fam: dict, header: str = "") -> str:
    """The family as a TOML document: top-level keys, then ``[[folds]]``, ``[[keep]]``, ``[[vision_folds]]`` and
    ``[[vision_keep]]`` tables, then each of ``forms`` as ``[[forms]]`` with its ``[[forms.folds]]`` and ``[[forms.keep]]``."""
    lines = [f"# {h}" for h in header.splitlines()] if header else []
    for k in _TOP_ORDER:
        if k in fam:
            lines.append(f"{k} = {_array(fam[k]) if isinstance(fam[k], list) else value(fam[k])}")
    if "folds" in fam and not fam["folds"]:
        lines.append("folds = []")
    _tables(lines, fam, "")
    for form in fam.get("forms", []):
        lines += ["", "[[forms]]", f"name = {value(form['name'])}"]
        _tables(lines, form, "forms.")
    return "\n".join(lines) + "\n"


def _tables(lines: list[str], fam: dict, where: str) -> None:
    for table in ("folds", "keep") + (("vision_folds", "vision_keep") if not where else ()):
        for entry in fam.get(table, []):
            lines.append("")
            lines.append(f"[[{where}{table}]]")
            for k, v in entry.items():
                lines.append(f"{_key(k)} = {_array(v) if isinstance(v, list) else value(v)}")
