"""``python -m streamfold derive-rules MODEL_DIR_OR_TYPE``: a rules file for ``--rules``, derived here.

Needs the ``derive`` extra (torch and transformers); the conversion itself then runs anywhere.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from ..core.errors import StreamfoldError

EXTRA_HINT = 'derive-rules needs torch and transformers: pip install "streamfold[derive]"'


def require_extra() -> None:
    """Raise a one-line StreamfoldError naming the extra when torch or transformers is missing."""
    for mod in ("torch", "transformers"):
        try:
            found = importlib.util.find_spec(mod) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise StreamfoldError(f"{EXTRA_HINT} ({mod} is not installed)")


def derive_rules(target: str, out=None, err=None) -> int:
    """Derive, check and print (TOML on ``out``) the family of a model folder or a model type."""
    out, err = out or sys.stdout, err or sys.stderr
    require_extra()
    from transformers.models.auto import configuration_auto

    from .api import derive_family, local_config
    from .tomlout import family_toml
    import transformers
    path = Path(target)
    config = None
    if (path / "config.json").is_file():
        mt, config = local_config(path)
        if mt not in configuration_auto.CONFIG_MAPPING:
            raise StreamfoldError(f"{path / 'config.json'}: model_type {mt!r} is not known to transformers "
                                  f"{transformers.__version__}; derive-rules needs its modeling code")
    elif target in configuration_auto.CONFIG_MAPPING:
        mt = target
    else:
        raise StreamfoldError(f"{target}: neither a model folder with config.json nor a model_type known to "
                              f"transformers {transformers.__version__}")
    fam, results = derive_family(mt, config=config)
    bad = [e for r in results for e in r.errors]
    if bad:
        raise StreamfoldError(f"{mt}: the derived rules failed their check, not written: {bad[0]}")
    rel = max(r.compat_rel for r in results)
    fam = {"description": f"{mt}, derived by streamfold derive-rules", **fam,
           "derived": {"transformers": transformers.__version__, "compat_max_rel_err": {mt: float(f"{rel:.2e}")}}}
    print(f"streamfold: {mt}: {sum(1 for f in fam['folds'])} fold rules, {len(fam.get('keep', []))} kept; checked: "
          f"float32-merged logits max rel err {rel:.1e}", file=err)
    out.write(family_toml(fam, f"Rules for model_type {mt!r}, derived from transformers {transformers.__version__}"
                               f"'s computation on a tiny random model and checked numerically.\n"
                               f"Use: python -m streamfold SRC DST --rules THIS_FILE"))
    return 0
