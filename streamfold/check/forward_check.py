"""``verify --forward``: float32 numpy logits of both checkpoints (:mod:`streamfold.check.forward`), and the verdict.

Folds rounded to bf16/fp16 perturb every folded weight by up to half an ulp, so only a gross error is
a failure: every position's logits must have at least :data:`MIN_COSINE_ROUNDED` cosine to the
source's (measured on correct bf16 conversions: 0.99988 on SmolLM2-135M, 0.99917 on a random-weight
8B; a tensor left unfolded in a tiny model: 0.83). Unrounded (float32) folds must agree to float32
noise (:data:`MIN_COSINE_EXACT`).
"""
from __future__ import annotations

import time

import numpy as np

from ..core.errors import StreamfoldError
from ..planning.tasks import DEFAULT_BUDGET
from .report import Problem, VerifyReport

MIN_COSINE_ROUNDED = 0.99
MIN_COSINE_EXACT = 0.9999


def run_forward(src, dst, tokens=None, memory_budget: int | None = None) -> dict:
    """Float32 numpy logits of both checkpoints on the same tokens, and how far apart they are."""
    from .forward import Decoder, compare_logits, default_tokens
    block = max(1 << 20, (memory_budget or DEFAULT_BUDGET) // 3)
    t0 = time.perf_counter()
    with Decoder(src, block) as a:  # one at a time: one set of weight buffers
        if tokens is None or isinstance(tokens, int):
            vocab = a.w.info("model.embed_tokens.weight").shape[0]
            ids = default_tokens(vocab, 16 if tokens is None else int(tokens))
        else:
            ids = np.asarray(tokens, dtype=np.int64)
        ref = a.logits(ids)
        nbytes = a.w.bytes_read
    with Decoder(dst, block) as b:
        got = b.logits(ids)
        nbytes += b.w.bytes_read
    out = compare_logits(ref, got)
    out["seconds"] = round(time.perf_counter() - t0, 3)
    out["bytes_read"] = nbytes
    out["token_ids"] = [int(i) for i in ids]
    return out


def add_forward(report: VerifyReport, src, dst, tokens=None, memory_budget: int | None = None) -> None:
    """Run :func:`run_forward` and record it in ``report`` (a problem if the logits disagree)."""
    t0 = time.perf_counter()
    from .forward import ForwardUnsupported
    try:
        report.forward = f = run_forward(src, dst, tokens, memory_budget)
    except ForwardUnsupported as e:  # not a verdict on dst: say so, and leave the verdict to the rest
        report.forward = {"skipped": str(e)}
        report.notes.append(f"forward pass not run: {e}")
        return
    except StreamfoldError as e:
        report.problems.append(Problem("forward", "logits", f"could not run: {e}"))
        return
    if not f["all_finite"]:
        report.problems.append(Problem("forward", "logits", "not finite"))
    else:
        bound = MIN_COSINE_ROUNDED if report.folds_rounded else MIN_COSINE_EXACT
        f["min_cosine_required"] = bound
        if f["min_cosine"] < bound:
            report.problems.append(Problem("forward", "logits", f"cosine to the source's logits is "
                                                                f"{f['min_cosine']:.6f} at worst, below {bound}"))
    report.seconds += time.perf_counter() - t0
    report.bytes_read += f.pop("bytes_read", 0)
