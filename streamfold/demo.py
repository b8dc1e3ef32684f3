"""``python -m streamfold demo``: convert the bundled sample checkpoint and prove the result exact."""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

SAMPLE = Path(__file__).resolve().parent / "sample"


def run_demo(dst: str | None = None, quiet: bool = False) -> int:
    """Convert ``sample/`` (a tiny random Llama, bf16, 3 shards, norms far from 1) into ``dst`` (a
    temporary folder by default), then verify it tensor by tensor and with a numpy forward pass
    against the source. Returns the exit status: 0 when everything holds."""
    from .convert import convert
    from .verify import verify

    out = Path(dst) if dst else Path(tempfile.mkdtemp(prefix="streamfold-demo-")) / "sample-FlashNorm"
    try:
        report = convert(SAMPLE, out, mode="compat", merged_dtype="float32", overwrite=dst is not None,
                         manifest=True)
        check = verify(SAMPLE, out, forward=True)
        if not quiet:
            print(report.summary())
            print(check.summary())
            if check.ok:
                f = check.forward
                print(f"exact: every folded weight equals source x norm, and the float32 logits of the "
                      f"converted model match the source to {f['max_rel_error']:.1e} relative "
                      f"(argmax agreement {f['argmax_agreement'] * 100:.0f}%)")
                if dst:
                    print(f"output: {out}")
        return 0 if check.ok else 3
    finally:
        if not dst:
            shutil.rmtree(out.parent, ignore_errors=True)
