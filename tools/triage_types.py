"""Triage the model types no family file claims: derivable now, out of scope, nothing to fold, or harness failure.

    python tools/triage_types.py                     # every unclaimed type of the causal-LM / image-text-to-text /
                                                     #   multimodal-LM / seq2seq-causal-LM mappings
    python tools/triage_types.py --only aria xglm    # just these
    python tools/triage_types.py --json out.json     # also write the table as JSON

Each type is tried in a child process (``--timeout`` seconds): the derive harness builds its tiny model and
traces it (``streamfold.derive.api.derive_family`` without the numerical check). One line per type:

    derivable        folds found (N fold rules, M keep rules): add it to FAMILIES in derive_rules.py
    nothing_to_fold  the trace found weighted norms but none folds (the reasons are the trace's), or no
                     weighted norm at all
    encoder_decoder  its config sets is_encoder_decoder (encoder_decoders.toml)
    harness_failure  the tiny model cannot be built or traced here (first line of the error)
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MAPPINGS = ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES",
            "MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES", "MODEL_FOR_VISION_2_SEQ_MAPPING_NAMES",
            "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES")


def unclaimed() -> dict[str, list[str]]:
    """{model type: the mappings listing it} for every type of ``MAPPINGS`` no family file claims."""
    from transformers.models.auto import modeling_auto as ma

    from streamfold.rules.schema import FAMILIES
    known = {m for f in FAMILIES.values() for m in f["model_types"]}
    out: dict[str, list[str]] = {}
    for name in MAPPINGS:
        for mt in getattr(ma, name, {}):
            if mt not in known:
                out.setdefault(mt, []).append(name[len("MODEL_FOR_"):-len("_MAPPING_NAMES")])
    return dict(sorted(out.items()))


def _try(mt: str, q) -> None:
    import warnings
    warnings.filterwarnings("ignore")
    try:
        from streamfold.derive.scope import _is_encoder_decoder
        if _is_encoder_decoder(mt):
            q.put(("encoder_decoder", "config sets is_encoder_decoder"))
            return
        from streamfold.derive.api import derive_family
        fam, _ = derive_family(mt, check=False)
        folds, keeps = fam.get("folds", []), fam.get("keep", [])
        if folds:
            q.put(("derivable", f"{len(folds)} fold rules, {len(keeps)} keep rules"))
        else:  # the reason derive_family records (streamfold.derive.api.nothing_to_fold_reason)
            q.put(("nothing_to_fold", fam.get("nothing_to_fold", "")))
    except Exception as e:  # noqa: BLE001 - the point is to report it
        first = str(e).splitlines()[0] if str(e) else ""
        q.put(("harness_failure", f"{type(e).__name__}: {first}"[:300]))


def triage(mt: str, timeout: float) -> tuple[str, str]:
    """(class, detail) for one model type, tried in a child process."""
    q = mp.get_context("fork").Queue()
    p = mp.get_context("fork").Process(target=_try, args=(mt, q))
    p.start()
    p.join(timeout)
    if p.is_alive():
        p.kill()
        p.join()
        return "harness_failure", f"timed out after {timeout:.0f} s"
    return q.get() if not q.empty() else ("harness_failure", f"child exited {p.exitcode}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", metavar="TYPE")
    ap.add_argument("--timeout", type=float, default=240)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    import transformers  # noqa: F401 - imported once, before the forks
    types = unclaimed()
    names = args.only or list(types)
    table = {}
    for mt in names:
        cls, detail = triage(mt, args.timeout)
        table[mt] = {"class": cls, "detail": detail, "mappings": types.get(mt, [])}
        print(f"{mt:28s} {cls:16s} {detail}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(table, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
