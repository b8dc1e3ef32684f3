"""``python -m streamfold demo [DST]``: convert the bundled sample checkpoint and check the result.

The demo runs the conversion a user gets by default (compat mode, folded weights in the source dtype,
bf16 here), with convert's rules for DST (a non-empty DST is refused unless ``overwrite``), verifies it
tensor by tensor and with a float32 forward pass against the source, and for comparison also reports
the forward pass of a ``--merged-dtype float32`` conversion (made in a temporary folder). It prints
only paths that still exist when it ends: DST when one was given, never the temporary folders.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Callable

SAMPLE = Path(__file__).resolve().parent / "sample"
TEMPORARY = "<temporary folder, removed at the end>"


def _logits(f: dict) -> str:
    return (f"max relative error {f['max_rel_error']:.1e}, cosine {f['min_cosine']:.6f} at worst, argmax "
            f"agreement {f['argmax_agreement'] * 100:.0f}%")


def run_demo(dst: str | None = None, quiet: bool = False, overwrite: bool = False,
             log: Callable[[str], None] | None = None) -> int:
    """Convert ``sample/`` (a tiny random Llama, bf16, 3 shards, norms far from 1) into ``dst`` (a
    temporary folder by default) as a default conversion does, verify it (tensors, then a numpy forward
    pass against the source), and compare with a float32-merged conversion. Returns the exit status:
    0 when the checks hold, 3 when not. Raises :class:`StreamfoldError` for a DST convert refuses."""
    from .convert import convert
    from .check.verify import verify

    tmp = Path(tempfile.mkdtemp(prefix="streamfold-demo-"))
    try:
        out = Path(dst) if dst else tmp / "sample-FlashNorm"
        report = convert(SAMPLE, out, overwrite=overwrite, manifest=True, log=log)
        check = verify(SAMPLE, out, forward=True)
        f32 = tmp / "sample-FlashNorm-float32"
        convert(SAMPLE, f32, merged_dtype="float32", log=log)
        check32 = verify(SAMPLE, f32, forward=True)
        if not dst:
            report.dst = check.dst = TEMPORARY
        if not quiet:
            print(report.summary())
            print(check.summary())
            if check.ok and "max_rel_error" in (check.forward or {}):
                print(f"default conversion (folded weights rounded once to the source's bf16): float32 logits "
                      f"vs the source's: {_logits(check.forward)}")
            if check32.ok and "max_rel_error" in (check32.forward or {}):
                print(f"with --merged-dtype float32 (no rounding; twice the size of the folded tensors): "
                      f"{_logits(check32.forward)}")
            if dst:
                print(f"output: {out}")
        return 0 if check.ok and check32.ok else 3
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
