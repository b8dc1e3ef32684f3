"""Run the reference FlashNorm converter (transformer-tricks ``flashify_repo``) on a local dir.

    .bench-venv/bin/python benchmarks/reference_flashify.py SRC DST [--strict]

Runs ONLY in the separate benchmark venv (see requirements-reference.txt); streamfold
never imports torch or transformer-tricks.

Why a wrapper: ``flashify_repo(repo, dir)`` decides "hub repo or local dir" with
``huggingface_hub.repo_exists(repo)`` before touching the disk.  An absolute path
fails repo-id validation (HFValidationError), and a relative one (``cd parent;
flashify_repo("llama-1b")``) is a valid repo id, so it makes an HTTP request to the
hub: with network that returns False for a name not on the hub and the local dir is
used, but without network (this machine) it raises a connection error, or
OfflineModeIsEnabled with HF_HUB_OFFLINE=1.  The wrapper replaces the module's
``repo_exists`` with one that answers False for an existing local directory and
defers to the real function otherwise; nothing else of the converter is changed.
For a local dir the converter then loads the tokenizer with AutoTokenizer
(the synthetic checkpoints ship a small one for that).
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--strict", action="store_true")
    args = ap.parse_args(argv)

    import transformer_tricks as tt

    real_repo_exists = tt.repo_exists

    def repo_exists(repo, *a, **kw):
        if os.path.isdir(repo):
            return False
        return real_repo_exists(repo, *a, **kw)

    tt.repo_exists = repo_exists
    tt.quiet_hf()
    t = time.perf_counter()
    tt.flashify_repo(os.path.abspath(args.src), dir=os.path.abspath(args.dst), strict=args.strict)
    print(f"flashify_repo: {time.perf_counter() - t:.2f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
